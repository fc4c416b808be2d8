"""The fake LLM server itself: deterministic answers over real HTTP, SSE, failure injection, recorded requests."""

from __future__ import annotations

import openai
import pytest

from tests.fakellm import expected_chat_answer, expected_completion_answer


async def test_chat_answer_depends_on_the_whole_message_list(fake_llm):
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0)
    one = [{"role": "system", "content": "a"}, {"role": "user", "content": "q"}]
    two = [{"role": "system", "content": "b"}, {"role": "user", "content": "q"}]
    first = await client.chat.completions.create(model="m", messages=one)
    second = await client.chat.completions.create(model="m", messages=two)
    assert first.choices[0].message.content == expected_chat_answer(one)
    assert second.choices[0].message.content == expected_chat_answer(two)
    assert first.choices[0].message.content != second.choices[0].message.content
    assert first.usage.completion_tokens == 5
    await client.close()


async def test_stream_sends_openai_chunks_and_a_usage_chunk_on_request(fake_llm):
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    stream = await client.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == expected_chat_answer(messages)
    assert len(pieces) == 5
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + 5
    assert fake_llm.stats()["streamed"] == 1
    await client.close()


async def test_completions_and_azure_paths_answer(fake_llm):
    azure = openai.AsyncAzureOpenAI(
        api_key="k", azure_endpoint=fake_llm.url, api_version="2024-02-01", max_retries=0
    )
    done = await azure.completions.create(model="dep", prompt="say hi")
    assert done.choices[0].text == expected_completion_answer("say hi")
    assert fake_llm.requests()[-1]["path"] == "/openai/deployments/dep/completions"
    assert [m.id async for m in azure.models.list()] == ["fake-gpt", "fake-instruct"]
    await azure.close()


async def test_injected_failures_carry_retry_after(fake_llm):
    fake_llm.config(fail_next=[429], retry_after=0.25)
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == "0.25"
    ok = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert ok.choices[0].message.content.startswith("ans-")
    assert fake_llm.stats()["failures_injected"] == 1
    await client.close()


async def test_tools_request_gets_a_call_of_the_first_tool(fake_llm):
    client = openai.AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0)
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    reply = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], tools=tools
    )
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("lookup", "{}")
    assert reply.choices[0].finish_reason == "tool_calls"
    after_tool = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    final = await client.chat.completions.create(model="m", messages=after_tool, tools=tools)
    assert final.choices[0].message.content.startswith("ans-")
    await client.close()


async def test_wrong_api_key_is_refused_when_one_is_configured(fake_llm):
    fake_llm.config(api_key="right-key")
    client = openai.AsyncOpenAI(api_key="wrong-key-123", base_url=fake_llm.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    await client.close()
