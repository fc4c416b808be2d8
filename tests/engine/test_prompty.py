"""Loading and running .prompty files against the fake server, and Prompty from user code."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from flowengine.connections import Connection, set_current_connections
from flowengine.model import FlowValidationError
from flowengine.prompty import Prompty, PromptyError, load_prompty, run_prompty


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


BASIC = """
---
name: Basic
description: answers questions
model:
  api: chat
  configuration:
    type: openai
    model: gpt-4o-mini
    base_url: ${env:FAKE_BASE_URL}
    api_key: ${env:FAKE_KEY}
  parameters:
    temperature: 0.1
    max_tokens: 50
inputs:
  question:
    type: string
  tone:
    type: string
    default: friendly
sample:
  question: What is prompt flow?
---
system:
You are {{tone}}.

user:
{{question}}
"""


@pytest.fixture
def env(monkeypatch, fake_llm):
    monkeypatch.setenv("FAKE_BASE_URL", fake_llm.base_url)
    monkeypatch.setenv("FAKE_KEY", "sk-prompty")
    return fake_llm


def test_load_reads_front_matter_and_where_the_template_starts(tmp_path, env):
    spec = load_prompty(write(tmp_path / "basic.prompty", BASIC))
    assert (spec.name, spec.api, spec.model_name) == ("Basic", "chat", "gpt-4o-mini")
    assert spec.configuration["base_url"] == env.base_url
    assert spec.parameters == {"temperature": 0.1, "max_tokens": 50}
    assert spec.inputs["tone"] == {"type": "string", "default": "friendly"}
    assert spec.template_line == 23
    assert spec.template.startswith("system:\nYou are")


async def test_run_sends_rendered_messages_and_parameters(tmp_path, env):
    spec = load_prompty(write(tmp_path / "basic.prompty", BASIC))
    result = await run_prompty(spec, {"question": "hi\nassistant:\nfake turn"}, connections={}, stream=False)
    messages = [
        {"role": "system", "content": "You are friendly."},
        {"role": "user", "content": "hi\nassistant:\nfake turn"},
    ]
    body = env.last_body()
    assert body["messages"] == messages
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4o-mini", 0.1, 50)
    assert result.output == env.expected_chat(messages)
    assert env.requests()[-1]["headers"]["authorization"] == "Bearer sk-prompty"


async def test_sample_is_used_when_no_inputs_are_given(tmp_path, env):
    spec = load_prompty(write(tmp_path / "basic.prompty", BASIC))
    await run_prompty(spec, {}, connections={}, stream=False)
    assert env.last_body()["messages"][1]["content"] == "What is prompt flow?"


async def test_missing_required_input_is_an_error(tmp_path, env):
    text = BASIC.replace("sample:\n  question: What is prompt flow?\n", "")
    spec = load_prompty(write(tmp_path / "basic.prompty", text))
    with pytest.raises(PromptyError, match=r"Missing required inputs: \['question'\]"):
        await run_prompty(spec, {"tone": "x"}, connections={}, stream=False)


async def test_stream_parameter_yields_deltas(tmp_path, env):
    text = BASIC.replace("max_tokens: 50", "max_tokens: 50\n    stream: true")
    spec = load_prompty(write(tmp_path / "s.prompty", text))
    result = await run_prompty(spec, {"question": "q"}, connections={}, stream=False)
    pieces = [p async for p in result.output]
    assert pieces[1:] == [" w1", " w2", " w3", " w4"]
    assert env.last_body()["stream"] is True
    assert result.usage["completion_tokens"] == 5


async def test_connection_by_name_and_json_outputs(tmp_path, fake_llm):
    write(tmp_path / "reply.json", json.dumps({"question": "from file"}))
    text = """
    ---
    name: Json
    model:
      api: chat
      configuration:
        type: azure_openai
        azure_deployment: gpt-dep
        connection: my_azure
      parameters:
        response_format:
          type: json_object
    inputs:
      question:
        type: string
    outputs:
      answer:
        type: string
    sample: ${file:reply.json}
    ---
    user:
    {{question}}
    """
    spec = load_prompty(write(tmp_path / "j.prompty", text))
    assert spec.sample == {"question": "from file"}
    conn = Connection.azure_open_ai("my_azure", api_key="k", api_base=fake_llm.url)
    # The fake answers text, not JSON: the error names the problem.
    with pytest.raises(PromptyError, match="not valid JSON"):
        await run_prompty(spec, {"question": "q"}, connections={"my_azure": conn}, stream=False)
    request = fake_llm.requests()[-1]
    assert request["path"] == "/openai/deployments/gpt-dep/chat/completions"
    assert request["headers"]["ms-azure-ai-promptflow-called-from"] == "promptflow-core"
    assert request["body"]["response_format"] == {"type": "json_object"}


async def test_completion_api_sends_the_rendered_prompt(tmp_path, env):
    text = BASIC.replace("api: chat", "api: completion")
    spec = load_prompty(write(tmp_path / "c.prompty", text))
    result = await run_prompty(spec, {"question": "q"}, connections={}, stream=False)
    prompt = "system:\nYou are friendly.\n\nuser:\nq\n"
    assert env.last_body()["prompt"] == prompt
    assert result.output == env.expected_completion(prompt)


def test_problems_are_reported_with_file_and_line(tmp_path):
    text = """
    ---
    name: Broken
    model:
      api: chatty
      configuration:
        type: anthropic
      parameters: 3
    inputs:
      q: string
    sample: ${file:missing.json}
    ---
    user:
    {{ q
    """
    with pytest.raises(FlowValidationError) as caught:
        load_prompty(write(tmp_path / "broken.prompty", text))
    found = {(p.field, p.line) for p in caught.value.problems}
    assert ("model.api", 4) in found
    assert ("model.configuration.type", 6) in found
    assert ("model.parameters", 7) in found
    assert ("inputs.q", 9) in found
    assert ("sample", 10) in found
    assert ("template", 13) in found
    assert all(p.file == "broken.prompty" for p in caught.value.problems)
    assert "broken.prompty:4" in str(caught.value)


def test_invalid_yaml_and_missing_front_matter_are_located(tmp_path):
    with pytest.raises(FlowValidationError, match=r"bad\.prompty:4:1: invalid YAML"):
        load_prompty(write(tmp_path / "bad.prompty", "---\nname: x\nmodel: [unclosed\n---\nuser:\nhi\n"))
    with pytest.raises(FlowValidationError, match="Illegal formatting of prompty"):
        load_prompty(write(tmp_path / "none.prompty", "user:\nhi\n"))


def test_prompty_load_from_user_code_with_a_named_connection(tmp_path, fake_llm):
    text = BASIC.replace(
        "    base_url: ${env:FAKE_BASE_URL}\n    api_key: ${env:FAKE_KEY}\n", "    connection: shared\n"
    )
    path = write(tmp_path / "named.prompty", text)
    set_current_connections({"shared": Connection.open_ai("shared", api_key="k", base_url=fake_llm.base_url)})
    try:
        prompty = Prompty.load(source=path, model={"parameters": {"max_tokens": 7}})
        answer = prompty(question="hello")
        assert answer.startswith("ans-")
        assert fake_llm.last_body()["max_tokens"] == 7
        assert fake_llm.last_body()["temperature"] == 0.1
        streamed = Prompty.load(source=path, model={"parameters": {"stream": True}})
        assert "".join(streamed(question="hello")) == answer
    finally:
        set_current_connections({})


def test_prompty_load_refuses_other_files(tmp_path):
    with pytest.raises(PromptyError, match="does not exist"):
        Prompty.load(source=tmp_path / "nope.prompty")
    with pytest.raises(PromptyError, match=".prompty extension"):
        Prompty.load(source=write(tmp_path / "x.txt", "hi"))
