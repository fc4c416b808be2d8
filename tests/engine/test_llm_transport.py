"""The direct transport of LLM calls gives what the SDK's own client gives: bodies, streams, errors, requests."""

from __future__ import annotations

import asyncio
import time

import certifi
import pytest

from flowengine import llm
from flowengine.connections import Connection
from tests.fakellm import expected_chat_answer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
]


@pytest.fixture(params=["direct", "sdk"])
def transport(request, monkeypatch):
    monkeypatch.setattr(llm, "_direct", request.param == "direct")
    return request.param


def _openai(fake_llm) -> Connection:
    return Connection.open_ai("main", api_key="sk-test-123456", base_url=fake_llm.base_url)


def _azure(fake_llm) -> Connection:
    return Connection.azure_open_ai(
        "az", api_base=fake_llm.url, api_key="az-key-123456", api_version="2024-10-21"
    )


def _comparable(response) -> dict:
    """The response without what differs from call to call (ids, time)."""
    data = response.model_dump()
    data.pop("id", None)
    data.pop("created", None)
    for choice in data["choices"]:
        for call in (choice.get("message") or {}).get("tool_calls") or []:
            call.pop("id")
    return data


async def _both(call):
    """What `call` returns through the direct path and through the SDK's client."""
    results = {}
    for name in ("direct", "sdk"):
        llm._direct = name == "direct"
        results[name] = await call()
        await llm.close_clients()
    llm._direct = None
    return results


async def test_chat_completion_and_tool_responses_equal_the_sdk_client(fake_llm):
    conn = _openai(fake_llm)
    calls = {
        "chat": lambda: llm.create(conn, "chat", {"model": "m", "messages": MESSAGES, "temperature": 0}),
        "completion": lambda: llm.create(conn, "completion", {"model": "m", "prompt": "say hi"}),
        "tools": lambda: llm.create(conn, "chat", {"model": "m", "messages": MESSAGES, "tools": TOOLS}),
    }
    for name, call in calls.items():
        got = await _both(call)
        assert type(got["direct"]) is type(got["sdk"]), name
        assert _comparable(got["direct"]) == _comparable(got["sdk"]), name
    assert got["direct"].choices[0].message.tool_calls[0].function.name == "lookup"


async def test_streamed_chunks_and_usage_equal_the_sdk_client(fake_llm):
    conn = _openai(fake_llm)

    async def stream() -> tuple[list[str], dict[str, int]]:
        params = {"model": "m", "messages": MESSAGES, "stream": True}
        llm.stream_usage_option(conn, params)
        response = await llm.create(conn, "chat", params)
        usage: dict[str, int] = {}
        pick = lambda chunk: chunk.choices[0].delta.content  # noqa: E731
        pieces = [p async for p in llm.iterate_stream(response, conn, api="chat", pick=pick, usage=usage)]
        return pieces, usage

    got = await _both(stream)
    assert got["direct"] == got["sdk"]
    pieces, usage = got["direct"]
    assert "".join(pieces) == expected_chat_answer(MESSAGES)
    assert usage["completion_tokens"] == 5


async def test_azure_request_has_the_deployment_path_version_key_and_extra_headers(fake_llm, transport):
    conn = _azure(fake_llm)
    params = {
        "model": "my-deployment",
        "messages": MESSAGES,
        "extra_headers": {"ms-azure-ai-promptflow-called-from": "aoai-tool"},
    }
    reply = await llm.create(conn, "chat", params)
    await llm.close_clients()
    assert reply.choices[0].message.content == expected_chat_answer(MESSAGES)
    sent = fake_llm.requests()[-1]
    assert sent["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert sent["query"]["api-version"] == "2024-10-21"
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["api-key"] == "az-key-123456"
    assert headers["ms-azure-ai-promptflow-called-from"] == "aoai-tool"
    assert "extra_headers" not in sent["body"]


async def test_errors_read_the_same_through_both_paths(fake_llm):
    conn = _openai(fake_llm)

    async def refused() -> str:
        fake_llm.config(api_key="the-right-key")
        try:
            await llm.create(conn, "chat", {"model": "m", "messages": MESSAGES})
        except llm.LLMError as exc:
            return f"{exc.status} {exc.retriable} {exc}"
        finally:
            fake_llm.config(api_key=None)
        raise AssertionError("the call was not refused")

    got = await _both(refused)
    assert got["direct"] == got["sdk"]
    assert got["direct"].startswith("401 False ")
    assert "sk-test-123456" not in got["direct"]


async def test_a_slow_server_times_out_and_is_retried_within_the_budget(fake_llm, transport):
    fake_llm.config(latency_ms=2000)
    policy = llm.RetryPolicy(max_attempts=2, timeout=0.3, base_delay=0.05)
    start = time.monotonic()
    with pytest.raises(llm.LLMRetriesExhausted) as caught:
        await llm.create(_openai(fake_llm), "chat", {"model": "m", "messages": MESSAGES}, policy=policy)
    await llm.close_clients()
    assert "timed out" in str(caught.value)
    assert caught.value.attempts == 2
    assert time.monotonic() - start < 2.0


async def test_refused_connection_is_not_retried_and_names_the_host(transport):
    conn = Connection.open_ai("down", api_key="k", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(llm.LLMError) as caught:
        await llm.create(conn, "chat", {"model": "m", "messages": MESSAGES})
    await llm.close_clients()
    assert "127.0.0.1:9" in str(caught.value) and "could not connect" in str(caught.value)
    assert caught.value.attempts == 1


async def test_closing_a_stream_early_ends_the_server_side_call(fake_llm, transport):
    fake_llm.config(token_ms=200, tokens=20)
    conn = _openai(fake_llm)
    response = await llm.create(conn, "chat", {"model": "m", "messages": MESSAGES, "stream": True})
    pick = lambda chunk: chunk.choices[0].delta.content  # noqa: E731
    pieces = llm.iterate_stream(response, conn, api="chat", pick=pick, usage={})
    assert (await pieces.__anext__()).startswith("ans-")
    await pieces.aclose()
    for _ in range(40):
        if fake_llm.stats()["inflight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert fake_llm.stats()["inflight"] == 0
    await llm.close_clients()


def test_the_http_session_closes_with_its_event_loop(fake_llm):
    conn = _openai(fake_llm)
    seen = []

    async def call() -> None:
        await llm.create(conn, "chat", {"model": "m", "messages": MESSAGES})
        seen.append(llm._sessions[asyncio.get_running_loop()][0])

    asyncio.run(call())
    assert seen[0].closed


def test_the_sdk_clients_share_one_tls_context_per_ca_setting(monkeypatch):
    # Building a TLS context reads the CA bundle: each connection's client would pay for it on its first call.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default = llm._ssl_context()
    assert llm._http_client()._transport.ssl_context is default
    assert llm._http_client()._transport.ssl_context is default
    # A CA bundle named by the environment (a flow's environment_variables may name one) gets its own context.
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    named = llm._ssl_context()
    assert named is not default and named.cert_store_stats()["x509_ca"] > 0
    assert llm._http_client()._transport.ssl_context is named
