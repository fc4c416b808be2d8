#!/usr/bin/env python3
"""Engine benchmark: Flow Studio's `flowstudio` CLI against prompt flow's `pf`, side by side in one run.

Both tools run the same flow folders (bench/flows, copied to a scratch folder because `pf` writes into the
flow folder) against the same fake LLM (tests/fakellm.py) on the same machine, one command at a time:

  (a) `flow test` of dag_llm (python -> llm -> python), whole process; target: ours <= 0.5x prompt flow's.
  (b) a 1,000-line batch of dag_python5 (five python nodes); lines/s; target: ours >= 10x prompt flow's.
  (c) a 1,000-line batch of dag_llm, fake LLM 300 ms to first token + 20 chunks x 5 ms; lines/s at default
      settings (target >= 10x prompt flow's default of 4 workers), and ours with 128 lines in flight
      (target >= 0.9x the ideal in-flight / call latency, one runner process, peak tree memory < 500 MB).

Results: bench/results/engine.md (table) and bench/results/engine.json (every sample).
usage: engine_bench.py [--pf PATH] [--reps N] [--peer-reps N] [--only a,b,c] [--reuse-peer] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gen_data import write_questions  # noqa: E402
from treemon import TreeSample, cmdline, cpu_s, monitor, tree_pids  # noqa: E402

RESULTS = HERE / "results"
FAKELLM = ROOT / "tests" / "fakellm.py"
DEFAULT_PF = Path("/tmp/pfpeer/bin/pf")
BATCH_LINES = 1000
IN_FLIGHT = 128
# The fake LLM's timing for the batch measures: 300 ms to the first token, then 20 chunks 5 ms apart.
LLM_TIMING = {"latency_ms": 300, "token_ms": 5, "tokens": 20}
# `flow test` is a start-up measure: the fake answers at once, as in the peer measurement of prompt flow.
FLOW_TEST_TIMING = {"latency_ms": 0, "token_ms": 0, "tokens": 20}
QUESTION = "What is 7 squared,   plus one?"
MAPPING = "question=${data.question}"
T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the time since the start."""
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


# -- the fake LLM ------------------------------------------------------------------------------------------


class FakeLLM:
    """tests/fakellm.py started as its own process on a free loopback port."""

    def __init__(self, scratch: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (scratch / "fakellm.log").open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(FAKELLM),
                "--port",
                str(self.port),
                "--latency-ms",
                "300",
                "--token-ms",
                "5",
                "--tokens",
                "20",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"the fake LLM did not start; see {self.log.name}")

    def _call(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """Counters (requests, streamed, inflight, max_inflight) and the config."""
        return self._call("/stats")

    def reset(self) -> None:
        """Zero the counters."""
        self._call("/stats/reset", {})

    def config(self, timing: Mapping[str, Any]) -> None:
        """Change the timing."""
        self._call("/config", dict(timing))

    def call_latency_s(self, n: int = 5) -> float:
        """Median wall time of n sequential non-streaming chat calls, as a batch line makes them."""
        times = []
        for i in range(n):
            t = time.perf_counter()
            self._call(
                "/v1/chat/completions",
                {"model": "mock-gpt", "messages": [{"role": "user", "content": f"q{i}"}]},
            )
            times.append(time.perf_counter() - t)
        return median(times)

    def stop(self) -> None:
        """Stop the server this benchmark started."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class LLMPhase:
    """Polls the fake LLM during a batch: when the first call arrived and when the last one ended."""

    def __init__(self, fake: FakeLLM, expected: int, interval: float = 0.05) -> None:
        self.fake, self.expected, self.interval = fake, expected, interval
        self.first: float | None = None
        self.last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> LLMPhase:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            try:
                st = self.fake.stats()
            except OSError:
                st = None
            if st is not None:
                if self.first is None and st["requests"] > 0:
                    self.first = now
                if self.last is None and st["requests"] >= self.expected and st["inflight"] == 0:
                    self.last = now
            self._stop.wait(self.interval)

    @property
    def seconds(self) -> float | None:
        """From the first call's arrival to the end of the last call (None if not seen)."""
        if self.first is None or self.last is None:
            return None
        return self.last - self.first


# -- our fork server --------------------------------------------------------------------------------------


class ForkServer:
    """Flow Studio's local fork server ("zygote") for one socket path.

    The CLI starts it in the background on first use and forks runners from it afterwards; it outlives the
    CLI, so its memory and CPU (and those of the runners it forks) are counted with each command that uses
    it. The benchmark gives it a socket of its own (FLOWSTUDIO_RUNNER_SOCKET) so that it never shares one
    with a developer's, and stops it at the end.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def _matching(self) -> list[int]:
        needle = f"--zygote {self.socket_path}"
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and needle in cmdline(int(p))]

    def pids(self) -> list[int]:
        """The fork server itself (its forked runners share its command line but have it as parent)."""
        found = self._matching()
        children = set()
        for pid in found:
            try:
                with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) in found:
                children.add(pid)
        return [p for p in found if p not in children]

    def classify(self, pid: int) -> str | None:
        """'fork server', 'runner' (a process running flowengine.runner) or None."""
        if pid in self.pids():
            return "fork server"
        return "runner" if "flowengine.runner" in cmdline(pid) else None

    def wait_ready(self, timeout: float = 20.0) -> bool:
        """Wait until the server listens on its socket."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.socket_path.exists() and self.pids():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the server (and any runner it still has) that this benchmark's commands started."""
        self.socket_path.unlink(missing_ok=True)
        for pid in tree_pids(*self.pids()) if self.pids() else []:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 5
        while self._matching() and time.monotonic() < end:
            time.sleep(0.05)
        for pid in self._matching():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- the two tools -----------------------------------------------------------------------------------------


@dataclass
class Tool:
    """How to drive one engine's CLI in the scratch folder."""

    name: str
    argv0: list[str]
    env: dict[str, str]
    scratch: Path
    runs: int = 0
    outputs_of: Callable[[Tool, str, str], list[dict[str, Any]]] | None = None
    fork_server: ForkServer | None = None

    def run(
        self,
        args: Sequence[str],
        label: str,
        timeout: float,
        env: Mapping[str, str] | None = None,
        fork_server: ForkServer | None = None,
    ) -> tuple[TreeSample, str, str]:
        """Run the CLI under the process tree monitor; returns the sample, stdout and stderr."""
        self.runs += 1
        server = fork_server or self.fork_server
        env = dict(env or {})
        if server is not None:
            env["FLOWSTUDIO_RUNNER_SOCKET"] = str(server.socket_path)
        out_path = self.scratch / "logs" / f"{label}.out"
        err_path = self.scratch / "logs" / f"{label}.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            sample = monitor(
                [*self.argv0, *args],
                label=label,
                env={**self.env, **env},
                cwd=self.scratch,
                stdout=out,
                stderr=err,
                timeout=timeout,
                extra_roots=server.pids if server else None,
                classify=server.classify if server else None,
            )
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        if sample.rc != 0:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            log(
                f"{self.name}: {label} exited with {sample.rc}{' (timed out)' if sample.timed_out else ''}:\n{tail}"
            )
        return sample, stdout, stderr


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object a `flow test` prints on stdout (prompt flow may print other lines around it)."""
    text = text.strip()
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start : end + 1])
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pf_outputs(tool: Tool, name: str, stdout: str) -> list[dict[str, Any]]:
    """A prompt flow run's output rows, from its local run folder."""
    return read_jsonl(Path(tool.env["PF_HOME_DIRECTORY"]) / ".runs" / name / "flow_outputs" / "output.jsonl")


def ours_outputs(tool: Tool, name: str, stdout: str) -> list[dict[str, Any]]:
    """A Flow Studio run's output rows, as `flowstudio run show-details` gives them."""
    out_path = tool.scratch / "logs" / f"{name}.details.json"
    with out_path.open("w") as out:
        proc = subprocess.run(
            [*tool.argv0, "run", "show-details", "--name", name, "--all-results", "--json"],
            env=tool.env,
            cwd=tool.scratch,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0:
        log(f"ours: run show-details {name} failed: {proc.stderr.strip()[-500:]}")
        return []
    value = json.loads(out_path.read_text() or "[]")
    rows = value if isinstance(value, list) else value.get("lines", [])
    return [r.get("outputs", r) for r in rows if isinstance(r, dict)]


def make_tools(args: argparse.Namespace, scratch: Path) -> tuple[Tool, Tool]:
    """Our CLI (the project venv's console script) and prompt flow's, each with an isolated home folder."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "FLOWSTUDIO_", "PROMPTFLOW_"))}
    flowstudio = Path(sys.executable).with_name("flowstudio")
    ours_env = {**base, "FLOWSTUDIO_HOME": str(scratch / "fshome")}
    if flowstudio.exists():
        argv0 = [str(flowstudio)]
    else:
        # not installed yet (`make bench-engine` installs it): run the same entry point from the work tree
        argv0 = [sys.executable, "-m", "flowengine.cli"]
        ours_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
        log(f"{flowstudio} is not installed: using {' '.join(argv0)}")
    (scratch / "z").mkdir(mode=0o700)
    ours = Tool(
        "Flow Studio",
        argv0,
        ours_env,
        scratch,
        outputs_of=ours_outputs,
        fork_server=ForkServer(scratch / "z" / "warm.sock"),
    )
    peer = Tool(
        "prompt flow",
        [str(args.pf)],
        {**base, "PF_HOME_DIRECTORY": str(scratch / "pfhome"), "PF_DISABLE_TRACING": "true"},
        scratch,
        outputs_of=pf_outputs,
    )
    return ours, peer


def setup_connections(ours: Tool, peer: Tool, fake: FakeLLM, flows: Path, skip_peer: bool) -> None:
    """Create the mock_openai connection pointing at the fake LLM in both tools' isolated stores."""
    conn = flows / "mock_openai.yaml"
    base_url = f"base_url={fake.url}/v1"
    tools = [ours] if skip_peer else [ours, peer]
    if not skip_peer:
        peer.run(["config", "set", "telemetry.enabled=false", "trace.destination=none"], "pf-config", 120)
    for tool in tools:
        sample, _, err = tool.run(
            ["connection", "create", "-f", str(conn), "--set", base_url],
            f"connection-{tool.name.replace(' ', '-')}",
            120,
        )
        if sample.rc != 0:
            raise RuntimeError(f"{tool.name}: connection create failed: {err.strip()[-800:]}")


# -- measures ----------------------------------------------------------------------------------------------


def measure_flow_test(
    ours: Tool, peer: Tool | None, fake: FakeLLM, flows: Path, reps: int, peer_reps: int
) -> dict[str, Any]:
    """(a) whole-process `flow test` of dag_llm, interleaving the two tools."""
    fake.config(FLOW_TEST_TIMING)
    flow = str(flows / "dag_llm")
    args = ["flow", "test", "--flow", flow, "--inputs", f"question={QUESTION}"]
    res: dict[str, Any] = {"ours": [], "ours_cold": [], "peer": [], "ours_output": None, "peer_output": None}
    log("(a) flow test: one warm-up run of each tool (not counted); it also starts our fork server")
    ours.run(args, "a-ours-warmup", 120)
    if ours.fork_server is not None and not ours.fork_server.wait_ready():
        log("(a) our fork server did not start: the warm runs spawn a runner each")
    if peer is not None:
        peer.run(args, "a-pf-warmup", 120)
    for i in range(max(reps, peer_reps if peer else 0)):
        if i < reps:
            s, out, _ = ours.run(args, f"a-ours-{i}", 120)
            res["ours"].append(s.to_dict())
            res["ours_output"] = parse_json_object(out)
            log(
                f"(a) ours warm #{i + 1}: {s.wall_s:.3f} s, cpu {s.cpu_s:.2f} s, {s.peak_tree_rss_mb:.0f} MB, rc {s.rc}"
            )
            # cold: a fresh socket, so no fork server is running; the one this command starts is stopped after
            cold = ForkServer(ours.scratch / "z" / f"cold{i}.sock")
            s, out, _ = ours.run(args, f"a-ours-cold-{i}", 120, fork_server=cold)
            cold.stop()
            res["ours_cold"].append(s.to_dict())
            log(
                f"(a) ours cold #{i + 1}: {s.wall_s:.3f} s, cpu {s.cpu_s:.2f} s, {s.peak_tree_rss_mb:.0f} MB, rc {s.rc}"
            )
        if peer is not None and i < peer_reps:
            s, out, _ = peer.run(args, f"a-pf-{i}", 120)
            res["peer"].append(s.to_dict())
            res["peer_output"] = parse_json_object(out)
            log(
                f"(a) pf         #{i + 1}: {s.wall_s:.3f} s, cpu {s.cpu_s:.2f} s, {s.peak_tree_rss_mb:.0f} MB, rc {s.rc}"
            )
    return res


def run_batch(
    tool: Tool,
    fake: FakeLLM | None,
    flow: Path,
    data: Path,
    label: str,
    timeout: float,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One `run create` of 1,000 lines under the tree monitor (and the fake LLM's phase poller)."""
    name = f"{label}-{dt.datetime.now():%H%M%S}-{os.getpid()}"
    args = [
        "run",
        "create",
        "--flow",
        str(flow),
        "--data",
        str(data),
        "--column-mapping",
        MAPPING,
        "--name",
        name,
        *extra_args,
    ]
    phase = None
    fake_cpu = None
    if fake is not None:
        fake.reset()
        phase = LLMPhase(fake, BATCH_LINES)
        fake_cpu = cpu_s(fake.proc.pid)
        with phase:
            sample, out, _ = tool.run(args, name, timeout, env)
        fake_cpu = cpu_s(fake.proc.pid) - fake_cpu
        stats = fake.stats()
    else:
        sample, out, _ = tool.run(args, name, timeout, env)
        stats = None
    rows = tool.outputs_of(tool, name, out) if tool.outputs_of and sample.rc == 0 else []
    result = {
        "name": name,
        "monitor": sample.to_dict(),
        "rows_out": len(rows),
        "lines_per_s": round(BATCH_LINES / sample.wall_s, 2),
        "fake_llm": None
        if stats is None
        else {k: stats[k] for k in ("requests", "streamed", "max_inflight")},
        "llm_phase_s": None if phase is None or phase.seconds is None else round(phase.seconds, 3),
        "fake_llm_cpu_s": None if fake_cpu is None else round(fake_cpu, 2),
        "answers": [r.get("answer") for r in rows],
    }
    if result["llm_phase_s"]:
        result["llm_phase_lines_per_s"] = round(BATCH_LINES / result["llm_phase_s"], 2)
    return result


# The same 1,000 chat calls, 128 at a time, from a bare asyncio loop over the openai SDK with the aiohttp
# transport (as flowengine/llm.py makes them): the ceiling any Python engine on this SDK reaches here.
SDK_REFERENCE = """
import asyncio, json, sys, time
import openai

async def main(url, n, conc):
    client = openai.AsyncOpenAI(api_key="sk-mock", base_url=url, max_retries=0,
                                http_client=openai.DefaultAioHttpClient())
    sem = asyncio.Semaphore(conc)

    async def one(i):
        async with sem:
            r = await client.chat.completions.create(
                model="mock-gpt", max_tokens=64, temperature=0,
                messages=[{"role": "system", "content": "You are a terse assistant."},
                          {"role": "user", "content": f"Question {i}"}])
            return r.choices[0].message.content

    await one(-1)
    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    await client.close()
    print(json.dumps({"calls_per_s": round(n / wall, 1), "cpu_ms_per_call": round(cpu / n * 1000, 3)}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def sdk_reference(fake: FakeLLM) -> dict[str, Any] | None:
    """Calls/s and CPU per call of the bare SDK loop (None when it fails)."""
    proc = subprocess.run(
        [sys.executable, "-c", SDK_REFERENCE, fake.url + "/v1", str(BATCH_LINES), str(IN_FLIGHT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        log(f"the bare SDK reference failed: {proc.stderr.strip()[-500:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(res: Mapping[str, Any]) -> str:
    """One progress line for a batch."""
    m = res["monitor"]
    text = (
        f"{m['wall_s']:.2f} s = {res['lines_per_s']:.1f} lines/s, rows {res['rows_out']}, "
        f"peak {m['peak_tree_rss_mb']:.0f} MB in {m['peak_procs']} procs, cpu {m['cpu_s']:.1f} s"
    )
    if res.get("fake_llm"):
        text += f", fake max in flight {res['fake_llm']['max_inflight']}"
    if res.get("llm_phase_s"):
        text += f", LLM phase {res['llm_phase_s']:.2f} s = {res['llm_phase_lines_per_s']:.1f} lines/s"
    return text


def measure_batches(
    ours: Tool,
    peer: Tool | None,
    fake: FakeLLM,
    flows: Path,
    data: Path,
    reps: int,
    peer_reps: int,
    only: set[str],
) -> dict[str, Any]:
    """(b) the pure-python batch and (c) the LLM batch, ours repeated, prompt flow's LLM batch once."""
    out: dict[str, Any] = {}
    server = ours.fork_server
    if server is not None and not server.pids():
        log("starting our fork server with one flow test (not counted), as a first command would")
        fake.config(FLOW_TEST_TIMING)
        ours.run(["flow", "test", "--flow", str(flows / "dag_python5")], "fork-server-warmup", 120)
        if not server.wait_ready():
            log("our fork server did not start: each batch spawns its runner")
    if "b" in only:
        flow = flows / "dag_python5"
        out["b"] = {"ours": [], "peer": []}
        # interleaved, so that other work on the machine weighs on both tools alike
        for i in range(max(reps, peer_reps if peer else 0)):
            if i < reps:
                r = run_batch(ours, None, flow, data, f"b-ours-{i}", 600)
                out["b"]["ours"].append(r)
                log(f"(b) ours #{i + 1}: {describe(r)}")
            if peer is not None and i < peer_reps:
                r = run_batch(peer, None, flow, data, f"b-pf-{i}", 900)
                out["b"]["peer"].append(r)
                log(f"(b) pf   #{i + 1}: {describe(r)}")
    if "c" in only:
        fake.config(LLM_TIMING)
        latency = fake.call_latency_s()
        log(f"(c) fake LLM call latency (non-streaming, sequential, median of 5): {latency * 1000:.1f} ms")
        flow = flows / "dag_llm"
        out["c"] = {"call_latency_s": round(latency, 4), "ours_default": [], "ours_128": [], "peer": []}
        out["c"]["sdk_reference"] = ref = sdk_reference(fake)
        if ref:
            log(
                f"(c) bare openai SDK loop, {IN_FLIGHT} in flight: {ref['calls_per_s']} calls/s, "
                f"{ref['cpu_ms_per_call']} ms CPU a call"
            )
        for i in range(reps):
            r = run_batch(ours, fake, flow, data, f"c-ours-default-{i}", 600)
            out["c"]["ours_default"].append(r)
            log(f"(c) ours default #{i + 1}: {describe(r)}")
        for i in range(reps):
            r = run_batch(
                ours, fake, flow, data, f"c-ours-{IN_FLIGHT}-{i}", 600, ["--concurrency", str(IN_FLIGHT)]
            )
            out["c"]["ours_128"].append(r)
            log(f"(c) ours {IN_FLIGHT} in flight #{i + 1}: {describe(r)}")
        if peer is not None:
            log("(c) prompt flow's default batch (4 workers): about two minutes")
            r = run_batch(peer, fake, flow, data, "c-pf-default", 900)
            out["c"]["peer"].append(r)
            log(f"(c) pf default: {describe(r)}")
    return out


# -- report ------------------------------------------------------------------------------------------------


def versions(args: argparse.Namespace, ours: Tool, peer: Tool, skip_peer: bool) -> dict[str, Any]:
    """Tool versions, CPU and memory of this machine, and the date."""

    def run(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def pkg(python: str, names: Sequence[str]) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))"
        )
        text = run([python, "-c", code, *names])
        return json.loads(text) if text else {}

    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    pf_python = str(Path(args.pf).with_name("python"))
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "python_ours": platform.python_version(),
        "ours": pkg(sys.executable, ["flowstudio", "openai", "httpx", "jinja2", "aiohttp"]),
    }
    if "flowstudio" not in info["ours"]:
        with (ROOT / "pyproject.toml").open("rb") as f:
            info["ours"]["flowstudio"] = tomllib.load(f)["project"]["version"] + " (work tree)"
    if not skip_peer:
        info["python_peer"] = run([pf_python, "-c", "import platform; print(platform.python_version())"])
        info["peer"] = pkg(
            pf_python,
            ["promptflow", "promptflow-core", "promptflow-devkit", "promptflow-tools", "openai", "flask"],
        )
    return info


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    """A number for the table, or n/a."""
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def cpu_note(label: str, ours: Sequence[Mapping[str, Any]], peer: Sequence[Mapping[str, Any]]) -> str:
    """CPU seconds the whole process tree spent on the batch, ours against prompt flow's (median of runs)."""
    o = median([r["monitor"]["cpu_s"] for r in ours])
    p = median([r["monitor"]["cpu_s"] for r in peer])
    per_line = f"{o / BATCH_LINES * 1000:.2f} ms" if o == o else "n/a"
    return (
        f"{label}: CPU seconds of the whole process tree for {BATCH_LINES:,} lines, fake LLM excluded: ours "
        f"{fmt(o)} ({per_line} a line), prompt flow {fmt(p)}; prompt flow spends {fmt(p / o if o and p == p else None, '×', 1)} "
        "as much CPU."
    )


def summarize(raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The verdict rows (measure, ours, peer, ratio, target, pass) and extra detail lines."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def ok_runs(samples: Sequence[Mapping[str, Any]], key: str = "monitor") -> list[Mapping[str, Any]]:
        return [
            s
            for s in samples
            if (s[key] if key else s)["rc"] == 0 and s.get("rows_out", BATCH_LINES) == BATCH_LINES
        ]

    a = raw.get("a")
    if a:
        peer = median([s["wall_s"] for s in a["peer"] if s["rc"] == 0])
        for key, how in (
            ("ours", "our fork server already running"),
            ("ours_cold", "cold: no fork server running"),
        ):
            ours = median([s["wall_s"] for s in a.get(key, []) if s["rc"] == 0])
            ratio = ours / peer if peer == peer and ours == ours else None
            rows.append(
                {
                    "measure": f"(a) `flow test` dag_llm, whole process, {how}; median of "
                    f"{len(a.get(key, []))} / {len(a['peer'])}",
                    "ours": fmt(ours, " s"),
                    "peer": fmt(peer, " s"),
                    "ratio": fmt(ratio, "×"),
                    "target": "≤ 0.5×",
                    "pass": ratio is not None and ratio <= 0.5,
                }
            )
        same = a.get("ours_output") is not None and a.get("ours_output") == a.get("peer_output")
        notes.append(
            f"(a) outputs: ours {json.dumps(a.get('ours_output'))}; prompt flow "
            f"{json.dumps(a.get('peer_output'))} ({'identical' if same else 'DIFFERENT'}); peak tree RSS "
            f"ours {fmt(median([s['peak_tree_rss_mb'] for s in a['ours']]), ' MB', 0)} warm (fork server included), "
            f"{fmt(median([s['peak_tree_rss_mb'] for s in a.get('ours_cold', [])]), ' MB', 0)} cold; prompt flow "
            f"{fmt(median([s['peak_tree_rss_mb'] for s in a['peer']]), ' MB', 0)}."
        )
    b = raw.get("b")
    if b:
        ours = median([r["lines_per_s"] for r in ok_runs(b["ours"], "monitor")]) if b["ours"] else None
        peer = median([r["lines_per_s"] for r in ok_runs(b["peer"], "monitor")]) if b["peer"] else None
        ratio = ours / peer if ours and peer else None
        rows.append(
            {
                "measure": f"(b) {BATCH_LINES:,}-line batch, 5 python nodes, lines/s (whole `run create`)",
                "ours": fmt(ours, "", 1),
                "peer": fmt(peer, "", 1),
                "ratio": fmt(ratio, "×", 1),
                "target": "≥ 10×",
                "pass": ratio is not None and ratio >= 10,
            }
        )
        notes.append(cpu_note("(b)", b["ours"], b["peer"]))
    c = raw.get("c")
    if c:
        ours = median([r["lines_per_s"] for r in ok_runs(c["ours_default"])]) if c["ours_default"] else None
        peer = median([r["lines_per_s"] for r in ok_runs(c["peer"])]) if c["peer"] else None
        ratio = ours / peer if ours and peer else None
        rows.append(
            {
                "measure": f"(c) {BATCH_LINES:,}-line LLM batch (dag_llm), default settings, lines/s (whole `run create`)",
                "ours": fmt(ours, "", 1),
                "peer": fmt(peer, "", 1),
                "ratio": fmt(ratio, "×", 1),
                "target": "≥ 10×",
                "pass": ratio is not None and ratio >= 10,
            }
        )
        notes.append(cpu_note("(c) default settings", c["ours_default"], c["peer"]))
        runs = ok_runs(c["ours_128"])
        ideal = IN_FLIGHT / c["call_latency_s"]
        phase = median([r["llm_phase_lines_per_s"] for r in runs if r.get("llm_phase_lines_per_s")])
        whole = median([r["lines_per_s"] for r in runs])
        rows.append(
            {
                "measure": f"(c) ours with {IN_FLIGHT} lines in flight, lines/s over the LLM phase vs the ideal "
                f"{IN_FLIGHT} ÷ {c['call_latency_s'] * 1000:.0f} ms",
                "ours": fmt(phase, "", 1),
                "peer": f"ideal {ideal:,.1f}",
                "ratio": fmt(phase / ideal if runs else None, "×"),
                "target": "≥ 0.9×",
                "pass": bool(runs) and phase / ideal >= 0.9,
            }
        )
        peak = max([r["monitor"]["peak_tree_rss_mb"] for r in runs], default=None)
        procs = max([r["monitor"]["peak_procs"] for r in runs], default=None)
        runners = max([r["monitor"].get("peak_by_kind", {}).get("runner", 0) for r in runs], default=None)
        inflight = max([r["fake_llm"]["max_inflight"] for r in runs], default=None)
        peer_peak = max([r["monitor"]["peak_tree_rss_mb"] for r in c["peer"]], default=None)
        rows.append(
            {
                "measure": f"(c) ours with {IN_FLIGHT} in flight: peak tree memory (max of runs)",
                "ours": fmt(peak, " MB", 0),
                "peer": f"{fmt(peer_peak, ' MB', 0)} (4 workers)",
                "ratio": "",
                "target": "< 500 MB",
                "pass": peak is not None and peak < 500,
            }
        )
        rows.append(
            {
                "measure": f"(c) ours with {IN_FLIGHT} in flight: runner processes (all processes, with the CLI "
                "and the fork server) / fake LLM max in flight",
                "ours": f"{runners} ({procs}) / {inflight}",
                "peer": "4 workers (8) / 4",
                "ratio": "",
                "target": f"1 runner / {IN_FLIGHT}",
                "pass": runners == 1 and inflight == IN_FLIGHT,
            }
        )
        ref = c.get("sdk_reference")
        if ref:
            notes.append(
                f"(c) reference, measured in the same run: a bare asyncio loop making the same {BATCH_LINES:,} "
                f"calls {IN_FLIGHT} at a time through the openai SDK (aiohttp transport, no engine) reaches "
                f"{ref['calls_per_s']:.1f} calls/s = {ref['calls_per_s'] / ideal:.2f}× the ideal, at "
                f"{ref['cpu_ms_per_call']:.2f} ms CPU a call; ours over the LLM phase is "
                f"{fmt(phase / ref['calls_per_s'] if runs else None, '×')} that."
            )
        notes.append(
            f"(c) ours with {IN_FLIGHT} in flight, whole `run create` process: {fmt(whole, ' lines/s', 1)} "
            f"= {fmt(whole / ideal if runs else None, '×')} the ideal (start-up and the last partial "
            "wave included)."
        )
        for label, key in (
            ("ours default", "ours_default"),
            (f"ours {IN_FLIGHT}", "ours_128"),
            ("prompt flow", "peer"),
        ):
            for r in c[key]:
                if r.get("answers") and c["peer"] and c["peer"][0].get("answers"):
                    same = sum(x == y for x, y in zip(r["answers"], c["peer"][0]["answers"], strict=False))
                    notes.append(
                        f"(c) {label} {r['name']}: {same}/{len(r['answers'])} answers identical to prompt flow's."
                    )
                    break
    return rows, notes


def sample_table(raw: Mapping[str, Any]) -> list[str]:
    """Every sample, one table row each."""
    lines = [
        "| measure | tool | run | wall s | lines/s | LLM phase lines/s | CPU s (of which fork server side) | "
        "fake LLM CPU s | peak tree RSS MB | procs (runners) | "
        "fake max in flight | rows out | rc |",
        "|" + "---|" * 13,
    ]

    def add(
        measure: str, tool: str, run: str, m: Mapping[str, Any], r: Mapping[str, Any] | None = None
    ) -> None:
        r = r or {}
        fake = r.get("fake_llm") or {}
        lines.append(
            f"| {measure} | {tool} | {run} | {m['wall_s']:.3f} | {fmt(r.get('lines_per_s'), '', 1)} | "
            f"{fmt(r.get('llm_phase_lines_per_s'), '', 1)} | {m['cpu_s']:.2f} ({m.get('extra_cpu_s', 0):.2f}) | "
            f"{fmt(r.get('fake_llm_cpu_s'))} | {m['peak_tree_rss_mb']:.0f} | "
            f"{m['peak_procs']} ({(m.get('peak_by_kind') or {}).get('runner', '-')}) | "
            f"{fake.get('max_inflight', '')} | {r.get('rows_out', '')} | {m['rc']} |"
        )

    a = raw.get("a") or {}
    for tool, key in (
        ("Flow Studio warm", "ours"),
        ("Flow Studio cold", "ours_cold"),
        ("prompt flow", "peer"),
    ):
        for i, m in enumerate(a.get(key, [])):
            add("(a) flow test", tool, str(i + 1), m)
    for measure, part, keys in (
        ("(b) python batch", "b", (("Flow Studio", "ours"), ("prompt flow", "peer"))),
        (
            "(c) LLM batch",
            "c",
            (
                ("Flow Studio default", "ours_default"),
                (f"Flow Studio {IN_FLIGHT} in flight", "ours_128"),
                ("prompt flow default", "peer"),
            ),
        ),
    ):
        for tool, key in keys:
            for i, r in enumerate((raw.get(part) or {}).get(key, [])):
                add(measure, tool, str(i + 1), r["monitor"], r)
    return lines


def write_report(raw: dict[str, Any]) -> Path:
    """Write engine.json (raw) and engine.md (table) under bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(raw))
    for part in ("b", "c"):
        for runs in (slim.get(part) or {}).values():
            if isinstance(runs, list):
                for r in runs:
                    r.pop("answers", None)
    (RESULTS / "engine.json").write_text(json.dumps(slim, indent=2) + "\n")
    rows, notes = summarize(raw)
    info = raw["machine"]
    peer_versions = info.get("peer", {})
    lines = [
        "# Engine benchmark: Flow Studio against prompt flow, side by side",
        "",
        f"Run {info['date']} by `make bench-engine` ({raw['elapsed_s']:.0f} s). Machine: {info['cpu']}, "
        f"{info['cpu_count']} CPUs, {info['memory_gb']} GB, Linux {info['kernel']}; load average (1, 5, 15 min) "
        f"{info.get('load_start')} at the start, {info.get('load_end')} at the end (other work on the machine "
        "slows both tools alike, and CPU seconds are in the sample table).",
        f"Flow Studio {info['ours'].get('flowstudio', '?')} (Python {info['python_ours']}, openai "
        f"{info['ours'].get('openai', '?')}); prompt flow {peer_versions.get('promptflow', '?')} (Python "
        f"{info.get('python_peer', '?')}, promptflow-tools {peer_versions.get('promptflow-tools', '?')}, openai "
        f"{peer_versions.get('openai', '?')}).",
        f"Fake LLM: tests/fakellm.py on loopback; batches at {LLM_TIMING['latency_ms']} ms to first token + "
        f"{LLM_TIMING['tokens']} chunks × {LLM_TIMING['token_ms']} ms; `flow test` with an immediate answer.",
    ]
    if raw.get("peer_reused"):
        lines.append(
            f"Prompt flow's figures were reused from the run of {raw['peer_reused']} (`--reuse-peer`)."
        )
    lines += [
        "",
        "| measure | Flow Studio | prompt flow | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['measure']} | {r['ours']} | {r['peer']} | {r['ratio']} | {r['target']} | "
            f"{'PASS' if r['pass'] else 'FAIL'} |"
        )
    lines += ["", *[f"- {n}" for n in notes], "", "## Every sample", "", *sample_table(raw), ""]
    path = RESULTS / "engine.md"
    path.write_text("\n".join(lines))
    return path


# -- main --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pf",
        type=Path,
        default=Path(os.environ.get("BENCH_PF", DEFAULT_PF)),
        help="prompt flow's pf (default /tmp/pfpeer/bin/pf, or $BENCH_PF)",
    )
    ap.add_argument(
        "--reps", type=int, default=5, help="runs of each of our measures (a: this many; b, c: 3)"
    )
    ap.add_argument("--peer-reps", type=int, default=3, help="prompt flow runs of (a) and (b); (c) runs once")
    ap.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument(
        "--reuse-peer",
        action="store_true",
        help="do not run prompt flow; reuse its figures from the last bench/results/engine.json",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (logs of every command)")
    args = ap.parse_args(argv)
    only = {p.strip() for p in args.only.split(",") if p.strip()}

    previous = None
    if args.reuse_peer:
        prev_path = RESULTS / "engine.json"
        previous = json.loads(prev_path.read_text()) if prev_path.exists() else None
        if previous is None:
            ap.error("--reuse-peer needs an earlier bench/results/engine.json")
    elif not args.pf.exists():
        ap.error(
            f"prompt flow's pf not found at {args.pf}: run /work/shared/bench/peer_bench.sh setup, or pass --pf"
        )

    scratch = Path(tempfile.mkdtemp(prefix="flowstudio-bench-"))
    (scratch / "logs").mkdir()
    flows = scratch / "flows"
    shutil.copytree(HERE / "flows", flows, ignore=shutil.ignore_patterns(".promptflow", "__pycache__"))
    data = write_questions(BATCH_LINES, scratch / f"data_{BATCH_LINES}.jsonl")
    log(f"scratch folder {scratch}")
    fake = FakeLLM(scratch)
    log(f"fake LLM on {fake.url}")
    ours, peer_tool = make_tools(args, scratch)
    try:
        peer = None if args.reuse_peer else peer_tool
        setup_connections(ours, peer_tool, fake, flows, skip_peer=peer is None)
        raw: dict[str, Any] = {"machine": versions(args, ours, peer_tool, skip_peer=peer is None)}
        if previous is not None:
            raw["machine"]["python_peer"] = previous["machine"].get("python_peer")
            raw["machine"]["peer"] = previous["machine"].get("peer", {})
            raw["peer_reused"] = previous.get("peer_reused") or previous["machine"]["date"]
        reps_batch = min(args.reps, 3)
        if "a" in only:
            raw["a"] = measure_flow_test(ours, peer, fake, flows, args.reps, args.peer_reps)
        raw.update(measure_batches(ours, peer, fake, flows, data, reps_batch, args.peer_reps, only))
        if previous is not None:
            for part, key in (("a", "peer"), ("b", "peer"), ("c", "peer")):
                if part in raw and part in previous:
                    raw[part][key] = previous[part][key]
                    if part == "a":
                        raw["a"]["peer_output"] = previous["a"].get("peer_output")
        raw["elapsed_s"] = round(time.perf_counter() - T0, 1)
        raw["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        path = write_report(raw)
    finally:
        if ours.fork_server is not None:
            ours.fork_server.stop()
        fake.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    log(f"wrote {path} and {path.with_suffix('.json')}")
    print(path.read_text())
    rows, _ = summarize(raw)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
