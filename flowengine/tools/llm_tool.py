"""The `llm` node: split inputs into API parameters and template variables, render, parse roles, call the model.

Which inputs are parameters follows the prompt flow tool the node resolves to: an `llm` node with an
Azure OpenAI connection runs `AzureOpenAI.chat|completion`, with an OpenAI connection `OpenAI.chat|completion`
(promptflow-tools); a `custom_llm` node with `promptflow.tools.llm.llm` runs the unified `llm` tool.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flowengine import llm
from flowengine.connections import Connection
from flowengine.templates import (
    build_messages,
    convert_to_chat_list,
    render_template,
    template_variables,
)

UNIFIED_LLM_TOOL = "promptflow.tools.llm.llm"

# Parameters of each prompt flow tool function (besides connection and prompt); every other input is a
# template variable. Values are the declared types, used to convert literal strings as prompt flow does.
_COMMON_CHAT = {
    "temperature": float,
    "top_p": float,
    "stream": bool,
    "stop": list,
    "max_tokens": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "logit_bias": dict,
    "user": str,
    "function_call": object,
    "functions": list,
    "tool_choice": object,
    "tools": list,
    "response_format": object,
    "seed": int,
}
_COMMON_COMPLETION = {
    "suffix": str,
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "n": int,
    "stream": bool,
    "logprobs": int,
    "echo": bool,
    "stop": list,
    "presence_penalty": float,
    "frequency_penalty": float,
    "best_of": int,
    "logit_bias": dict,
    "user": str,
}
TOOL_PARAMETERS: dict[tuple[str, str], dict[str, type]] = {
    ("OpenAI", "chat"): {"model": str, **_COMMON_CHAT},
    ("AzureOpenAI", "chat"): {"deployment_name": str, "n": int, **_COMMON_CHAT},
    ("OpenAI", "completion"): {"model": str, **_COMMON_COMPLETION},
    ("AzureOpenAI", "completion"): {"deployment_name": str, **_COMMON_COMPLETION},
}
# promptflow.tools.llm.llm: one signature for both providers and both APIs.
UNIFIED_PARAMETERS: dict[str, type] = {
    "api": str,
    "deployment_name": str,
    "model": str,
    "temperature": float,
    "top_p": float,
    "stream": bool,
    "stop": list,
    "max_tokens": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "logit_bias": dict,
    "tool_choice": object,
    "tools": list,
    "response_format": object,
    "seed": int,
    "suffix": str,
    "logprobs": int,
    "echo": bool,
    "best_of": int,
}
# What the unified tool forwards to the provider method; everything else it received stays a template variable.
_UNIFIED_FORWARD = {
    "chat": (
        "temperature",
        "top_p",
        "stream",
        "stop",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "tool_choice",
        "tools",
        "response_format",
        "seed",
    ),
    "completion": (
        "temperature",
        "top_p",
        "stream",
        "stop",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "suffix",
        "logprobs",
        "echo",
        "best_of",
    ),
}


class LLMNodeError(Exception):
    """An llm node's inputs or template are wrong (a user error); the message names the problem."""


@dataclass
class LLMNodeResult:
    """What an llm node (or a prompty) produced.

    output: the text, the message dict for tool/function calls, a dict for json_object prompty outputs, or
    for stream=True an AsyncIterator[str] of text deltas. usage: token counts, filled once the call or stream
    ends ({} when the server reports none). request: what was sent, for the trace.
    """

    output: Any
    usage: dict[str, int] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    streaming: bool = False


def provider_for(connection: Connection) -> str:
    """The prompt flow provider an llm node resolves to for this connection."""
    if connection.type == "azure_open_ai":
        return "AzureOpenAI"
    if connection.type in ("open_ai", "openai_compatible"):
        return "OpenAI"
    raise LLMNodeError(
        f"Connection type {connection.type!r} of connection '{connection.name}' is not supported for LLM; "
        "use an open_ai, azure_open_ai or openai_compatible connection."
    )


def llm_parameter_names(connection: Connection, api: str, *, source_tool: str | None = None) -> set[str]:
    """Input names that are API parameters (not template variables) for this connection and api."""
    if source_tool == UNIFIED_LLM_TOOL:
        return set(UNIFIED_PARAMETERS) | {"connection", "prompt"}
    return set(TOOL_PARAMETERS[(provider_for(connection), api)]) | {"connection", "prompt"}


def _convert(name: str, value: Any, kind: type) -> Any:
    """Convert literal strings to the declared type, as prompt flow converts node literal inputs."""
    if not isinstance(value, str) or kind in (str, object):
        return value
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if kind is bool:
            return value.strip().lower() == "true"
        if kind in (list, dict):
            parsed = json.loads(value) if value.strip() else None
            return parsed if isinstance(parsed, kind) else value
    except ValueError:
        raise LLMNodeError(f"input '{name}' must be {kind.__name__}, got {value!r}") from None
    return value


def _to_bool(value: Any) -> bool:
    return str(value).lower() == "true"


def _validate_function(i: int, function: Any, what: str) -> None:
    if not isinstance(function, dict):
        raise LLMNodeError(f"{what} {i} '{function}' is not a dict.")
    for key in ("name", "parameters"):
        if key not in function:
            raise LLMNodeError(f"{what} {i} '{function}' does not have '{key}' property.")
    params = function["parameters"]
    if not isinstance(params, dict):
        raise LLMNodeError(
            f"{what} {i} '{function['name']}' parameters should be described as a JSON Schema object."
        )
    for key in ("type", "properties"):
        if key not in params:
            raise LLMNodeError(
                f"{what} {i} '{function['name']}' parameters '{params}' does not have '{key}' property."
            )
    if params["type"] != "object":
        raise LLMNodeError(f"{what} {i} '{function['name']}' parameters 'type' should be 'object'.")
    if not isinstance(params["properties"], dict):
        raise LLMNodeError(
            f"{what} {i} '{function['name']}' parameters 'properties' should be described as a JSON Schema object."
        )


def validate_functions(functions: Any) -> None:
    """prompt flow's checks on `functions`."""
    if not functions:
        raise LLMNodeError("functions cannot be an empty list.")
    for i, function in enumerate(functions):
        _validate_function(i, function, "function")


def validate_tools(tools: Any) -> None:
    """prompt flow's checks on `tools` (Azure OpenAI chat and prompty)."""
    if not tools:
        raise LLMNodeError("tools cannot be an empty list.")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise LLMNodeError(f"tool {i} '{tool}' is not a dict.")
        for key in ("type", "function"):
            if key not in tool:
                raise LLMNodeError(f"tool {i} '{tool}' does not have '{key}' property.")
        _validate_function(i, tool["function"], "function")


def process_function_call(function_call: Any) -> Any:
    """prompt flow's default and checks for `function_call`."""
    if function_call is None:
        return "auto"
    if function_call in ("auto", "none"):
        return function_call
    if not isinstance(function_call, dict):
        raise LLMNodeError(
            f"function_call parameter '{function_call}' must be a dict, but not {type(function_call)}."
        )
    if "name" not in function_call:
        raise LLMNodeError(f'function_call parameter {json.dumps(function_call)} must contain "name" field.')
    return function_call


def process_tool_choice(tool_choice: Any) -> Any:
    """prompt flow's default and checks for `tool_choice`."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none"):
        return tool_choice
    if not isinstance(tool_choice, dict):
        raise LLMNodeError(
            f"tool_choice parameter '{tool_choice}' must be a dict, but not {type(tool_choice)}."
        )
    for key in ("type", "function"):
        if key not in tool_choice:
            raise LLMNodeError(f'tool_choice parameter {json.dumps(tool_choice)} must contain "{key}" field.')
    if not isinstance(tool_choice["function"], dict) or "name" not in tool_choice["function"]:
        raise LLMNodeError(
            f'function parameter in tool_choice {json.dumps(tool_choice)} must contain "name" field.'
        )
    return tool_choice


def _chat_params(
    provider: str, p: Mapping[str, Any], messages: list[dict[str, Any]], stream: bool
) -> dict[str, Any]:
    """The request body prompt flow's OpenAI.chat / AzureOpenAI.chat builds."""
    params: dict[str, Any] = {
        "model": p.get("deployment_name", "") if provider == "AzureOpenAI" else p.get("model", ""),
        "messages": messages,
        "temperature": p.get("temperature", 1.0),
        "top_p": p.get("top_p", 1.0),
    }
    if provider == "AzureOpenAI":
        params["n"] = p.get("n", 1)
    params["stream"] = stream
    tools, functions = p.get("tools"), p.get("functions")
    # tools win over the deprecated functions when both are given.
    if tools:
        if provider == "AzureOpenAI":
            validate_tools(tools)
            params["tool_choice"] = process_tool_choice(p.get("tool_choice"))
        else:
            params["tool_choice"] = p.get("tool_choice")
        params["tools"] = tools
    elif functions:
        validate_functions(functions)
        params["functions"] = functions
        params["function_call"] = process_function_call(p.get("function_call"))
    if p.get("stop"):
        params["stop"] = p["stop"]
    max_tokens = p.get("max_tokens")
    if max_tokens is not None and str(max_tokens).lower() != "inf":
        params["max_tokens"] = int(max_tokens)
    if p.get("logit_bias"):
        params["logit_bias"] = p["logit_bias"]
    if p.get("response_format"):
        params["response_format"] = p["response_format"]
    if p.get("seed") is not None:
        params["seed"] = p["seed"]
    if p.get("presence_penalty") is not None:
        params["presence_penalty"] = p["presence_penalty"]
    if p.get("frequency_penalty") is not None:
        params["frequency_penalty"] = p["frequency_penalty"]
    if p.get("user"):
        params["user"] = p["user"]
    if provider == "AzureOpenAI":
        params["extra_headers"] = {"ms-azure-ai-promptflow-called-from": "aoai-tool"}
    return params


def _completion_params(provider: str, p: Mapping[str, Any], prompt: str, stream: bool) -> dict[str, Any]:
    """The request body prompt flow's OpenAI.completion / AzureOpenAI.completion builds."""
    max_tokens = p.get("max_tokens", 16)
    logprobs = p.get("logprobs")
    params: dict[str, Any] = {
        "prompt": prompt,
        "model": p.get("deployment_name", "")
        if provider == "AzureOpenAI"
        else p.get("model", "text-davinci-003"),
        "suffix": p.get("suffix") or None,
        "max_tokens": int(max_tokens) if max_tokens is not None else None,
        "temperature": float(p.get("temperature", 1.0)),
        "top_p": float(p.get("top_p", 1.0)),
        "n": int(p.get("n", 1)),
        "stream": stream,
        "logprobs": int(logprobs) if logprobs else None,
        "echo": _to_bool(p.get("echo", False)),
        "stop": p.get("stop") or None,
        "best_of": int(p.get("best_of", 1)),
        "logit_bias": p.get("logit_bias") or {},
        "user": p.get("user", ""),
    }
    presence, frequency = p.get("presence_penalty"), p.get("frequency_penalty")
    if provider == "AzureOpenAI":
        if presence is not None:
            params["presence_penalty"] = presence
        if frequency is not None:
            params["frequency_penalty"] = frequency
        params["extra_headers"] = {"ms-azure-ai-promptflow-called-from": "aoai-tool"}
    else:
        params["presence_penalty"] = float(presence) if presence is not None else None
        params["frequency_penalty"] = float(frequency) if frequency is not None else None
    return params


def split_inputs(
    connection: Connection, api: str, inputs: Mapping[str, Any], *, source_tool: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(API parameters, template variables) for an llm node's inputs, as prompt flow binds them."""
    if source_tool == UNIFIED_LLM_TOOL:
        declared = UNIFIED_PARAMETERS
        provider = provider_for(connection)
        params = {k: _convert(k, v, declared[k]) for k, v in inputs.items() if k in declared}
        variables = {k: v for k, v in inputs.items() if k not in declared}
        # The unified tool forwards only some of its parameters; the provider method then binds the rest of
        # what it received by name, so e.g. `user` or `n` given to it become parameters again.
        forwarded = {k: v for k, v in params.items() if k in _UNIFIED_FORWARD[api]}
        if provider == "AzureOpenAI":
            forwarded["deployment_name"] = params.get("deployment_name", "")
        else:
            forwarded["model"] = params.get("model", "")
        provider_params = TOOL_PARAMETERS[(provider, api)]
        for k in list(variables):
            if k in provider_params:
                forwarded[k] = _convert(k, variables.pop(k), provider_params[k])
        return forwarded, variables
    declared = TOOL_PARAMETERS[(provider_for(connection), api)]
    params = {k: _convert(k, v, declared[k]) for k, v in inputs.items() if k in declared}
    variables = {k: v for k, v in inputs.items() if k not in declared}
    return params, variables


def check_template_inputs(
    template: str,
    connection: Connection,
    api: str,
    *,
    node: str | None = None,
    source_tool: str | None = None,
) -> None:
    """Template variables must not shadow the tool's parameters (prompt flow refuses such a node)."""
    names = llm_parameter_names(connection, api, source_tool=source_tool)
    duplicated = sorted(template_variables(template) & names)
    if duplicated:
        provider = provider_for(connection)
        tool = UNIFIED_LLM_TOOL if source_tool == UNIFIED_LLM_TOOL else f"{provider}.{api}"
        raise LLMNodeError(
            f"Invalid inputs {set(duplicated)} in prompt template of node {node or '?'}. "
            f"These inputs are duplicated with the parameters of {tool}."
        )


async def run_llm_node(
    *,
    connection: Connection,
    api: Literal["chat", "completion"],
    template: str,
    template_path: str,
    inputs: Mapping[str, Any],
    stream: bool,
    inputs_to_escape: Collection[str] = (),
    source_tool: str | None = None,
    node: str | None = None,
    retry: llm.RetryPolicy | None = None,
) -> LLMNodeResult:
    """Run an llm node: inputs are split into parameters and template variables exactly as prompt flow does.

    inputs_to_escape: names of inputs bound to flow inputs (`${inputs.x}`); role lines inside them are not
    parsed as messages. PromptResult inputs (from prompt nodes) carry their own escaping.
    """
    if api not in ("chat", "completion"):
        raise LLMNodeError(f"api must be 'chat' or 'completion', got {api!r}")
    provider = provider_for(connection)
    check_template_inputs(template, connection, api, node=node, source_tool=source_tool)
    params_in, variables = split_inputs(connection, api, inputs, source_tool=source_tool)
    if api == "chat":
        # Azure OpenAI chat renders lists as newline-joined items; OpenAI chat renders Python lists.
        if provider == "AzureOpenAI":
            variables = convert_to_chat_list(variables)
        messages = build_messages(
            template, variables, inputs_to_escape=inputs_to_escape, template_path=template_path
        )
        if stream and params_in.get("functions") is not None:
            raise LLMNodeError("Function calling has not been supported by stream mode yet.")
        params = _chat_params(provider, params_in, messages, stream)
    else:
        prompt = render_template(template, variables, template_path=template_path)
        params = _completion_params(provider, params_in, prompt, stream)
    return await call_model(
        connection,
        api,
        params,
        retry=retry,
        as_message=bool(api == "chat" and (params_in.get("functions") or params_in.get("tools"))),
    )


def trace_request(connection: Connection, api: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """What was sent, safe for a trace (no key, no extra headers)."""
    return {
        "api": api,
        "connection": connection.name,
        "connection_type": connection.type,
        **{k: v for k, v in params.items() if k not in ("extra_headers", "stream_options")},
    }


async def call_model(
    connection: Connection,
    api: str,
    params: dict[str, Any],
    *,
    retry: llm.RetryPolicy | None = None,
    as_message: bool = False,
) -> LLMNodeResult:
    """Send a prepared request; returns text (or the message dict when as_message) or a stream of deltas."""
    stream = bool(params.get("stream"))
    request = trace_request(connection, api, params)
    body = dict(params)
    llm.stream_usage_option(connection, body)
    response = await llm.create(
        connection, "completion" if api == "completion" else "chat", body, policy=retry
    )
    if not stream:
        result = LLMNodeResult(
            output=None, usage=llm.usage_dict(getattr(response, "usage", None)), request=request
        )
        choice = response.choices[0]
        if api == "completion":
            result.output = choice.text
        elif as_message:
            result.output = response.model_dump()["choices"][0]["message"]
        else:
            result.output = getattr(choice.message, "content", "")
        return result
    result = LLMNodeResult(output=None, request=request, streaming=True)
    if api == "completion":

        def pick(chunk: Any) -> str | None:
            return getattr(chunk.choices[0], "text", "")

    else:

        def pick(chunk: Any) -> str | None:
            return getattr(chunk.choices[0].delta, "content", None)

    result.output = llm.iterate_stream(response, connection, api=api, pick=pick, usage=result.usage)
    return result
