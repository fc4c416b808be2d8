"""`flowstudio flow serve` against prompt flow's own `pf flow serve`, recorded in tests/data/serving/.

Each served flow runs for real (`python -m flowengine.cli flow serve` on a free port, a warm runner, the fake
LLM over real HTTP); requests go through httpx exactly as the recorder sent them to prompt flow
(bench/record_pf_serve.py). Bodies, SSE text and status codes must match, save the deliberate differences
named in each assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flowengine.connections import Connection, LocalConnectionStore

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CORPUS = DATA / "flows"
SERVING = DATA / "serving"
RECORDINGS = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(SERVING.glob("*.json"))}
CASES = [(flow, case["name"]) for flow, rec in RECORDINGS.items() for case in rec["cases"]]
# Accept: text/event-stream alone for a flow with no streaming output. Prompt flow runs the flow and answers
# with its error (400) or, when it succeeds, 406; we refuse the Accept before running anything.
REFUSED_BEFORE_RUN = {("error_python_raises", "negative_sse")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connections(fake: Any) -> list[Connection]:
    text = (DATA / "conformance_connections.yaml").read_text(encoding="utf-8")
    text = text.replace("{fake_llm_base_url}", fake.base_url).replace("{fake_llm_url}", fake.url)
    return [
        Connection(
            name=name, type=spec["type"], configs=spec.get("configs", {}), secrets=spec.get("secrets", {})
        )
        for name, spec in yaml.safe_load(text).items()
    ]


@contextlib.contextmanager
def serve_flows(flows: dict[str, Path], home: Path) -> Iterator[dict[str, str]]:
    """Start `flowstudio flow serve` for every flow folder at once; yields name -> base URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTUDIO_")}
    env.update(FLOWSTUDIO_HOME=str(home), FLOWSTUDIO_NO_ZYGOTE="1", PYTHONPATH=str(ROOT))
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name, folder in flows.items():
            port = _free_port()
            cmd = [sys.executable, "-m", "flowengine.cli", "flow", "serve", "--flow", str(folder)]
            cmd += ["--port", str(port)]
            proc = subprocess.Popen(
                cmd, env=env, cwd=str(home), start_new_session=True, stderr=subprocess.PIPE
            )
            procs[name] = (proc, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for name, (proc, url) in procs.items():
            while True:
                assert proc.poll() is None, f"serving {name} exited: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"serving {name} did not start within 60 s"
                time.sleep(0.1)
        yield {name: url for name, (_, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# A flow whose async python node appends a tick to a file every 50 ms for 20 s: the file stops growing
# when its line is cancelled.
SLOW_FLOW = """\
inputs:
  path:
    type: string
outputs:
  ticks:
    type: int
    reference: ${tick.output}
nodes:
- name: tick
  type: python
  source:
    type: code
    path: tick.py
  inputs:
    path: ${inputs.path}
"""
SLOW_TOOL = """\
import asyncio

from promptflow.core import tool


@tool
async def tick(path: str) -> int:
    for i in range(400):
        with open(path, "a") as f:
            f.write(".")
        await asyncio.sleep(0.05)
    return 400
"""


@pytest.fixture(scope="module")
def served(fake_llm_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Every recorded flow served by `flowstudio flow serve`, with the corpus connections in its local store."""
    home = tmp_path_factory.mktemp("fshome")
    store = LocalConnectionStore(home)
    for conn in _connections(fake_llm_server):
        store.create(conn)
    slow = home / "slow_ticker"
    slow.mkdir()
    (slow / "flow.dag.yaml").write_text(SLOW_FLOW, encoding="utf-8")
    (slow / "tick.py").write_text(SLOW_TOOL, encoding="utf-8")
    flows = {name: CORPUS / name for name in RECORDINGS}
    with serve_flows({**flows, "slow_ticker": slow}, home) as urls:
        yield urls


def _client() -> httpx.Client:
    client = httpx.Client(timeout=30)
    client.headers.pop("accept", None)  # recorded requests without Accept must go without it
    return client


def _send(url: str, request: dict[str, Any]) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if request["accept"] is not None:
        headers["Accept"] = request["accept"]
    with _client() as client:
        return client.post(url + "/score", content=request["body"].encode("utf-8"), headers=headers)


@pytest.mark.parametrize(("flow", "case_name"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_score_answers_like_prompt_flow(
    flow: str, case_name: str, served: dict[str, str], fake_llm: Any
) -> None:
    """Same status, content type, JSON body or SSE event sequence as `pf flow serve` gave."""
    case = next(c for c in RECORDINGS[flow]["cases"] if c["name"] == case_name)
    expected = case["response"]
    resp = _send(served[flow], case["request"])
    calls = fake_llm.stats()["requests"]
    if (flow, case_name) in REFUSED_BEFORE_RUN:
        assert resp.status_code == 424
        assert (
            "Media type text/event-stream in Accept header is not acceptable"
            in resp.json()["error"]["message"]
        )
        assert calls == 0
        return
    if expected["status"] == 406:
        # Deliberate: refused with 424 naming 406 (Azure's form), before the flow runs (prompt flow ran it).
        assert resp.status_code == 424
        assert resp.headers["ms-azureml-model-error-statuscode"] == "406"
        body = resp.json()
        assert body["error"]["code"] == expected["json"]["error"]["code"] == "UserError"
        assert body["error"]["message"].startswith(expected["json"]["error"]["message"])
        assert "406" in body["error"]["message"]
        assert calls == 0
        return
    assert resp.status_code == expected["status"], resp.text
    assert resp.headers["content-type"] == expected["content_type"]
    assert calls == expected["llm_calls"]
    if "sse" in expected:
        assert resp.text == expected["sse"]
        return
    body = resp.json()
    want = expected["json"]
    if not (isinstance(want, dict) and "error" in want):
        assert body == want
        return
    assert body["error"]["code"] == want["error"]["code"]
    message, recorded = body["error"]["message"], want["error"]["message"]
    if recorded.startswith("Required input fields"):
        # Deliberate: prompt flow echoes the whole request body into the message; we name the fields only.
        assert message == recorded.split(" in request data")[0] + " in request data."
    elif recorded.startswith("Execution failure in"):
        # The engine words a failing node its own way; node, exception type and message must all be named.
        node, rest = recorded.removeprefix("Execution failure in '").split("': (", 1)
        exc_type, exc_message = rest.split(") ", 1)
        assert f"'{node}'" in message and exc_type in message and exc_message in message
    else:
        assert message == recorded


@pytest.mark.parametrize("flow", sorted(RECORDINGS))
def test_swagger_is_prompt_flows(flow: str, served: dict[str, str]) -> None:
    """/swagger.json is generated as prompt flow generates it (we serve no /feedback, so it is not listed)."""
    expected = dict(RECORDINGS[flow]["swagger"])
    expected["paths"] = {k: v for k, v in expected["paths"].items() if k != "/feedback"}
    with _client() as client:
        assert client.get(served[flow] + "/swagger.json").json() == expected


def test_health_reports_healthy(served: dict[str, str]) -> None:
    """/health answers like prompt flow's, with our version."""
    with _client() as client:
        resp = client.get(served["dag_chat"] + "/health")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == RECORDINGS["dag_chat"]["health"]["content_type"]
    assert resp.json()["status"] == "Healthy"
    assert set(resp.json()) == set(RECORDINGS["dag_chat"]["health"]["json"])


def test_chat_conversation_second_turn_sees_the_first(served: dict[str, str], fake_llm: Any) -> None:
    """A second turn carrying the first in chat_history renders it into the prompt the LLM receives."""
    url = served["dag_chat"]
    with _client() as client:
        first = client.post(
            url + "/score", json={"question": "Hi there"}, headers={"Accept": "application/json"}
        )
        history = [{"inputs": {"question": "Hi there"}, "outputs": first.json()}]
        body = {"question": "And then?", "chat_history": history}
        second = client.post(url + "/score", json=body, headers={"Accept": "text/event-stream"})
    assert second.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = [json.loads(e.removeprefix("data: ")) for e in second.text.split("\n\n") if e]
    assert events[0] == {"turns": 1}
    answer = "".join(e["answer"] for e in events[1:])
    messages = fake_llm.last_body()["messages"]
    assert first.json()["answer"] in json.dumps(messages)
    assert answer == fake_llm.expected_chat(messages)


def test_unacceptable_accept_never_calls_the_llm(served: dict[str, str], fake_llm: Any) -> None:
    """Accept: text/html is refused before the flow runs: 424 naming 406, and the fake LLM sees nothing."""
    with _client() as client:
        resp = client.post(
            served["dag_chat"] + "/score", json={"question": "q"}, headers={"Accept": "text/html"}
        )
    assert resp.status_code == 424
    assert resp.json()["error"]["code"] == "UserError"
    assert "406" in resp.json()["error"]["message"]
    assert fake_llm.stats()["requests"] == 0


def _wait_idle(fake: Any, seconds: float) -> float:
    """Seconds until the fake LLM has no call in flight (fails after `seconds`)."""
    start = time.monotonic()
    while fake.stats()["inflight"]:
        assert time.monotonic() - start < seconds, "the LLM call was still running"
        time.sleep(0.05)
    return time.monotonic() - start


def test_sse_client_that_disconnects_stops_the_llm_stream(served: dict[str, str], fake_llm: Any) -> None:
    """Closing an SSE response mid-stream cancels the line: the LLM stream is abandoned within 2 s."""
    fake_llm.config(latency_ms=0, token_ms=100, tokens=200)  # a 20 s answer
    with _client() as client:
        body = {"question": "tell me a long story"}
        with client.stream(
            "POST", served["dag_chat"] + "/score", json=body, headers={"Accept": SSE_}
        ) as resp:
            lines = resp.iter_lines()
            seen = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: ") for line in seen)
            assert fake_llm.stats()["inflight"] == 1
    assert _wait_idle(fake_llm, 2.0) < 2.0


def test_json_client_that_disconnects_stops_the_line(served: dict[str, str], tmp_path: Path) -> None:
    """A JSON request abandoned before its answer cancels its line in the runner within 2 s."""
    ticks = tmp_path / "ticks.txt"
    with _client() as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                served["slow_ticker"] + "/score",
                json={"path": str(ticks)},
                headers={"Accept": "application/json"},
                timeout=httpx.Timeout(30, read=1.0),
            )
    assert ticks.stat().st_size > 0
    time.sleep(2.0)
    stopped_at = ticks.stat().st_size
    time.sleep(0.5)
    assert ticks.stat().st_size == stopped_at, "the line kept running after its client left"
    assert stopped_at < 200


def test_many_concurrent_requests_share_one_warm_runner(served: dict[str, str], fake_llm: Any) -> None:
    """64 requests at once all reach the LLM together through one runner process."""
    # A long first token keeps every call open while all 64 lines are dispatched, even on a busy machine.
    fake_llm.config(latency_ms=1500)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(
                *(client.post(served["dag_chat"] + "/score", json={"question": f"q{i}"}) for i in range(64))
            )

    started = time.monotonic()
    responses = asyncio.run(go())
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 64
    assert fake_llm.stats()["max_inflight"] == 64
    assert elapsed < 6.0


SSE_ = "text/event-stream"


async def test_every_response_names_the_deployment_and_snapshot() -> None:
    """A ScoreApp mounted in-process (as the studio does) tags every answer, errors included."""
    from flowengine.serving import ScoreApp

    app = ScoreApp(CORPUS / "dag_basic", deployment="blue", snapshot="sha256:0123abcd", env_mode="inherit")
    try:
        ok = await app.handle("POST", "/score", [(b"accept", b"application/json")], b'{"text": "a b"}')
        bad = await app.handle("POST", "/score", [], b"[1")
        missing = await app.handle("GET", "/nowhere", [], b"")
        health = await app.handle("GET", "/health", [], b"")
    finally:
        await app.close()
    assert json.loads(ok.body)["words"] == 2
    assert (bad.status, missing.status, health.status) == (400, 404, 200)
    for resp in (ok, bad, missing, health):
        assert ("x-flowstudio-deployment", "blue") in resp.headers
        assert ("x-flowstudio-snapshot", "sha256:0123abcd") in resp.headers


async def test_http_server_refuses_an_oversized_body_before_the_flow_runs() -> None:
    """The HTTP handler of `flow serve` answers 413 in the error contract for a body over its limit."""
    from aiohttp import web

    from flowengine.serving import ScoreApp, http_handler

    app = ScoreApp(CORPUS / "dag_basic", env_mode="inherit")
    server = web.Server(http_handler(app, max_body=64), handler_cancellation=True, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            big = await client.post(url + "/score", json={"text": "word " * 100})
            ok = await client.post(url + "/score", json={"text": "a b"})
            head = await client.head(url + "/health")
    finally:
        listener.close()
        await server.shutdown(1.0)
        await app.close()
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "UserError"
    assert "64 bytes" in big.json()["error"]["message"]
    assert (ok.status_code, ok.headers["content-type"], ok.json()["words"]) == (200, "application/json", 2)
    assert (head.status_code, head.content) == (200, b"")


def test_serve_refuses_a_concurrency_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`flow serve --concurrency 0` fails at once, naming the option."""
    from flowengine.cli import main

    assert main(["flow", "serve", "--flow", str(CORPUS / "dag_basic"), "--concurrency", "0"]) == 1
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_runner_pool_sizes_sync_threads_for_io_bound_lines() -> None:
    """A serving pool lets many lines wait in sync tools at once, bounded by its lines in flight."""
    from flowengine.serving import DEFAULT_SYNC_THREADS, RunnerPool

    assert RunnerPool(CORPUS / "dag_basic").runner_kw["max_concurrency"] == DEFAULT_SYNC_THREADS
    assert RunnerPool(CORPUS / "dag_basic", concurrency=4).runner_kw["max_concurrency"] == 4
    assert RunnerPool(CORPUS / "dag_basic", sync_threads=2).runner_kw["max_concurrency"] == 2
