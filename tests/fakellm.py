#!/usr/bin/env python3
"""Deterministic OpenAI-compatible fake LLM server (aiohttp) and its pytest fixtures.

Run it alone:  python tests/fakellm.py --port 18000 [--latency-ms 300 --token-ms 5 --tokens 20]

Endpoints
  POST /v1/chat/completions, /chat/completions                (OpenAI)
  POST /v1/completions, /completions                          (OpenAI legacy completions)
  POST /openai/deployments/{d}/chat/completions?api-version=  (Azure OpenAI)
  POST /openai/deployments/{d}/completions?api-version=       (Azure OpenAI)
  GET  /v1/models, /models, /openai/models                    (connection tests)
  GET  /stats          -> counters and the current config
  POST /stats/reset    -> zero counters, forget recorded requests
  POST /config         -> change timing live, inject failures:
                          {"latency_ms", "token_ms", "tokens", "api_key",
                           "fail_next": [429, 500], "retry_after": 0.2, "fail_message": "..."}
  GET  /requests       -> the last requests: [{"path", "query", "headers", "body"}]

Answer of a chat call: "ans-" + sha256(canonical JSON of the full message list)[:12] followed by
" w1 .. w{tokens-1}", so any difference in the rendered prompt changes the answer. A completions
call hashes the full prompt the same way. With `tools` (or legacy `functions`) in the request and a
last message that is not a tool (function) result, the answer is one call of the first tool with
arguments "{}". Timing: the first token comes after latency_ms, each following chunk after token_ms;
stream=false sleeps the same total time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

DEFAULT_CONFIG: dict[str, Any] = {
    "latency_ms": 300.0,
    "token_ms": 5.0,
    "tokens": 20,
    "api_key": None,
    "fail_next": [],
    "retry_after": None,
    "fail_message": None,
}
# Fast timing for tests: the whole suite must stay well under its time budget.
TEST_CONFIG: dict[str, Any] = dict(DEFAULT_CONFIG, latency_ms=0.0, token_ms=0.0, tokens=5)
MAX_RECORDED = 200


def canonical_json(value: Any) -> str:
    """The canonical JSON the answer hash is taken over (sorted keys, no spaces, UTF-8 kept)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def answer_for(value: Any, tokens: int) -> list[str]:
    """The answer tokens for a message list (chat) or a prompt (completions)."""
    digest = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:12]
    return ["ans-" + digest] + [f" w{i}" for i in range(1, max(1, int(tokens)))]


def expected_chat_answer(messages: list[dict[str, Any]], tokens: int = TEST_CONFIG["tokens"]) -> str:
    """The full text the fake answers to a chat request with these messages."""
    return "".join(answer_for(messages, tokens))


def expected_completion_answer(prompt: Any, tokens: int = TEST_CONFIG["tokens"]) -> str:
    """The full text the fake answers to a completions request with this prompt."""
    return "".join(answer_for(prompt, tokens))


def _count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_words(v) for k, v in value.items() if k in ("content", "text"))
    return 0


def _error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("requests", "rate_limit_exceeded"),
    }
    kind, code = kinds.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class FakeLLM:
    """The fake server's state (config, counters, recorded requests) and its aiohttp application."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.defaults = dict(DEFAULT_CONFIG, **(config or {}))
        self.cfg: dict[str, Any] = {}
        self.st: dict[str, Any] = {}
        self.recorded: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECORDED)
        self.reset(config=True)
        self._seq = 0

    def reset(self, *, config: bool = False) -> None:
        """Zero the counters and forget recorded requests; with config=True restore the start config."""
        if config:
            self.cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in self.defaults.items()}
        inflight = self.st.get("inflight", 0)
        self.st = {
            "requests": 0,
            "chat": 0,
            "completions": 0,
            "streamed": 0,
            "errors": 0,
            "failures_injected": 0,
            "inflight": inflight,
            "max_inflight": inflight,
            "started": time.time(),
        }
        self.recorded.clear()

    def apply_config(self, body: dict[str, Any]) -> dict[str, Any]:
        """Change the config keys present in body and return the whole config."""
        for key, value in body.items():
            if key not in self.cfg:
                raise KeyError(key)
            if key == "fail_next":
                self.cfg[key] = [int(s) for s in (value or [])]
            elif key in ("latency_ms", "token_ms"):
                self.cfg[key] = float(value)
            elif key == "tokens":
                self.cfg[key] = int(value)
            elif key == "retry_after":
                self.cfg[key] = None if value is None else float(value)
            else:
                self.cfg[key] = value
        return dict(self.cfg)

    def stats(self) -> dict[str, Any]:
        """Counters plus the current config."""
        return dict(self.st, uptime_s=round(time.time() - self.st["started"], 3), config=dict(self.cfg))

    # -- request handling -------------------------------------------------------------------------

    def _record(self, request: web.Request, body: Any) -> None:
        self.recorded.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )

    def _auth_error(self, request: web.Request) -> web.Response | None:
        key = self.cfg.get("api_key")
        if not key:
            return None
        sent = request.headers.get("api-key") or ""
        auth = request.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            sent = sent or auth[7:]
        if sent == key:
            return None
        self.st["errors"] += 1
        shown = (sent[:3] + "*" * max(0, len(sent) - 7) + sent[-4:]) if len(sent) > 8 else "****"
        return web.json_response(_error_body(401, f"Incorrect API key provided: {shown}."), status=401)

    def _injected_failure(self) -> web.Response | None:
        if not self.cfg["fail_next"]:
            return None
        status = self.cfg["fail_next"].pop(0)
        self.st["failures_injected"] += 1
        self.st["errors"] += 1
        headers = {}
        if self.cfg.get("retry_after") is not None:
            ra = self.cfg["retry_after"]
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        message = self.cfg.get("fail_message") or f"fake failure {status}"
        return web.json_response(_error_body(status, message), status=status, headers=headers)

    async def _begin(self, request: web.Request) -> tuple[Any, web.Response | None]:
        self.st["requests"] += 1
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.st["errors"] += 1
            self._record(request, None)
            return None, web.json_response(_error_body(400, "invalid JSON"), status=400)
        self._record(request, body)
        if not isinstance(body, dict):
            self.st["errors"] += 1
            return body, web.json_response(_error_body(400, "body must be an object"), status=400)
        return body, self._auth_error(request) or self._injected_failure()

    def _timing(self) -> tuple[float, float]:
        return float(self.cfg["latency_ms"]) / 1000.0, float(self.cfg["token_ms"]) / 1000.0

    async def _sse(
        self, request: web.Request, chunks: Iterator[tuple[float, dict[str, Any]]]
    ) -> web.StreamResponse:
        self.st["streamed"] += 1
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
        )
        await resp.prepare(request)
        for delay, chunk in chunks:
            if delay:
                await asyncio.sleep(delay)
            await resp.write(("data: " + json.dumps(chunk) + "\n\n").encode("utf-8"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _tool_call_target(self, body: dict[str, Any]) -> tuple[str, str] | None:
        """("tools"|"functions", name) when the answer must be a tool call."""
        messages = body.get("messages") or []
        last_role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
        tools = body.get("tools")
        if tools and last_role != "tool":
            first = tools[0] if isinstance(tools[0], dict) else {}
            name = (first.get("function") or {}).get("name") or first.get("name") or "tool"
            return "tools", name
        functions = body.get("functions")
        if functions and last_role != "function":
            first = functions[0] if isinstance(functions[0], dict) else {}
            return "functions", first.get("name") or "function"
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST chat/completions."""
        self.st["chat"] += 1
        self.st["inflight"] += 1
        self.st["max_inflight"] = max(self.st["max_inflight"], self.st["inflight"])
        try:
            body, failure = await self._begin(request)
            if failure is not None:
                return failure
            return await self._chat_answer(request, body)
        finally:
            self.st["inflight"] -= 1

    async def _chat_answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self._seq += 1
        model = body.get("model") or request.match_info.get("d") or "fake-gpt"
        messages = body.get("messages") or []
        toks = answer_for(messages, self.cfg["tokens"])
        n = max(1, int(body.get("n") or 1))
        lat, tms = self._timing()
        cid = f"chatcmpl-fake{self._seq}"
        created = int(time.time())
        tool = self._tool_call_target(body)
        prompt_tokens = _count_words(messages)
        completion_tokens = 1 if tool else len(toks)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens * n,
            "total_tokens": prompt_tokens + completion_tokens * n,
        }
        call_id = f"call_fake{self._seq}"
        if tool is None:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(toks)}
            finish = "stop"
        elif tool[0] == "tools":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": tool[1], "arguments": "{}"}}
                ],
            }
            finish = "tool_calls"
        else:
            message = {
                "role": "assistant",
                "content": None,
                "function_call": {"name": tool[1], "arguments": "{}"},
            }
            finish = "function_call"

        if not body.get("stream"):
            await asyncio.sleep(lat + tms * (len(toks) - 1))
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [
                        {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                        for i in range(n)
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        def chunks() -> Iterator[tuple[float, dict[str, Any]]]:
            for i in range(n):
                first_delay = lat if i == 0 else 0.0
                if tool is None:
                    yield first_delay, chunk({"role": "assistant", "content": toks[0]}, index=i)
                    for t in toks[1:]:
                        yield tms, chunk({"content": t}, index=i)
                elif tool[0] == "tools":
                    head = {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool[1], "arguments": ""},
                    }
                    yield (
                        first_delay,
                        chunk({"role": "assistant", "content": None, "tool_calls": [head]}, index=i),
                    )
                    yield tms, chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, index=i)
                else:
                    fc = {"name": tool[1], "arguments": ""}
                    yield (
                        first_delay,
                        chunk({"role": "assistant", "content": None, "function_call": fc}, index=i),
                    )
                    yield tms, chunk({"function_call": {"arguments": "{}"}}, index=i)
                yield 0.0, chunk({}, finish, index=i)
            if (body.get("stream_options") or {}).get("include_usage"):
                last = chunk({})
                last["choices"] = []
                last["usage"] = usage
                yield 0.0, last

        return await self._sse(request, chunks())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST completions (legacy text completions)."""
        self.st["completions"] += 1
        self.st["inflight"] += 1
        self.st["max_inflight"] = max(self.st["max_inflight"], self.st["inflight"])
        try:
            body, failure = await self._begin(request)
            if failure is not None:
                return failure
            self._seq += 1
            model = body.get("model") or request.match_info.get("d") or "fake-instruct"
            prompt = body.get("prompt", "")
            toks = answer_for(prompt, self.cfg["tokens"])
            n = max(1, int(body.get("n") or 1))
            lat, tms = self._timing()
            cid = f"cmpl-fake{self._seq}"
            created = int(time.time())
            prompt_tokens = _count_words(prompt)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(toks) * n,
                "total_tokens": prompt_tokens + len(toks) * n,
            }
            if not body.get("stream"):
                await asyncio.sleep(lat + tms * (len(toks) - 1))
                return web.json_response(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "system_fingerprint": "fp_fake",
                        "choices": [
                            {"text": "".join(toks), "index": i, "logprobs": None, "finish_reason": "stop"}
                            for i in range(n)
                        ],
                        "usage": usage,
                    }
                )

            def chunk(text: str, finish_reason: str | None, index: int) -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [
                        {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
                    ],
                }

            def chunks() -> Iterator[tuple[float, dict[str, Any]]]:
                for i in range(n):
                    for j, t in enumerate(toks):
                        yield (lat if i == 0 else 0.0) if j == 0 else tms, chunk(t, None, i)
                    yield 0.0, chunk("", "stop", i)
                if (body.get("stream_options") or {}).get("include_usage"):
                    last = chunk("", None, 0)
                    last["choices"] = []
                    last["usage"] = usage
                    yield 0.0, last

            return await self._sse(request, chunks())
        finally:
            self.st["inflight"] -= 1

    async def models(self, request: web.Request) -> web.Response:
        """GET models: what a connection test calls."""
        self._record(request, None)
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        created = int(self.st["started"])
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "fake-gpt", "object": "model", "created": created, "owned_by": "fakellm"},
                    {"id": "fake-instruct", "object": "model", "created": created, "owned_by": "fakellm"},
                ],
            }
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        """GET /stats."""
        return web.json_response(self.stats())

    async def post_stats_reset(self, request: web.Request) -> web.Response:
        """POST /stats/reset."""
        self.reset()
        return web.json_response(self.stats())

    async def post_config(self, request: web.Request) -> web.Response:
        """POST /config."""
        try:
            body = await request.json()
            return web.json_response(self.apply_config(dict(body)))
        except KeyError as exc:
            return web.json_response(_error_body(400, f"unknown config key {exc}"), status=400)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            return web.json_response(_error_body(400, f"bad config: {exc}"), status=400)

    async def get_requests(self, request: web.Request) -> web.Response:
        """GET /requests."""
        return web.json_response(list(self.recorded))

    def make_app(self) -> web.Application:
        """The aiohttp application serving every endpoint."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        for prefix in ("/v1", "", "/openai"):
            app.router.add_post(prefix + "/chat/completions", self.chat)
            app.router.add_post(prefix + "/completions", self.completions)
            app.router.add_get(prefix + "/models", self.models)
        app.router.add_post("/openai/deployments/{d}/chat/completions", self.chat)
        app.router.add_post("/openai/deployments/{d}/completions", self.completions)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.post_stats_reset)
        app.router.add_post("/config", self.post_config)
        app.router.add_get("/requests", self.get_requests)
        return app


class FakeLLMServer:
    """A FakeLLM served on 127.0.0.1 from a background thread with its own event loop."""

    def __init__(self, config: dict[str, Any] | None = None, port: int = 0) -> None:
        self.fake = FakeLLM(config)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The server root, e.g. http://127.0.0.1:PORT (the Azure endpoint)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return self.url + "/v1"

    def start(self) -> FakeLLMServer:
        """Start serving; returns once the port is bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(self.fake.make_app(), access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", self._port, backlog=1024)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fakellm", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run fn on the server's loop so state changes never race a request."""
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args, **kw)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def config(self, **kw: Any) -> dict[str, Any]:
        """Change the config (latency_ms, token_ms, tokens, api_key, fail_next, retry_after, fail_message)."""
        return self._call(self.fake.apply_config, kw)

    def stats(self) -> dict[str, Any]:
        """Counters plus the current config."""
        return self._call(self.fake.stats)

    def requests(self) -> list[dict[str, Any]]:
        """The recorded requests, oldest first: [{"path", "query", "headers", "body"}]."""
        return self._call(lambda: [json.loads(json.dumps(r)) for r in self.fake.recorded])

    def last_body(self) -> Any:
        """The JSON body of the most recent request."""
        reqs = self.requests()
        return reqs[-1]["body"] if reqs else None

    def reset(self) -> None:
        """Zero counters, forget requests and restore the start config."""
        self._call(self.fake.reset, config=True)

    def expected_chat(self, messages: list[dict[str, Any]]) -> str:
        """The text this server answers to these chat messages with its current token count."""
        return expected_chat_answer(messages, self.fake.cfg["tokens"])

    def expected_completion(self, prompt: Any) -> str:
        """The text this server answers to this completions prompt with its current token count."""
        return expected_completion_answer(prompt, self.fake.cfg["tokens"])


def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    """A tiny blocking JSON client for the control endpoints of a separately started server."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read().decode("utf-8"))


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLMServer]:
    """One fake LLM server for the whole session (fast timing: no latency, 5 tokens)."""
    server = FakeLLMServer(TEST_CONFIG).start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLMServer) -> Iterator[FakeLLMServer]:
    """The session fake LLM server with counters, recorded requests and config reset for this test."""
    fake_llm_server.reset()
    yield fake_llm_server
    fake_llm_server.reset()


def main() -> None:
    """Command line entry: serve until interrupted."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--latency-ms", type=float, default=300.0, help="time to first token")
    ap.add_argument("--token-ms", type=float, default=5.0, help="delay between chunks")
    ap.add_argument("--tokens", type=int, default=20, help="number of content chunks")
    ap.add_argument("--api-key", default=None, help="answer 401 unless this key is sent")
    a = ap.parse_args()
    fake = FakeLLM(
        {"latency_ms": a.latency_ms, "token_ms": a.token_ms, "tokens": a.tokens, "api_key": a.api_key}
    )
    try:
        import uvloop  # optional, faster event loop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(fake.make_app(), host=a.host, port=a.port, backlog=8192, access_log=None, print=None)


if __name__ == "__main__":
    main()
