"""Record prompt flow 1.18.5's own `pf flow serve` answers for the serving contract tests.

Usage (from the repository root, with the project's interpreter):

    .venv/bin/python bench/record_pf_serve.py [--engine fastapi|flask] [FLOW_NAME ...]

Prompt flow must be installed in its own virtualenv (/tmp/pfpeer, or $PF_VENV; see bench/README.md), with
`uvicorn` for its FastAPI engine. The script serves `tests/fakellm.py` with the test suite's timing (no latency,
5 tokens), creates the corpus connections of `tests/data/conformance_connections.yaml` in a throw-away prompt
flow home, starts `pf flow serve` on a temporary copy of each flow and replays the requests below: a chat
conversation (a first turn, then a second one carrying the first in `chat_history`) with `Accept` JSON and SSE,
bad bodies (invalid JSON, a JSON array, a missing input), unacceptable `Accept` headers, flow errors,
`/health` and `/swagger.json`. Each flow's answers go to `tests/data/serving/<flow>.json`: status,
content type, the JSON body or the exact SSE text, and how many LLM calls the request caused. Nothing recorded
depends on ports, paths or time, so the files can be committed and the tests never need prompt flow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "flows"
OUT = ROOT / "tests" / "data" / "serving"
CONNECTIONS_FILE = ROOT / "tests" / "data" / "conformance_connections.yaml"
PF_VENV = Path(os.environ.get("PF_VENV", "/tmp/pfpeer"))
PF_VERSION = "1.18.5"
JSON = "application/json"
SSE = "text/event-stream"
NO_ACCEPT = None  # the request carries no Accept header at all

# A case: name, Accept header (None: none sent), and either "json" (a body serialised as JSON) or "raw" (bytes
# sent as they are). "history_from" builds a second chat turn from the JSON answer of an earlier case.
FIRST_QUESTION = "What is prompt flow?"
CASES: dict[str, list[dict[str, Any]]] = {
    "dag_chat": [
        {"name": "turn1_json", "accept": JSON, "json": {"question": FIRST_QUESTION}},
        {"name": "turn1_sse", "accept": SSE, "json": {"question": FIRST_QUESTION}},
        {
            "name": "turn2_json",
            "accept": JSON,
            "json": {"question": "Tell me more."},
            "history_from": "turn1_json",
        },
        {
            "name": "turn2_sse",
            "accept": SSE,
            "json": {"question": "Tell me more."},
            "history_from": "turn1_json",
        },
        {"name": "no_accept", "accept": NO_ACCEPT, "json": {"question": FIRST_QUESTION}},
        {"name": "accept_any", "accept": "*/*", "json": {"question": FIRST_QUESTION}},
        {"name": "accept_sse_and_json", "accept": f"{SSE}, {JSON}", "json": {"question": FIRST_QUESTION}},
        {"name": "invalid_json", "accept": JSON, "raw": "this is not json"},
        {"name": "json_array", "accept": JSON, "json": [{"question": FIRST_QUESTION}]},
        {"name": "missing_input", "accept": JSON, "json": {"chat_history": []}},
        {"name": "unacceptable_html", "accept": "text/html", "json": {"question": FIRST_QUESTION}},
        {"name": "unacceptable_plain", "accept": "text/plain", "json": {"question": FIRST_QUESTION}},
    ],
    "dag_llm_chat": [
        {"name": "defaults_json", "accept": JSON, "json": {}},
        {
            "name": "question_json",
            "accept": JSON,
            "json": {"question": "How do rivers form?", "style": "detailed"},
        },
        {"name": "sse_only_no_stream_output", "accept": SSE, "json": {}},
        {"name": "sse_and_json_no_stream_output", "accept": f"{SSE}, {JSON}", "json": {}},
        {"name": "invalid_json", "accept": JSON, "raw": "{not json"},
        {"name": "json_array", "accept": JSON, "json": []},
        {"name": "unacceptable_html", "accept": "text/html", "json": {}},
    ],
    "flex_generator": [
        {"name": "json", "accept": JSON, "json": {"word": "tick"}},
        {"name": "sse", "accept": SSE, "json": {"word": "x", "n": 5}},
        {"name": "missing_input", "accept": JSON, "json": {"n": 2}},
        {"name": "invalid_json", "accept": JSON, "raw": "tick"},
        {"name": "unacceptable_html", "accept": "text/html", "json": {"word": "tick"}},
    ],
    "prompty_stream": [
        {"name": "json", "accept": JSON, "json": {"topic": "rain"}},
        {"name": "sse", "accept": SSE, "json": {"topic": "rain"}},
        {"name": "raw_body_single_input", "accept": JSON, "raw": "snow"},
        {"name": "missing_input", "accept": JSON, "json": {}},
    ],
    "error_python_raises": [
        {"name": "ok", "accept": JSON, "json": {"divisor": 4}},
        {"name": "zero", "accept": JSON, "json": {}},
        {"name": "negative", "accept": JSON, "json": {"divisor": -3}},
        {"name": "negative_sse", "accept": SSE, "json": {"divisor": -3}},
    ],
}


# Prompt flow 1.18.5's FastAPI engine fails every prompty call (SystemError "'PromptyExecutor' object has no
# attribute '_func_async'"), so prompty flows are recorded with its default Flask engine.
ENGINES = {"prompty_stream": "flask"}
DEFAULT_ENGINE = "fastapi"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 120.0) -> None:
    """Poll `url`/health until it answers 200; raise when the server died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not healthy after {timeout:g} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session: SIGTERM its group, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class PromptFlowHome:
    """A throw-away prompt flow home with the corpus connections pointing at a fake LLM."""

    def __init__(self, fake_url: str, connections_file: Path = CONNECTIONS_FILE) -> None:
        self.pf = PF_VENV / "bin" / "pf"
        if not self.pf.exists():
            raise SystemExit(f"prompt flow is not installed at {PF_VENV} (see bench/README.md)")
        self.home = Path(tempfile.mkdtemp(prefix="pfhome-serve-"))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PROMPTFLOW_"))}
        self.env = dict(
            base,
            PF_HOME_DIRECTORY=str(self.home),
            PF_DISABLE_TRACING="true",
            PROMPTFLOW_DISABLE_TELEMETRY="true",
            PYTHONUNBUFFERED="1",
        )
        self.run(["config", "set", "telemetry.enabled=false", "trace.destination=none"])
        self.create_connections(fake_url, connections_file)

    def run(self, args: list[str]) -> str:
        """Run a `pf` command in this home; its stdout."""
        done = subprocess.run(
            [str(self.pf), *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"pf {' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
        return done.stdout

    def create_connections(self, fake_url: str, connections_file: Path) -> None:
        """`pf connection create` for every connection of the corpus file, placeholders replaced."""
        text = connections_file.read_text(encoding="utf-8")
        text = text.replace("{fake_llm_base_url}", fake_url + "/v1").replace("{fake_llm_url}", fake_url)
        for name, spec in (yaml.safe_load(text) or {}).items():
            doc: dict[str, Any] = {"name": name, "type": spec["type"]}
            if spec["type"] == "custom":
                doc["configs"] = spec.get("configs", {})
                doc["secrets"] = spec.get("secrets", {})
            else:
                doc.update(spec.get("configs", {}))
                doc.update(spec.get("secrets", {}))
            path = self.home / f"{name}.yaml"
            path.write_text(yaml.safe_dump(doc), encoding="utf-8")
            self.run(["connection", "create", "--file", str(path)])

    @contextlib.contextmanager
    def serve(self, flow_dir: Path, engine: str) -> Iterator[str]:
        """`pf flow serve` on a copy of `flow_dir`; yields its base URL and stops it afterwards."""
        scratch = Path(tempfile.mkdtemp(prefix="pfserve-"))
        copy = scratch / flow_dir.name
        shutil.copytree(flow_dir, copy, ignore=shutil.ignore_patterns("expected.json", "cases.json"))
        port = free_port()
        log = (scratch / "serve.log").open("wb")
        cmd = [str(self.pf), "flow", "serve", "--source", str(copy), "--port", str(port)]
        cmd += ["--host", "127.0.0.1", "--engine", engine, "--skip-open-browser"]
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            yield url
        except RuntimeError:
            log.flush()
            sys.stderr.write((scratch / "serve.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            stop_process(proc)
            log.close()
            shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        """Stop prompt flow's background service and remove the home."""
        with contextlib.suppress(Exception):
            subprocess.run([str(self.pf), "service", "stop"], env=self.env, capture_output=True, timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


def build_request(case: Mapping[str, Any], answers: Mapping[str, Any]) -> dict[str, Any]:
    """The request of a case as recorded: accept and the exact body text (a second turn gets its history)."""
    if "raw" in case:
        body_text = str(case["raw"])
    else:
        body = case["json"]
        if case.get("history_from"):
            first = answers[case["history_from"]]
            previous = {"question": FIRST_QUESTION}
            body = dict(body, chat_history=[{"inputs": previous, "outputs": {"answer": first["answer"]}}])
        body_text = json.dumps(body)
    return {"accept": case.get("accept"), "body": body_text}


def send(client: httpx.Client, url: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """POST one recorded request to `url`/score; status, content type and the body (JSON, SSE or text)."""
    headers = {"Content-Type": "application/json"}
    if request["accept"] is not None:
        headers["Accept"] = request["accept"]
    resp = client.post(url + "/score", content=request["body"].encode("utf-8"), headers=headers)
    return describe(resp.status_code, resp.headers.get("content-type", ""), resp.text)


def describe(status: int, content_type: str, text: str) -> dict[str, Any]:
    """A response as recorded: SSE bodies keep their exact text, JSON bodies are parsed."""
    out: dict[str, Any] = {"status": status, "content_type": content_type}
    if content_type.startswith(SSE):
        out["sse"] = text
    else:
        try:
            out["json"] = json.loads(text)
        except ValueError:
            out["text"] = text
    return out


def plain_client() -> httpx.Client:
    """A client that sends no Accept header unless a request names one."""
    client = httpx.Client(timeout=60)
    client.headers.pop("accept", None)
    return client


def fake_calls(fake: Any) -> int:
    """How many LLM calls the fake has seen since its last reset."""
    return int(fake.stats()["requests"])


def record_flow(home: PromptFlowHome, fake: Any, name: str, engine: str) -> dict[str, Any]:
    """Serve one flow with prompt flow and record every case of it."""
    flow_dir = CORPUS / name
    record: dict[str, Any] = {
        "flow": name,
        "recorded_with": f"promptflow {PF_VERSION}, pf flow serve --engine {engine}",
        "cases": [],
    }
    answers: dict[str, Any] = {}
    with home.serve(flow_dir, engine) as url, plain_client() as client:
        health = client.get(url + "/health")
        record["health"] = describe(health.status_code, health.headers.get("content-type", ""), health.text)
        swagger = client.get(url + "/swagger.json")
        record["swagger"] = swagger.json()
        for case in CASES[name]:
            request = build_request(case, answers)
            fake.reset()
            response = send(client, url, request)
            response["llm_calls"] = fake_calls(fake)
            if "json" in response:
                answers[case["name"]] = response["json"]
            record["cases"].append({"name": case["name"], "request": request, "response": response})
            print(f"{name}:{case['name']}: {response['status']} {response['content_type']}", file=sys.stderr)
    return record


def main() -> int:
    """Record every flow named (default: all of CASES) into tests/data/serving/."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("flows", nargs="*", help=f"default: {' '.join(CASES)}")
    parser.add_argument("--engine", choices=("fastapi", "flask"), help="default: fastapi (flask for prompty)")
    args = parser.parse_args()
    names = args.flows or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"no recorded cases for {', '.join(unknown)}; known: {', '.join(CASES)}")
    sys.path.insert(0, str(ROOT))
    from tests.fakellm import TEST_CONFIG, FakeLLMServer

    fake = FakeLLMServer(TEST_CONFIG).start()
    home = PromptFlowHome(fake.url)
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        for name in names:
            record = record_flow(home, fake, name, args.engine or ENGINES.get(name, DEFAULT_ENGINE))
            text = json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
            text = text.replace(fake.url, "{fake_llm_url}")
            (OUT / f"{name}.json").write_text(text, encoding="utf-8")
    finally:
        home.close()
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
