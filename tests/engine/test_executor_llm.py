"""LLM nodes and prompty flows through the executor, against the local fake OpenAI-compatible server."""

from __future__ import annotations

import pytest

from flowengine import FlowExecutor, load_flow
from flowengine.connections import Connection
from flowengine.events import NodeCompleted, OutputChunk, StreamStarted, TraceSpan
from tests.fakellm import expected_chat_answer

from .conftest import GOLDEN


@pytest.fixture
def connections(fake_llm):
    return {
        "fake_openai": Connection.open_ai("fake_openai", api_key="sk-fake-key-1", base_url=fake_llm.base_url)
    }


async def line(folder, connections, inputs=None, **kwargs):
    executor = FlowExecutor(load_flow(folder), connections=connections)
    try:
        return await executor.run_line_result(inputs or {}, **kwargs)
    finally:
        executor.close()


async def test_llm_node_answers_and_feeds_the_next_node(fake_llm, connections):
    result = await line(GOLDEN / "dag_llm_chat", connections)
    assert result.status == "Completed", result.error
    sent = fake_llm.last_body()["messages"]
    answer = expected_chat_answer(sent)
    assert result.outputs["answer"] == answer
    assert result.outputs["answer_length"] == len(answer)
    assert result.usage["total_tokens"] > 0
    llm_span = next(e for e in result.events if isinstance(e, TraceSpan) and e.kind == "llm")
    node_span = next(e for e in result.events if isinstance(e, TraceSpan) and e.name == "answer")
    assert llm_span.parent_id == node_span.span_id
    assert llm_span.usage["total_tokens"] == result.usage["total_tokens"]


async def test_streaming_llm_output_arrives_in_chunks_with_usage(fake_llm, write_flow, connections):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                inputs:
                  question: {type: string, default: "why?"}
                outputs:
                  answer: {type: string, reference: "${answer.output}"}
                  echo: {type: string, reference: "${inputs.question}"}
                nodes:
                - name: answer
                  type: llm
                  source: {type: code, path: chat.jinja2}
                  connection: fake_openai
                  api: chat
                  inputs: {model: gpt-4o-mini, question: "${inputs.question}"}
            """,
            "chat.jinja2": "# system:\nBe brief.\n# user:\n{{question}}\n",
        }
    )
    result = await line(folder, connections, stream=True)
    assert result.status == "Completed", result.error
    started = next(e for e in result.events if isinstance(e, StreamStarted))
    assert started.outputs == {"echo": "why?"} and started.streams == ["answer"]
    chunks = [e.delta for e in result.events if isinstance(e, OutputChunk)]
    assert len(chunks) > 1
    assert (
        "".join(chunks) == result.outputs["answer"] == expected_chat_answer(fake_llm.last_body()["messages"])
    )
    assert fake_llm.last_body()["stream"] is True
    done = next(e for e in result.events if isinstance(e, NodeCompleted) and e.node == "answer")
    assert done.output == result.outputs["answer"]
    assert result.usage.get("total_tokens", 0) > 0


async def test_an_undefined_connection_fails_the_node_with_its_name(write_flow):
    result = await line(GOLDEN / "dag_llm_chat", {})
    assert result.status == "Failed"
    assert result.error.node == "answer" and "fake_openai" in result.error.message


async def test_prompty_flow_runs_and_streams(fake_llm, connections):
    result = await line(GOLDEN / "prompty_stream", connections, {"topic": "rain"}, stream=True)
    assert result.status == "Completed", result.error
    chunks = [e.delta for e in result.events if isinstance(e, OutputChunk)]
    assert chunks and "".join(chunks) == result.outputs["output"]
    assert result.outputs["output"] == expected_chat_answer(fake_llm.last_body()["messages"])


async def test_prompty_loaded_inside_a_flex_flow_uses_the_flow_connections(fake_llm, connections):
    result = await line(GOLDEN / "flex_prompty_load", connections, {"subject": "cats"})
    assert result.status == "Completed", result.error
    assert fake_llm.last_body()["model"] == "gpt-4o-mini"
