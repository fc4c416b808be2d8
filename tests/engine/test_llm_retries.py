"""Retries and errors of LLM calls against the fake server: Retry-After honoured, bounded, clear messages."""

from __future__ import annotations

import time

import pytest

from flowengine.connections import Connection
from flowengine.llm import LLMError, LLMRetriesExhausted, RetryPolicy, list_models
from flowengine.tools.llm_tool import run_llm_node

CHAT = "user:\n{{q}}\n"


def _conn(fake_llm, key: str = "sk-secret-abcdef") -> Connection:
    return Connection.open_ai("main", api_key=key, base_url=fake_llm.base_url)


async def _ask(conn: Connection, retry: RetryPolicy | None = None, stream: bool = False):
    return await run_llm_node(
        connection=conn,
        api="chat",
        template=CHAT,
        template_path="c.jinja2",
        inputs={"q": "hi", "model": "m"},
        stream=stream,
        retry=retry,
    )


async def test_retry_waits_for_retry_after_on_429_and_500(fake_llm):
    fake_llm.config(fail_next=[429, 500], retry_after=0.3)
    started = time.monotonic()
    result = await _ask(_conn(fake_llm), RetryPolicy(max_attempts=5, base_delay=0.01))
    elapsed = time.monotonic() - started
    assert result.output.startswith("ans-")
    assert 0.6 <= elapsed < 2.0
    assert fake_llm.stats()["requests"] == 3


async def test_backoff_without_retry_after_is_exponential(fake_llm):
    fake_llm.config(fail_next=[503, 503])
    started = time.monotonic()
    await _ask(_conn(fake_llm), RetryPolicy(max_attempts=5, base_delay=0.1))
    # 0.1 then 0.2 seconds, with up to 10% jitter either way
    assert 0.27 <= time.monotonic() - started < 1.5


async def test_attempts_are_bounded_and_the_error_says_why(fake_llm):
    fake_llm.config(fail_next=[500, 500, 500, 500], retry_after=0, fail_message="upstream overloaded")
    with pytest.raises(LLMRetriesExhausted) as caught:
        await _ask(_conn(fake_llm), RetryPolicy(max_attempts=3))
    error = caught.value
    assert error.status == 500 and error.attempts == 3
    assert "HTTP 500: upstream overloaded" in str(error)
    assert "gave up after 3 attempts" in str(error)
    assert fake_llm.stats()["requests"] == 3


async def test_retry_after_beyond_the_time_budget_fails_at_once(fake_llm):
    fake_llm.config(fail_next=[429], retry_after=30)
    started = time.monotonic()
    with pytest.raises(LLMRetriesExhausted, match="HTTP 429"):
        await _ask(_conn(fake_llm), RetryPolicy(max_attempts=5, max_total_seconds=2))
    assert time.monotonic() - started < 1.5


async def test_client_errors_are_not_retried_and_never_show_the_key(fake_llm):
    fake_llm.config(api_key="the-right-key")
    with pytest.raises(LLMError) as caught:
        await _ask(_conn(fake_llm, key="sk-wrong-key-0123456789"))
    message = str(caught.value)
    assert caught.value.status == 401
    assert "HTTP 401" in message and "127.0.0.1" in message and "connection 'main'" in message
    assert "sk-wrong-key-0123456789" not in message
    assert fake_llm.stats()["requests"] == 1


async def test_stream_retries_before_the_first_chunk(fake_llm):
    fake_llm.config(fail_next=[429], retry_after=0.05)
    result = await _ask(_conn(fake_llm), RetryPolicy(max_attempts=3), stream=True)
    assert "".join([p async for p in result.output]).startswith("ans-")


async def test_unreachable_server_is_reported_with_the_host():
    conn = Connection.open_ai("down", api_key="k", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(LLMError, match=r"127\.0\.0\.1:9 \(connection 'down'\) could not connect"):
        await _ask(conn, RetryPolicy(max_attempts=2, timeout=5))


async def test_list_models_tests_a_connection(fake_llm):
    assert await list_models(_conn(fake_llm)) == ["fake-gpt", "fake-instruct"]
