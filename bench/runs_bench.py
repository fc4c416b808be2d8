#!/usr/bin/env python3
"""Studio batch runs on real Celery workers, side by side with prompt flow's `pf run create`.

usage: .venv/bin/python bench/runs_bench.py [--pf /tmp/pfpeer/bin/pf] [--pf-lines 300] [--big 20000] [--keep]
                                           [--only one,two]

Everything runs in a scratch folder with its own STUDIO_DATA_DIR (SQLite database, filesystem broker), or on
PostgreSQL + Redis when DATABASE_URL / CELERY_BROKER_URL / REDIS_URL are set. The LLM flow is bench/flows/dag_llm
(python -> llm -> python) against tests/fakellm.py at 300 ms to the first token plus 20 chunks x 5 ms.

Measures (targets from issue 6):
  1. one worker at default settings, 2,000 lines: lines/s >= 10x prompt flow's default `pf run create`
  2. 128 lines in flight per worker (2 pool processes x 64): lines/s >= 0.9x the ideal (128 / call latency);
     beside it, for reference, what a bare HTTP client making only the chat calls gets from the same fake LLM
     (bench/bare_client.py): the ceiling of any batch run on this machine
  3. two workers at default settings >= 1.8x one worker
  4. a worker's peak memory (its whole process tree: worker, pool processes, runners) within 1.2x between
     2,000 and 20,000 lines (the 20,000-line runs use a 20 ms fake LLM to stay short; memory does not
     depend on the latency)
  5. the first page of a 20,000-line run's outputs (GET /api/v1/runs/<id>/details) in <= 300 ms server time

Lines/s is the whole run as a user sees it: from the submit call to the run reaching Completed (chunks are
enqueued, claimed, executed and aggregated), timed by the run's own finish time; workers are started, warmed
up and idle before each measured run (the spare runners a warm-up leaves started). Writes
bench/results/runs.md and runs.json. The exit status is 0 only when every target is met. `--only` runs some
of the measures (pf, one, one128, two, memory; page needs memory) and prints them without touching the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
FLOW = BENCH / "flows" / "dag_llm"
DEFAULT_PF = Path(os.environ.get("BENCH_PF", "/tmp/pfpeer/bin/pf"))
LINES = 2000
LLM_TIMING = {"latency_ms": 300, "token_ms": 5, "tokens": 20}
FAST_TIMING = {"latency_ms": 20, "token_ms": 0, "tokens": 20}
MAPPING = {"question": "${data.question}"}
MEASURES = ("pf", "one", "one128", "two", "memory", "page")


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class TreePeak:
    """Samples the RSS of a process tree every 100 ms and keeps the peak."""

    def __init__(self, treemon: Any, pid: int) -> None:
        self.treemon, self.pid, self.peak_mb, self.peak_procs = treemon, pid, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids = self.treemon.tree_pids(self.pid)
            self.peak_mb = max(self.peak_mb, sum(self.treemon.rss_mb(p) for p in pids))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(0.1)


class Workers:
    """`celery -A studio worker` processes on the bench's data dir."""

    def __init__(self, scratch: Path, env: dict[str, str]) -> None:
        self.scratch, self.env, self.procs = scratch, env, []

    def start(self, concurrency: int | None = None) -> subprocess.Popen[bytes]:
        """Start one worker (default pool size unless `concurrency`) and wait until it is ready."""
        n = len(self.procs) + 1
        log_path = self.scratch / f"worker{n}-{time.time():.0f}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "studio", "worker", "--loglevel", "INFO"]
        cmd += ["--without-gossip", "--without-mingle", "-n", f"bench{n}-{os.getpid()}-{time.time():.0f}@%h"]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
        out = log_path.open("wb")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while b" ready." not in log_path.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.procs.append(proc)
        return proc

    def settle(self, *, quiet_cpu_s: float = 0.02, window_s: float = 0.5, timeout_s: float = 30.0) -> float:
        """Wait until the workers' process trees are idle (a warm-up's aftermath, such as the spare runners it
        starts, is over): less than `quiet_cpu_s` CPU seconds in `window_s`. Returns the seconds waited."""
        started = time.monotonic()

        def tree_cpu() -> float:
            return sum(_treemon.cpu_s(pid) for proc in self.procs for pid in _tree(proc.pid))

        before = tree_cpu()
        while time.monotonic() - started < timeout_s:
            time.sleep(window_s)
            after = tree_cpu()
            if after - before < quiet_cpu_s:
                break
            before = after
        return time.monotonic() - started

    def stop_all(self) -> None:
        """Kill every worker (and its runners)."""
        for proc in self.procs:
            for pid in _tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        self.procs = []


_treemon: Any = None


def _tree(pid: int) -> list[int]:
    return list(_treemon.tree_pids(pid))


def run_and_wait(
    user: Any,
    flow: Any,
    dataset: Any,
    *,
    concurrency: int | None = None,
    timeout: float = 900,
    workers: Workers | None = None,
) -> dict[str, Any]:
    """Submit a run (once `workers` are idle), wait for Completed; wall seconds and lines/s as the user sees
    them: from the submit call to the moment the server marked the run Completed."""
    from runs_app import services
    from runs_app.models import LineResult, Run

    if workers is not None:
        workers.settle()
    started = time.perf_counter()
    submitted = time.time()
    run = services.run_create(
        user=user, flow_version=flow.head, dataset=dataset, column_mapping=MAPPING, concurrency=concurrency
    )
    while True:
        status = Run.objects.values_list("status", flat=True).get(pk=run.pk)
        if status not in ("Queued", "Preparing", "Running"):
            break
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"run {run.name} still {status} after {timeout} s")
        # The figure comes from the run's own finish time, not from this look: polling faster would only take
        # CPU from the workers being measured.
        time.sleep(0.1)
    run.refresh_from_db()
    wall = run.finished_at.timestamp() - submitted if run.finished_at else time.perf_counter() - started
    lines = LineResult.objects.filter(run=run)
    origin = run.created_at

    def since(moment: Any) -> float | None:
        return None if moment is None else round((moment - origin).total_seconds(), 2)

    # Where the time goes: each chunk's enqueue, claim and finish, in seconds since the run was created.
    timeline = {
        "started": since(run.started_at),
        "finished": since(run.finished_at),
        "chunks": [
            [c.index, c.worker.rsplit("@", 1)[0][-12:], since(c.claimed_at), since(c.finished_at)]
            for c in run.chunks.order_by("index")
        ],
    }
    return {
        "run": str(run.pk),
        "name": run.name,
        "status": run.status,
        "lines": run.total_lines,
        "results": lines.count(),
        "failed": run.failed_lines,
        "concurrency": run.concurrency,
        "chunk_size": run.chunk_size,
        "wall_s": round(wall, 3),
        "lines_per_s": round(run.total_lines / wall, 2),
        "server_s": round((run.finished_at - run.started_at).total_seconds(), 3) if run.started_at else None,
        "line_ms": _spread(list(lines.values_list("duration_ms", flat=True))),
        "timeline": timeline,
    }


def _spread(values: list[float]) -> dict[str, float]:
    """Median, 90th percentile and largest of `values` (a run's line durations, in ms)."""
    if len(values) < 2:
        return {}
    return {
        "median": round(statistics.median(values), 1),
        "p90": round(statistics.quantiles(values, n=10)[-1], 1),
        "max": round(max(values), 1),
    }


def bare_client(url: str, lines: int, in_flight: int) -> dict[str, Any]:
    """What a client that only makes the flow's chat calls gets from the same fake LLM (bench/bare_client.py)."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bare_client.py"),
            url,
            "--lines",
            str(lines),
            "--in-flight",
            str(in_flight),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(done.stdout)


def pf_run(pf: Path, scratch: Path, fake_url: str, lines: int) -> dict[str, Any]:
    """prompt flow's `pf run create` at its default settings over `lines` lines: whole-process lines/s."""
    home = scratch / "pfhome"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PROMPTFLOW_"))}
    env.update(PF_HOME_DIRECTORY=str(home), PF_DISABLE_TRACING="true")
    flow = scratch / "pf-flow"
    shutil.copytree(FLOW, flow)
    data = scratch / f"pf-{lines}.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}?"}) + "\n" for i in range(lines)))

    def pf_cmd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(pf), *args], env=env, cwd=scratch, capture_output=True, text=True, timeout=timeout
        )

    pf_cmd("config", "set", "telemetry.enabled=false", "trace.destination=none")
    created = pf_cmd(
        "connection",
        "create",
        "-f",
        str(BENCH / "flows" / "mock_openai.yaml"),
        "--set",
        f"base_url={fake_url}/v1",
    )
    if created.returncode != 0:
        raise RuntimeError(created.stderr[-2000:])
    started = time.perf_counter()
    result = pf_cmd(
        "run", "create", "--flow", str(flow), "--data", str(data), "--column-mapping",
        "question=${data.question}", "--name", f"bench-{os.getpid()}-{time.time():.0f}", timeout=1800,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return {"lines": lines, "wall_s": round(wall, 3), "lines_per_s": round(lines / wall, 2)}


def first_page_ms(user: Any, run_id: str, reps: int = 7) -> dict[str, Any]:
    """Server time of GET /api/v1/runs/<id>/details?page=1 through Django's full request stack (median)."""
    from django.test import Client

    from accounts_app.services import token_create

    client = Client()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_create(user=user, name=f'bench-{time.time()}').plaintext}"}
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        response = client.get(
            f"/api/v1/runs/{run_id}/details", {"page": 1, "per_page": 100}, HTTP_HOST="localhost", **auth
        )
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.content[:500]
        assert len(response.json()["lines"]) == 100
    return {
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "samples_ms": [round(t, 1) for t in times],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every measure and write bench/results/runs.md; 0 when all targets are met."""
    global _treemon
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pf", type=Path, default=DEFAULT_PF)
    ap.add_argument(
        "--pf-lines", type=int, default=300, help="lines of prompt flow's run (it runs ~9 lines/s)"
    )
    ap.add_argument("--big", type=int, default=20000)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        default=None,
        help="comma-separated subset of " + ",".join(MEASURES),
    )
    args = ap.parse_args(argv)
    only = args.only or set(MEASURES)
    if not only <= set(MEASURES):
        ap.error(f"--only takes {', '.join(MEASURES)}, not {', '.join(sorted(only - set(MEASURES)))}")

    scratch = Path(tempfile.mkdtemp(prefix="flowstudio-runs-bench-"))
    os.environ["STUDIO_DATA_DIR"] = str(scratch / "data")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    _treemon = _load("treemon")
    engine_bench = _load("engine_bench")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    if "channels" in settings.DATABASES:
        call_command("migrate", database="channels", verbosity=0)
    from django.contrib.auth import get_user_model

    from flows_app.services import connection_create, files_from_folder, flow_create
    from runs_app import services

    fake = engine_bench.FakeLLM(scratch)
    env = dict(os.environ)
    env["STUDIO_ENCRYPTION_KEYS"] = ",".join(settings.STUDIO_ENCRYPTION_KEYS)
    env["STUDIO_SECRET_KEY"] = settings.SECRET_KEY
    workers = Workers(scratch, env)
    raw: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    try:
        user = get_user_model().objects.create_user(
            username=f"bench{os.getpid()}", password="bench-pass-123!"
        )
        connection_create(
            owner=user, name="mock_openai", type="open_ai", configs={"base_url": fake.url + "/v1"},
            secrets={"api_key": "sk-mock-not-a-secret"},
        )  # fmt: skip
        flow = flow_create(owner=user, name="dag_llm", files=files_from_folder(root=FLOW))

        def dataset(n: int) -> Any:
            data = "".join(json.dumps({"question": f"question {i}?"}) + "\n" for i in range(n)).encode()
            return services.dataset_create(owner=user, name=f"q{n}", filename=f"q{n}.jsonl", data=data)

        small, warm, big = dataset(LINES), dataset(200), dataset(args.big)
        fake.config(LLM_TIMING)
        latency = fake.call_latency_s()
        raw["call_latency_s"] = round(latency, 4)
        log(f"fake LLM call latency: {latency * 1000:.0f} ms")

        if "pf" not in only:
            pass
        elif args.pf.exists():
            log(f"prompt flow: pf run create of {args.pf_lines} lines at its default settings")
            raw["pf"] = pf_run(args.pf, scratch, fake.url, args.pf_lines)
            log(f"prompt flow: {raw['pf']}")
        else:
            log(f"{args.pf} not found: prompt flow's figure is the issue's 9.1 lines/s")
            raw["pf"] = {"lines": None, "wall_s": None, "lines_per_s": 9.1, "note": "issue 6 figure"}

        if only & {"one", "one128", "two"}:
            workers.start()
            run_and_wait(user, flow, warm)
        if "one" in only:
            log("one worker, default settings")
            raw["one_default"] = run_and_wait(user, flow, small, workers=workers)
            log(f"  {raw['one_default']}")
        if "one128" in only:
            fake.reset()
            log("one worker, 128 lines in flight (64 per pool process)")
            raw["one_128"] = run_and_wait(user, flow, small, concurrency=64, workers=workers)
            raw["one_128"]["max_inflight"] = fake.stats()["max_inflight"]
            log(f"  {raw['one_128']}")
            workers.settle()
            raw["bare_128"] = bare_client(fake.url, LINES, 128)
            log(f"bare HTTP client, 128 in flight: {raw['bare_128']}")
        if "two" in only:
            workers.start()
            run_and_wait(user, flow, warm)
            log("two workers, default settings")
            raw["two_default"] = run_and_wait(user, flow, small, workers=workers)
            log(f"  {raw['two_default']}")
        workers.stop_all()

        fake.config(FAST_TIMING)
        memory = {}
        for label, ds in (("small", small), ("big", big)) if only & {"memory", "page"} else ():
            proc = workers.start()
            run_and_wait(user, flow, warm)
            workers.settle()
            with TreePeak(_treemon, proc.pid) as peak:
                result = run_and_wait(user, flow, ds, timeout=1800)
            result["peak_tree_rss_mb"] = round(peak.peak_mb, 1)
            result["peak_procs"] = peak.peak_procs
            memory[label] = result
            log(f"memory {label}: {result}")
            workers.stop_all()
        raw["memory"] = memory
        if "page" in only:
            raw["first_page"] = first_page_ms(user, memory["big"]["run"])
            log(f"first page: {raw['first_page']}")
    finally:
        workers.stop_all()
        fake.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.only:
        if "one_default" in raw and "two_default" in raw:
            ratio = raw["two_default"]["lines_per_s"] / raw["one_default"]["lines_per_s"]
            log(f"two workers vs one: {ratio:.2f}x (target >= 1.8x)")
        print(json.dumps(raw, indent=2))
        return 0
    ok = write_report(raw)
    return 0 if ok else 1


def write_report(raw: dict[str, Any]) -> bool:
    """bench/results/runs.md and runs.json; True when every target is met."""
    pf = raw["pf"]["lines_per_s"]
    one = raw["one_default"]["lines_per_s"]
    ideal = 128 / raw["call_latency_s"]
    at128 = raw["one_128"]["lines_per_s"]
    two = raw["two_default"]["lines_per_s"]
    bare = raw["bare_128"]["lines_per_s"]
    mem_small = raw["memory"]["small"]["peak_tree_rss_mb"]
    mem_big = raw["memory"]["big"]["peak_tree_rss_mb"]
    page = raw["first_page"]["median_ms"]
    rows = [
        ("one worker, default settings vs `pf run create` default", f"{one:.1f} vs {pf:.1f} lines/s", one / pf, 10.0, ">="),
        ("one worker, 128 in flight vs ideal 128 ÷ latency", f"{at128:.1f} vs {ideal:.1f} lines/s", at128 / ideal, 0.9, ">="),
        ("bare HTTP client, 128 in flight vs the same ideal (the fake LLM's ceiling here)", f"{bare:.1f} vs {ideal:.1f} lines/s", bare / ideal, None, ""),
        ("two workers vs one (default settings)", f"{two:.1f} vs {one:.1f} lines/s", two / one, 1.8, ">="),
        (f"worker peak memory, {raw['memory']['big']['lines']:,} vs 2,000 lines", f"{mem_big:.0f} vs {mem_small:.0f} MB", mem_big / mem_small, 1.2, "<="),
        ("first page of the 20,000-line run's outputs (server time)", f"{page:.1f} ms", page, 300.0, "<="),
    ]  # fmt: skip
    ok = True
    lines = [
        "# Batch runs on Celery workers vs prompt flow",
        "",
        f"Written by `bench/runs_bench.py` on {raw['date']} ({raw['cpus']} CPUs, Python {platform.python_version()}).",
        f"Fake LLM: tests/fakellm.py, {LLM_TIMING['latency_ms']} ms to the first token + 20 chunks × 5 ms "
        f"(measured call latency {raw['call_latency_s'] * 1000:.0f} ms). Flow: bench/flows/dag_llm (python → llm → python).",
        "Lines/s = lines ÷ (submit → Completed), workers started, warmed up and idle beforehand; database "
        + (
            "SQLite + filesystem broker (embedded default)."
            if not os.environ.get("DATABASE_URL")
            else "from DATABASE_URL."
        ),
        "",
        "| measure | figures | ratio | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, figures, value, target, op in rows:
        shown = f"{value:.2f}×" if "ms" not in figures else f"{value:.1f} ms"
        if target is None:  # a reference figure, not a target
            lines.append(f"| {name} | {figures} | {shown} | (reference) | |")
            continue
        met = value >= target if op == ">=" else value <= target
        ok = ok and met
        lines.append(
            f"| {name} | {figures} | {shown} | {op} {target:g}{'' if 'ms' in figures else '×'} | {'yes' if met else 'NO'} |"
        )
    lines += [
        "",
        "## Details",
        "",
        f"- prompt flow: {raw['pf']}",
        f"- one worker, default: {raw['one_default']}",
        f"- one worker, 128 in flight: {raw['one_128']}",
        f"- bare HTTP client, 128 in flight: {raw['bare_128']}",
        f"- two workers, default: {raw['two_default']}",
        f"- memory (fake LLM at {FAST_TIMING['latency_ms']} ms): {raw['memory']}",
        f"- first page: {raw['first_page']}",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runs.md").write_text("\n".join(lines))
    (RESULTS / "runs.json").write_text(json.dumps(raw, indent=2))
    print("\n".join(lines))
    return ok


if __name__ == "__main__":
    sys.exit(main())
