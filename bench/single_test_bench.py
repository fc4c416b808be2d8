#!/usr/bin/env python3
"""Single-test benchmark: token latency over the test websocket, and 50 concurrent test sessions.

Runs the real stack: daphne serving studio.asgi (origin check, session auth, flows_app.consumers) on a
scratch STUDIO_DATA_DIR, a scrubbed runner process per socket, the chat template, and the local fake LLM
(tests/fakellm.py) in this process, which stamps the moment it writes each token to its HTTP response. The
websocket clients (aiohttp) run here too, so both stamps come from the same monotonic clock.

  (a) latency: 100 tests one after another on one socket (its runner stays warm, as in a chat), 20 tokens
      each; for every token, fake-LLM write -> websocket client receive. Targets: p50 <= 20 ms, p95 <= 50 ms.
  (b) concurrency: 50 sockets (50 flows) each run one test at the same time; every session must complete
      with no error and receive exactly its own answer, in order, with no message of another test.

Results: bench/results/single_test.md. Exit status 0 only when every target is met.
usage: single_test_bench.py [--tests 100] [--sessions 50] [--tokens 20] [--token-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
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
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "single_test.md"
P50_TARGET_MS = 20.0
P95_TARGET_MS = 50.0
SYSTEM_PROMPT = "You are a helpful assistant."


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _setup_django(scratch: Path) -> None:
    # Settings read the environment once, at import: point them at the scratch folder first.
    os.environ["STUDIO_DATA_DIR"] = str(scratch)
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ.pop(name, None)
    os.environ["STUDIO_ALLOWED_HOSTS"] = "127.0.0.1,localhost,testserver"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _stamped_fake(config: dict[str, Any]) -> Any:
    """The tests' fake LLM server, recording when each content token is written to its response."""
    from aiohttp import web

    from tests.fakellm import FakeLLM, FakeLLMServer

    class StampedFakeLLM(FakeLLM):
        """FakeLLM whose streamed answers note (first token, token) -> monotonic time of the write."""

        def __init__(self, cfg: dict[str, Any]) -> None:
            super().__init__(cfg)
            self.stamps: dict[tuple[str, str], float] = {}

        async def _sse(self, request: web.Request, chunks: Any) -> web.StreamResponse:
            self.st["streamed"] += 1
            resp = web.StreamResponse(
                status=200,
                headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
            )
            await resp.prepare(request)
            first = None
            for delay, chunk in chunks:
                if delay:
                    await asyncio.sleep(delay)
                await resp.write(("data: " + json.dumps(chunk) + "\n\n").encode("utf-8"))
                choices = chunk.get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    first = first or content
                    self.stamps[(first, content)] = time.monotonic()
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    server = FakeLLMServer(config)
    server.fake = StampedFakeLLM(config)
    return server.start()


def _seed(sessions: int, base_url: str) -> tuple[str, list[int]]:
    """A user, a connection to the fake and `sessions` + 1 copies of the chat template; (cookie, flow ids)."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from flows_app.services import connection_create, flow_create, template_files

    user = get_user_model().objects.create_user(username="bench", password="bench-pass-123!")
    connection_create(
        owner=user,
        name="open_ai_connection",
        type="open_ai",
        configs={"base_url": base_url},
        secrets={"api_key": "sk-bench"},
    )
    files = template_files(template="chat")
    flows = [flow_create(owner=user, name=f"chat {i}", files=files).pk for i in range(sessions + 1)]
    client = Client()
    client.force_login(user)
    from django.conf import settings

    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}", flows


def _start_daphne(scratch: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(STUDIO_DATA_DIR=str(scratch), PYTHONUNBUFFERED="1")
    log = open(scratch / "daphne.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "studio.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"daphne did not start:\n{(scratch / 'daphne.log').read_text()[-3000:]}")


class Session:
    """One websocket to the test consumer of one flow."""

    def __init__(self, http: Any, url: str, origin: str, cookie: str) -> None:
        self.http = http
        self.url = url
        self.headers = {"Origin": origin, "Cookie": cookie}
        self.ws: Any = None

    async def open(self) -> None:
        """Connect and read the `ready` message."""
        self.ws = await self.http.ws_connect(self.url, headers=self.headers, max_msg_size=0)
        ready = await self.ws.receive_json(timeout=60)
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")

    async def test(self, question: str) -> dict[str, Any]:
        """Run one test; every message with its receive time."""
        await self.ws.send_json({"action": "run", "inputs": {"question": question, "chat_history": []}})
        received: list[tuple[float, dict[str, Any]]] = []
        while True:
            message = await self.ws.receive_json(timeout=300)
            received.append((time.monotonic(), message))
            if message["type"] in ("done", "refused"):
                break
        return {"question": question, "messages": received}

    async def close(self) -> None:
        """Close the socket (the runner goes with it)."""
        await self.ws.close()


def _check(result: dict[str, Any], tokens: int) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Problems with one test's messages, and its chunks as (first token, token, receive time)."""
    from tests.fakellm import expected_chat_answer

    problems: list[str] = []
    messages = result["messages"]
    started = next((m for _, m in messages if m["type"] == "started"), None)
    done = messages[-1][1]
    if started is None:
        return [f"no test started: {done}"], []
    ids = {m.get("test") for _, m in messages if m["type"] not in ("started",)}
    if ids != {started["test"]}:
        problems.append(f"messages of other tests arrived: {sorted(map(str, ids))}")
    chunks = [(t, m["delta"]) for t, m in messages if m["type"] == "chunk"]
    expected = expected_chat_answer(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": result["question"]}],
        tokens,
    )
    text = "".join(delta for _, delta in chunks)
    if done.get("status") != "Completed":
        problems.append(f"status {done.get('status')}: {done.get('error')}")
    elif text != expected or done["outputs"].get("answer") != expected:
        problems.append(f"answer {text[:40]!r}... is not {expected[:40]!r}...")
    first = chunks[0][1] if chunks else ""
    return problems, [(first, delta, t) for t, delta in chunks]


def _latencies(stamps: dict[tuple[str, str], float], chunks: list[tuple[str, str, float]]) -> list[float]:
    return [(t - stamps[(first, delta)]) * 1000 for first, delta, t in chunks if (first, delta) in stamps]


async def _run(
    args: argparse.Namespace, url: str, origin: str, cookie: str, flows: list[int], fake: Any
) -> dict:
    import aiohttp

    report: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        # (a) latency: sequential tests on one socket.
        fake.config(latency_ms=0, token_ms=args.token_ms, tokens=args.tokens)
        one = Session(http, f"{url}/ws/flows/{flows[0]}/test/", origin, cookie)
        await one.open()
        await one.test("warm up")  # the first test also loads the flow into the socket's runner
        latencies: list[float] = []
        problems: list[str] = []
        started = time.monotonic()
        for i in range(args.tests):
            result = await one.test(f"latency question {i}")
            found, chunks = _check(result, args.tokens)
            problems += found
            latencies += _latencies(fake.fake.stamps, chunks)
        report["latency"] = {
            "tests": args.tests,
            "tokens": len(latencies),
            "p50": _percentile(latencies, 50),
            "p95": _percentile(latencies, 95),
            "p99": _percentile(latencies, 99),
            "max": max(latencies) if latencies else float("nan"),
            "mean": statistics.fmean(latencies) if latencies else float("nan"),
            "seconds": time.monotonic() - started,
            "problems": problems,
        }
        await one.close()

        # (b) concurrency: one test on each of N sockets at once.
        fake.config(latency_ms=50, token_ms=max(args.token_ms, 20), tokens=args.tokens)
        sessions = [Session(http, f"{url}/ws/flows/{flow}/test/", origin, cookie) for flow in flows[1:]]
        opened = time.monotonic()
        # Sockets are opened a few at a time (daphne drops a handshake not accepted within 5 s, and each
        # accept renders the form); the tests then all start at once.
        gate = asyncio.Semaphore(8)

        async def open_gated(session: Session) -> None:
            async with gate:
                await session.open()

        await asyncio.gather(*(open_gated(s) for s in sessions))
        connect_s = time.monotonic() - opened
        started = time.monotonic()
        results = await asyncio.gather(
            *(s.test(f"concurrent question {i}") for i, s in enumerate(sessions)), return_exceptions=True
        )
        wall = time.monotonic() - started
        problems = []
        durations: list[float] = []
        loaded: list[float] = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                problems.append(f"session {i}: {type(result).__name__}: {result}")
                continue
            found, chunks = _check(result, args.tokens)
            problems += [f"session {i}: {p}" for p in found]
            loaded += _latencies(fake.fake.stamps, chunks)
            durations.append((result["messages"][-1][0] - result["messages"][0][0]) * 1000)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        report["concurrency"] = {
            "sessions": len(sessions),
            "connect_s": connect_s,
            "wall_s": wall,
            "completed": len(durations) - len([p for p in problems if "status" in p]),
            "problems": problems,
            "p50_test_ms": _percentile(durations, 50),
            "max_test_ms": max(durations) if durations else float("nan"),
            "token_p50": _percentile(loaded, 50),
            "token_p95": _percentile(loaded, 95),
            "max_inflight": fake.stats().get("max_inflight"),
        }
    return report


def _write(report: dict[str, Any], args: argparse.Namespace, load: tuple[float, float, float]) -> bool:
    lat = report["latency"]
    con = report["concurrency"]
    latency_ok = lat["p50"] <= P50_TARGET_MS and lat["p95"] <= P95_TARGET_MS and not lat["problems"]
    concurrency_ok = not con["problems"]
    mark = {True: "met", False: "NOT met"}
    lines = [
        "# Single test over the websocket",
        "",
        f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by `bench/single_test_bench.py` on "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        "Stack: daphne serving `studio.asgi` (origin check, session auth) → `flows_app.consumers.FlowTestConsumer`"
        " → a scrubbed runner process per socket → the fake LLM (`tests/fakellm.py`, real HTTP and SSE) in the"
        " bench process, which stamps each token as it writes it; aiohttp websocket clients in the same process"
        " stamp each `chunk` message as it arrives (one monotonic clock).",
        "",
        f"## (a) Token latency: fake LLM write → websocket receive — targets {mark[latency_ok]}",
        "",
        f"{lat['tests']} tests one after another on one socket (warm runner), {args.tokens} tokens each, "
        f"{args.token_ms:g} ms between tokens: {lat['tokens']} tokens measured in {lat['seconds']:.1f} s.",
        "",
        "| statistic | ms | target |",
        "|---|---:|---:|",
        f"| p50 | {lat['p50']:.2f} | ≤ {P50_TARGET_MS:g} |",
        f"| p95 | {lat['p95']:.2f} | ≤ {P95_TARGET_MS:g} |",
        f"| p99 | {lat['p99']:.2f} | |",
        f"| mean | {lat['mean']:.2f} | |",
        f"| max | {lat['max']:.2f} | |",
        "",
        f"Problems: {len(lat['problems'])}" + "".join(f"\n- {p}" for p in lat["problems"][:20]),
        "",
        f"## (b) {con['sessions']} concurrent test sessions — {mark[concurrency_ok]}",
        "",
        f"{con['sessions']} sockets (one flow each, one runner each) opened in {con['connect_s']:.1f} s, then one "
        f"test on each at the same time ({args.tokens} tokens, 50 ms to the first, "
        f"{max(args.token_ms, 20):g} ms between): all done in {con['wall_s']:.1f} s; the fake LLM had "
        f"{con['max_inflight']} calls in flight at most.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| sessions completed with exactly their own answer | {con['completed']} / {con['sessions']} |",
        f"| test time p50 (run → done) | {con['p50_test_ms']:.0f} ms |",
        f"| test time max | {con['max_test_ms']:.0f} ms |",
        f"| token latency p50 under this load | {con['token_p50']:.2f} ms |",
        f"| token latency p95 under this load | {con['token_p95']:.2f} ms |",
        "",
        "Each session checks that every message carries its own test id and that its chunks, joined in"
        " order, equal the fake's answer for its own question (the answer starts with a hash of the prompt),"
        " so a token of another session would show.",
        "",
        f"Problems: {len(con['problems'])}" + "".join(f"\n- {p}" for p in con["problems"][:20]),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return latency_ok and concurrency_ok


def main() -> int:
    """Run both parts and write the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    load = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="flowstudio-single-test-bench-"))
    daphne = None
    fake = None
    try:
        _setup_django(scratch)
        fake = _stamped_fake({"latency_ms": 0, "token_ms": args.token_ms, "tokens": args.tokens})
        cookie, flows = _seed(args.sessions, fake.base_url)
        port = _free_port()
        daphne = _start_daphne(scratch, port)
        origin = f"http://127.0.0.1:{port}"
        report = asyncio.run(_run(args, f"ws://127.0.0.1:{port}", origin, cookie, flows, fake))
        return 0 if _write(report, args, load) else 1
    finally:
        if daphne is not None and daphne.poll() is None:
            os.killpg(daphne.pid, signal.SIGTERM)
            try:
                daphne.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(daphne.pid, signal.SIGKILL)
        if fake is not None:
            fake.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
