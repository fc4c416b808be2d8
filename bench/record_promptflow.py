"""Record prompt flow 1.18.5's own results for the conformance corpus in tests/data/flows/.

Usage (from the repository root, with the project's interpreter):

    .venv/bin/python bench/record_promptflow.py [FLOW_NAME ...]

The script installs prompt flow into a separate virtualenv (/tmp/pfpeer, or $PF_VENV) unless it is already
there, starts the fake LLM server from tests/fakellm.py with the test suite's timing (no latency, 5 tokens),
and then runs itself inside that virtualenv (`--inside`) to drive prompt flow's Python SDK:
`PFClient.flows._test` for every flow test case, `PFClient.run` + `get_details` + `get_metrics` for every batch
case, and `flows.validate` plus a test call for invalid flows. Each flow's results go to
`tests/data/flows/<name>/expected.json`, written deterministically (sorted keys, no timestamps, ports or
absolute paths) so the recordings can be committed and the test suite never needs prompt flow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "flows"
CONNECTIONS_FILE = ROOT / "tests" / "data" / "conformance_connections.yaml"
PF_VERSION = "1.18.5"
PF_VENV = Path(os.environ.get("PF_VENV", "/tmp/pfpeer"))
PF_PACKAGES = [f"promptflow=={PF_VERSION}", "promptflow-tools", "keyrings.alt"]
URL_TOKEN = "{fake_llm_url}"
BASE_URL_TOKEN = "{fake_llm_base_url}"


# ----------------------------------------------------------------------------------------------------------
# Outside prompt flow's virtualenv: install it, start the fake LLM, hand over.
# ----------------------------------------------------------------------------------------------------------


def ensure_promptflow() -> Path:
    """Create the prompt flow virtualenv if it is missing or holds another version; return its python."""
    python = PF_VENV / "bin" / "python"
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('promptflow'))"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == PF_VERSION:
            return python
    print(f"installing prompt flow {PF_VERSION} into {PF_VENV}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PF_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PF_PACKAGES], check=True)
    return python


def pf_environment(pf_home: Path) -> dict[str, str]:
    """The environment prompt flow runs in: its own home folder, no tracing, no telemetry."""
    env = dict(os.environ)
    env.update(
        {
            "PF_HOME_DIRECTORY": str(pf_home),
            "PF_DISABLE_TRACING": "true",
            "PROMPTFLOW_DISABLE_TELEMETRY": "true",
            "PF_WORKER_COUNT": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def outside(flow_names: list[str]) -> int:
    """Install/reuse prompt flow, serve the fake LLM and run the recording inside prompt flow's venv."""
    sys.path.insert(0, str(ROOT))
    from tests.fakellm import TEST_CONFIG, FakeLLMServer

    python = ensure_promptflow()
    pf_home = Path(tempfile.mkdtemp(prefix="pfhome-corpus-"))
    env = pf_environment(pf_home)
    pf_cli = str(PF_VENV / "bin" / "pf")
    # The local trace service would otherwise be started in the background by the first test.
    subprocess.run(
        [pf_cli, "config", "set", "telemetry.enabled=false", "trace.destination=none"],
        env=env,
        capture_output=True,
    )
    server = FakeLLMServer(TEST_CONFIG).start()
    try:
        cmd = [str(python), str(Path(__file__).resolve()), "--inside", "--fake-url", server.url, *flow_names]
        return subprocess.run(cmd, env=env, cwd=str(ROOT)).returncode
    finally:
        server.stop()
        subprocess.run([pf_cli, "service", "stop"], env=env, capture_output=True)
        shutil.rmtree(pf_home, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Inside prompt flow's virtualenv.
# ----------------------------------------------------------------------------------------------------------


class Recorder:
    """Drives prompt flow's SDK over the corpus and writes expected.json files."""

    def __init__(self, fake_url: str, corpus: Path) -> None:
        from promptflow.client import PFClient

        self.fake_url = fake_url
        self.corpus = corpus
        self.pf = PFClient()
        self.batch_runs: dict[tuple[str, str], str] = {}
        self.create_connections()

    # -- helpers ---------------------------------------------------------------------------------------

    def substitute(self, value: Any) -> Any:
        """Replace the fake LLM placeholders in strings, recursively."""
        if isinstance(value, str):
            return value.replace(BASE_URL_TOKEN, self.fake_url + "/v1").replace(URL_TOKEN, self.fake_url)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value

    def scrub(self, value: Any, flow_dir: Path | None = None) -> Any:
        """Make a recorded value deterministic: no ports, absolute paths or NaN."""
        if isinstance(value, str):
            value = value.replace(self.fake_url + "/v1", BASE_URL_TOKEN).replace(self.fake_url, URL_TOKEN)
            if flow_dir is not None:
                value = value.replace(str(flow_dir.resolve()), "<flow>")
            value = value.replace(str(self.corpus.resolve()), "<corpus>")
            # Tracebacks name files by absolute path (prompt flow's own and temporary copies of the flow).
            value = re.sub(r'File "([^"]*/)?([^"/]+)"', r'File "\2"', value)
            value = re.sub(r"/tmp/[^\s'\"]*", "<tmp>", value)
            return value
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, list | tuple):
            return [self.scrub(v, flow_dir) for v in value]
        if isinstance(value, dict):
            return {str(k): self.scrub(v, flow_dir) for k, v in value.items()}
        return value

    def create_connections(self) -> None:
        """Create the corpus connections in prompt flow's local store, pointing at the fake LLM."""
        from promptflow._utils.yaml_utils import load_yaml_string
        from promptflow.entities import AzureOpenAIConnection, CustomConnection, OpenAIConnection

        specs = self.substitute(load_yaml_string(CONNECTIONS_FILE.read_text()))
        for name, spec in specs.items():
            configs, secrets = spec.get("configs", {}), spec.get("secrets", {})
            if spec["type"] == "open_ai":
                conn: Any = OpenAIConnection(name=name, **secrets, **configs)
            elif spec["type"] == "azure_open_ai":
                conn = AzureOpenAIConnection(name=name, **secrets, **configs)
            elif spec["type"] == "custom":
                conn = CustomConnection(name=name, secrets=secrets, configs=configs)
            else:
                raise ValueError(
                    f"{CONNECTIONS_FILE.name}: connection {name!r}: unknown type {spec['type']!r}"
                )
            self.pf.connections.create_or_update(conn)

    def fake(self, path: str, body: dict | None = None) -> Any:
        """Call one of the fake LLM's control endpoints."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.fake_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def llm_requests(self) -> list[dict[str, Any]]:
        """The requests the fake LLM saw since the last reset, in a stable order."""
        seen = [{"path": r["path"], "body": r["body"]} for r in self.fake("/requests")]
        return sorted(seen, key=lambda r: json.dumps(r, sort_keys=True))

    @contextmanager
    def environment(self, env: Mapping[str, str]) -> Iterator[None]:
        """Set the case's process environment variables for the duration of a call."""
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: str(self.substitute(v)) for k, v in env.items()})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @staticmethod
    def flow_source(flow_dir: Path) -> Path:
        """What prompt flow is pointed at: the folder, or the single .prompty file."""
        if (flow_dir / "flow.dag.yaml").exists() or (flow_dir / "flow.flex.yaml").exists():
            return flow_dir
        prompty = sorted(flow_dir.glob("*.prompty"))
        return prompty[0] if len(prompty) == 1 else flow_dir

    def error_summary(self, error: Mapping[str, Any] | None, flow_dir: Path) -> dict[str, Any] | None:
        """The stable parts of a prompt flow error dict: code chain, message, user exception."""
        if not error:
            return None
        chain = []
        inner = error.get("innerError")
        while isinstance(inner, dict):
            chain.append(inner.get("code"))
            inner = inner.get("innerError")
        summary: dict[str, Any] = {
            "code": error.get("code"),
            "inner_codes": chain,
            "message": error.get("message"),
            "type": (error.get("debugInfo") or {}).get("type"),
        }
        for info in error.get("additionalInfo") or []:
            if info.get("type") == "ToolExecutionErrorDetails":
                details = info.get("info") or {}
                summary["user_error"] = {
                    "type": details.get("type"),
                    "message": details.get("message"),
                    "traceback": details.get("traceback"),
                }
        return self.scrub(summary, flow_dir)

    def exception_summary(self, exc: BaseException, flow_dir: Path) -> dict[str, Any]:
        """The class, error codes and message of an exception prompt flow raised."""
        codes = getattr(exc, "error_codes", None)
        return self.scrub(
            {
                "raised": type(exc).__name__,
                "error_codes": list(codes) if codes else None,
                "message": str(exc),
            },
            flow_dir,
        )

    # -- flow tests -----------------------------------------------------------------------------------

    def record_test(self, flow_dir: Path, case: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
        """Run one `pf flow test` equivalent and return what it produced."""
        self.fake("/stats/reset", {})
        inputs = case.get("inputs")
        record: dict[str, Any] = {}
        with self.environment(env):
            try:
                result = self.pf.flows._test(
                    flow=self.flow_source(flow_dir),
                    inputs=inputs,
                    variant=case.get("variant"),
                    node=case.get("node"),
                    init=case.get("init"),
                    stream_log=False,
                    stream_output=False,
                    allow_generator_output=True,
                )
            except Exception as exc:
                record["status"] = "Raised"
                record["exception"] = self.exception_summary(exc, flow_dir)
                record["llm_requests"] = self.scrub(self.llm_requests())
                return record
            output = result.output
            streamed: list[str] = []
            if isinstance(output, dict):
                resolved = {}
                for key, value in output.items():
                    if _is_stream(value):
                        streamed.append(key)
                        value = "".join(str(chunk) for chunk in value)
                    resolved[key] = value
                output = resolved
            elif _is_stream(output):
                streamed.append("")
                output = "".join(str(chunk) for chunk in output)
        record["status"] = str(getattr(result.run_info.status, "value", result.run_info.status))
        record["output"] = self.scrub(_jsonable(output), flow_dir)
        record["streamed_outputs"] = streamed
        record["error"] = self.error_summary(result.run_info.error, flow_dir)
        node_runs = getattr(result, "node_run_infos", None) or {}
        record["node_status"] = {
            name: str(getattr(info.status, "value", info.status)) for name, info in sorted(node_runs.items())
        }
        record["llm_requests"] = self.scrub(self.llm_requests())
        return record

    # -- batch runs -----------------------------------------------------------------------------------

    def record_batch(
        self, flow_dir: Path, batch: Mapping[str, Any], env: Mapping[str, str]
    ) -> tuple[str | None, dict[str, Any]]:
        """Run one batch (or evaluation) run; return its run name and its details, line states and metrics."""
        from promptflow._sdk.operations._local_storage_operations import LocalStorageOperations

        base = batch.get("base")
        base_run = None
        if base:
            base_run = self.batch_runs.get((base["flow"], base["batch"]))
            if base_run is None:
                base_dir = self.corpus / base["flow"]
                base_case = json.loads((base_dir / "cases.json").read_text())
                base_batch = next(b for b in base_case["batches"] if b["name"] == base["batch"])
                base_run, _ = self.record_batch(base_dir, base_batch, base_case.get("env") or {})
        name = f"corpus_{flow_dir.name}_{batch['name']}_{uuid.uuid4().hex[:8]}"
        record: dict[str, Any] = {}
        with self.environment(env):
            try:
                run = self.pf.run(
                    flow=str(self.flow_source(flow_dir)),
                    data=str((flow_dir / batch["data"]).resolve()),
                    column_mapping=batch.get("column_mapping") or None,
                    variant=batch.get("variant"),
                    init=batch.get("init"),
                    run=base_run,
                    name=name,
                    stream=False,
                )
            except Exception as exc:
                record["status"] = "Raised"
                record["exception"] = self.exception_summary(exc, flow_dir)
                return None, record
        run = self.pf.runs.get(name)
        storage = LocalStorageOperations(run)
        record["status"] = str(run.status)
        if run.status != "Completed":
            exc_dict = storage.load_exception()
            record["error"] = self.error_summary(exc_dict, flow_dir) if exc_dict else None
            return name, record
        try:
            details = self.pf.get_details(run, all_results=True)
        except Exception as exc:  # prompt flow's own get_details breaks on some failed lines
            record["details_exception"] = self.exception_summary(exc, flow_dir)
        else:
            record["details"] = self.scrub(json.loads(details.to_json(orient="records")), flow_dir)
            record["details_columns"] = list(details.columns)
        flow_runs = sorted(storage.load_detail().get("flow_runs", []), key=lambda r: r.get("index", 0))
        record["lines"] = [
            {
                "line_number": fr.get("index"),
                "status": fr.get("status"),
                "output": self.scrub(fr.get("output"), flow_dir),
                "error": self.error_summary(fr.get("error"), flow_dir),
            }
            for fr in flow_runs
        ]
        record["metrics"] = self.scrub(self.pf.get_metrics(run), flow_dir)
        self.batch_runs[(flow_dir.name, batch["name"])] = name
        return name, record

    # -- invalid flows --------------------------------------------------------------------------------

    def record_invalid(self, flow_dir: Path, case: Mapping[str, Any]) -> dict[str, Any]:
        """What `pf flow validate` says and what a flow test raises for an invalid flow."""
        record: dict[str, Any] = {}
        try:
            result = self.pf.flows.validate(flow=str(self.flow_source(flow_dir)))
            record["validate"] = {
                "passed": bool(result.passed),
                "messages": self.scrub(sorted(str(m) for m in result.error_messages.values()), flow_dir)
                if not result.passed
                else [],
                "fields": sorted(result.error_messages.keys()) if not result.passed else [],
            }
        except Exception as exc:
            record["validate"] = {"exception": self.exception_summary(exc, flow_dir)}
        record["tests"] = {
            t["name"]: self.record_test(flow_dir, t, case.get("env") or {}) for t in case["tests"]
        }
        return record

    # -- one flow -------------------------------------------------------------------------------------

    def record_flow(self, flow_dir: Path) -> dict[str, Any]:
        """Everything prompt flow produced for one corpus flow."""
        from promptflow._version import VERSION

        case = json.loads((flow_dir / "cases.json").read_text())
        env = case.get("env") or {}
        out: dict[str, Any] = {"promptflow_version": VERSION, "kind": case["kind"]}
        if case["kind"] == "invalid":
            out.update(self.record_invalid(flow_dir, case))
            return out
        out["tests"] = {t["name"]: self.record_test(flow_dir, t, env) for t in case.get("tests", [])}
        out["batches"] = {b["name"]: self.record_batch(flow_dir, b, env)[1] for b in case.get("batches", [])}
        return out


def _is_stream(value: Any) -> bool:
    """True for the generators/iterators prompt flow returns for streamed outputs."""
    if isinstance(value, str | bytes | dict | list | tuple):
        return False
    return hasattr(value, "__iter__") and hasattr(value, "__next__")


def _jsonable(value: Any) -> Any:
    """Outputs as JSON would carry them (dataclasses and the like through prompt flow's own serializer)."""
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        from promptflow._utils.dataclass_serializer import convert_eager_flow_output_to_dict

        return json.loads(json.dumps(convert_eager_flow_output_to_dict(value)))


def inside(fake_url: str, flow_names: list[str]) -> int:
    """Record every requested corpus flow (all by default) with prompt flow."""
    # Prompt flow writes .promptflow/ folders next to the flows it runs: let it write into a copy.
    work = Path(tempfile.mkdtemp(prefix="pfcorpus-")) / "flows"
    shutil.copytree(
        CORPUS, work, ignore=shutil.ignore_patterns("expected.json", ".promptflow", "__pycache__")
    )
    recorder = Recorder(fake_url, work)
    names = flow_names or sorted(
        p.name for p in CORPUS.iterdir() if p.is_dir() and (p / "cases.json").exists()
    )
    failures = 0
    try:
        for name in names:
            started = time.monotonic()
            try:
                data = recorder.record_flow(work / name)
            except Exception as exc:  # keep going: one broken flow must not hide the others' recordings
                failures += 1
                traceback.print_exc()
                print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            (CORPUS / name / "expected.json").write_text(
                json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            print(f"recorded {name} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    return 1 if failures else 0


def main() -> int:
    """Command line entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("flows", nargs="*", help="corpus flow folder names (default: all)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        return inside(args.fake_url, args.flows)
    return outside(args.flows)


if __name__ == "__main__":
    sys.exit(main())
