"""Jinja2 rendering in a sandbox, chat-role parsing and role escaping, as prompt flow's llm and prompt tools do them."""

from __future__ import annotations

import ast
import functools
import re
import threading
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

VALID_ROLES: tuple[str, ...] = ("system", "user", "assistant", "function", "tool")


class TemplateError(Exception):
    """A template could not be rendered or its chat messages parsed; carries the file and line when known."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)


class ChatParseError(TemplateError):
    """The rendered chat prompt does not follow prompt flow's role format."""


# -- rendering ------------------------------------------------------------------------------------------

_env_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def sandbox_environment() -> SandboxedEnvironment:
    """The shared sandbox: trim_blocks and keep_trailing_newline, as prompt flow's tools render."""
    # keep_trailing_newline keeps "user:\t\n" from becoming "user:" at the end of a prompt.
    return SandboxedEnvironment(trim_blocks=True, keep_trailing_newline=True)


@functools.lru_cache(maxsize=512)
def _compile(template: str) -> jinja2.Template:
    env = sandbox_environment()
    with _env_lock:
        return env.from_string(template)


def template_variables(template: str) -> set[str]:
    """The undeclared variables a template reads (its inputs); empty when it does not parse."""
    return set(_template_variables(template))


# An llm node checks its template's variables on every line; parsing it each time costs more than the render.
@functools.lru_cache(maxsize=512)
def _template_variables(template: str) -> frozenset[str]:
    try:
        return frozenset(meta.find_undeclared_variables(sandbox_environment().parse(template)))
    except jinja2.TemplateSyntaxError:
        return frozenset()


def render_template(
    template: str,
    variables: Mapping[str, Any],
    *,
    template_path: str | None = None,
    line_offset: int = 0,
    escape_dict: Mapping[str, str] | None = None,
) -> str:
    """Render `template` in the sandbox; errors become TemplateError with prompt flow's wording, file and line."""
    try:
        return _compile(template).render(**dict(variables))
    except jinja2.TemplateSyntaxError as exc:
        message = unescape_roles(str(exc.message or exc), escape_dict or {})
        raise TemplateError(
            f"Failed to render jinja template: {type(exc).__name__}: {message}. "
            "Please modify your prompt to fix the issue.",
            file=template_path,
            line=(exc.lineno + line_offset) if exc.lineno else None,
        ) from None
    except Exception as exc:  # anything a template can raise at render time is the prompt author's error
        message = unescape_roles(str(exc), escape_dict or {})
        raise TemplateError(
            f"Failed to render jinja template: {type(exc).__name__}: {message}. "
            "Please modify your prompt to fix the issue.",
            file=template_path,
            line=_render_error_line(exc, line_offset),
        ) from exc


def _render_error_line(exc: BaseException, line_offset: int) -> int | None:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line + line_offset if line else None


# -- escaping of role-like text in inputs ---------------------------------------------------------------


class ChatInputList(list):  # type: ignore[type-arg]
    """A list that renders as its items joined by newlines (what Azure OpenAI chat gives templates)."""

    def __str__(self) -> str:
        return "\n".join(map(str, self))


def convert_to_chat_list(obj: Any) -> Any:
    """Lists (also nested in dicts) become ChatInputList, as prompt flow's Azure OpenAI chat does to its inputs."""
    if isinstance(obj, dict):
        return {key: convert_to_chat_list(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return ChatInputList([convert_to_chat_list(item) for item in obj])
    return obj


class PromptResult(str):
    """A prompt node's output: the rendered text, plus the escaped text and role mapping an llm node needs."""

    escaped_string: str
    escaped_mapping: dict[str, str]

    def __new__(cls, value: str) -> PromptResult:
        obj = super().__new__(cls, value)
        obj.escaped_string = ""
        obj.escaped_mapping = {}
        return obj

    def need_to_escape(self) -> bool:
        """Whether role-like text from inputs was escaped in this result."""
        return bool(self.escaped_mapping)


_ROLE_LINE = re.compile(r"(?i)^\s*#?\s*(" + "|".join(VALID_ROLES) + r")\s*:\s*\n", re.MULTILINE)


def _collect_roles(val: Any, escape: dict[str, str], recurse_dicts: bool) -> None:
    if isinstance(val, ChatInputList):
        for item in val:
            _collect_roles(item, escape, recurse_dicts)
    elif recurse_dicts and isinstance(val, dict):
        for item in val.values():
            _collect_roles(item, escape, recurse_dicts)
    elif isinstance(val, str):
        for role in _ROLE_LINE.findall(val):
            # One uuid per spelling ("system", "System"...) so each spelling comes back unchanged.
            if role not in escape.values():
                escape[str(uuid.uuid4())] = role


def _escape_value(val: Any, escape: Mapping[str, str], recurse_dicts: bool) -> Any:
    if not escape:
        return val
    if isinstance(val, ChatInputList):
        return ChatInputList([_escape_value(item, escape, recurse_dicts) for item in val])
    if isinstance(val, str):
        text = str.__str__(val)
        for encoded, role in escape.items():
            text = text.replace(role, encoded)
        return text
    if recurse_dicts and isinstance(val, dict):
        # A copy: prompt flow edits the caller's dict in place, which would leak uuids into other nodes.
        return {k: _escape_value(v, escape, recurse_dicts) for k, v in val.items()}
    return val


def build_escape_dict(
    inputs: Mapping[str, Any], inputs_to_escape: Collection[str], *, recurse_dicts: bool = True
) -> dict[str, str]:
    """uuid -> role for every role line found in the escaped inputs and in PromptResult inputs."""
    escape: dict[str, str] = {}
    for v in inputs.values():
        if isinstance(v, PromptResult) and v.need_to_escape():
            escape.update(v.escaped_mapping)
    from_inputs: dict[str, str] = {}
    for k, v in inputs.items():
        if k in inputs_to_escape:
            _collect_roles(v, from_inputs, recurse_dicts)
    escape.update(from_inputs)
    return escape


def escape_inputs(
    inputs: Mapping[str, Any],
    escape: Mapping[str, str],
    inputs_to_escape: Collection[str],
    *,
    recurse_dicts: bool = True,
) -> dict[str, Any]:
    """The inputs with role words replaced by their uuids (PromptResult inputs use their escaped text)."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, PromptResult) and v.need_to_escape():
            out[k] = v.escaped_string
        elif inputs_to_escape and k in inputs_to_escape:
            out[k] = _escape_value(v, escape, recurse_dicts)
        else:
            out[k] = v
    return out


def unescape_roles(val: Any, escape: Mapping[str, str]) -> Any:
    """Put the original role words back in a parsed value (a string or a list of content parts)."""
    if not escape:
        return val
    if isinstance(val, str):
        for encoded, role in escape.items():
            val = val.replace(encoded, role)
        return val
    if isinstance(val, list):
        for index, item in enumerate(val):
            if isinstance(item, dict) and "text" in item:
                for encoded, role in escape.items():
                    val[index]["text"] = item["text"].replace(encoded, role)
        return val
    return val


# -- chat parsing ---------------------------------------------------------------------------------------


def _try_parse_name_and_content(role_prompt: str) -> tuple[str, str] | None:
    # "## name:" / "## content:" headers are allowed for markdown highlighting.
    pattern = r"\n*#{0,2}\s*name\s*:\s*\n+\s*(\S+)\s*\n*#{0,2}\s*content\s*:\s*\n?(.*)"
    match = re.search(pattern, role_prompt, re.DOTALL)
    return (match.group(1), match.group(2)) if match else None


def _try_parse_tool_call_id_and_content(role_prompt: str) -> tuple[str, str] | None:
    pattern = r"\n*#{0,2}\s*tool_call_id\s*:\s*\n+\s*(\S+)\s*\n*#{0,2}\s*content\s*:\s*\n?(.*)"
    match = re.search(pattern, role_prompt, re.DOTALL)
    return (match.group(1), match.group(2)) if match else None


def _try_parse_tool_calls(role_prompt: str) -> Any:
    pattern = r"\n*#{0,2}\s*tool_calls\s*:\s*\n+\s*(\[.*?\])"
    match = re.search(pattern, role_prompt, re.DOTALL)
    if match:
        try:
            return ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return None


def _content(chunk: str) -> str:
    # Without images prompt flow's to_content_str_or_list returns the stripped text.
    return chunk.strip()


def _invalid_role_message(role: str, valid_roles: Collection[str], escape: Mapping[str, str]) -> str:
    valid = ",".join(f"'{r}:\\n'" for r in valid_roles)
    return (
        "The Chat API requires a specific format for prompt definition, and the prompt should include separate "
        f"lines as role delimiters: {valid}. Current parsed role '{unescape_roles(role, escape)}'"
        " does not meet the requirement. If you intend to use the Completion API, please select the appropriate"
        " API type and deployment name. If you do intend to use the Chat API, please refer to the guideline at "
        "https://aka.ms/pfdoc/chat-prompt or view the samples in our gallery that contain 'Chat' in the name."
    )


def parse_chat(
    chat_str: str,
    *,
    valid_roles: Collection[str] | None = None,
    escape_dict: Mapping[str, str] | None = None,
    template_path: str | None = None,
) -> list[dict[str, Any]]:
    """Split a rendered chat prompt into messages by `role:` lines (optional `#`, any case), as prompt flow does."""
    roles = list(valid_roles or VALID_ROLES)
    escape = escape_dict or {}
    separator = r"(?i)^\s*#?\s*(" + "|".join(roles) + r")\s*:\s*\n"
    chunks = re.split(separator, chat_str, flags=re.MULTILINE)
    chat_list: list[dict[str, Any]] = []
    for chunk in chunks:
        last = chat_list[-1] if chat_list else None
        if last is not None and last.get("role") == "tool" and "content" not in last:
            parsed = _try_parse_tool_call_id_and_content(chunk)
            if parsed is None:
                raise ChatParseError(
                    "Failed to parse tool role prompt. Please make sure the prompt follows the "
                    "format: 'tool_call_id:\\ntool_call_id\\ncontent:\\ntool_content'. "
                    "'tool_call_id' is required if role is tool, and it should be the tool call that this message "
                    "is responding to. See more details in "
                    "https://platform.openai.com/docs/api-reference/chat/create#chat-create-messages",
                    file=template_path,
                )
            last["tool_call_id"] = parsed[0]
            last["content"] = _content(parsed[1])
            continue
        if last is not None and last.get("role") == "assistant":
            tool_calls = _try_parse_tool_calls(chunk)
            if tool_calls is not None:
                last["tool_calls"] = tool_calls
                continue
        if last is not None and "content" not in last and "tool_calls" not in last:
            parsed = _try_parse_name_and_content(chunk)
            if parsed is None:
                if last["role"] == "function":
                    raise ChatParseError(
                        "Failed to parse function role prompt. Please make sure the prompt follows the "
                        "format: 'name:\\nfunction_name\\ncontent:\\nfunction_content'. "
                        "'name' is required if role is function, and it should be the name of the function "
                        "whose response is in the content. May contain a-z, A-Z, 0-9, and underscores, "
                        "with a maximum length of 64 characters. See more details in "
                        "https://platform.openai.com/docs/api-reference/chat/create#chat/create-name "
                        "or view sample 'How to use functions with chat models' in our gallery.",
                        file=template_path,
                    )
                last["content"] = _content(chunk)
            else:
                last["name"] = parsed[0]
                last["content"] = _content(parsed[1])
        else:
            if chunk.strip() == "":
                continue
            role = chunk.strip().lower()
            if role not in roles:
                raise ChatParseError(_invalid_role_message(role, roles, escape), file=template_path)
            chat_list.append({"role": role})
    return chat_list


def build_messages(
    template: str,
    inputs: Mapping[str, Any],
    *,
    inputs_to_escape: Collection[str] = (),
    recurse_dicts: bool = True,
    template_path: str | None = None,
    line_offset: int = 0,
) -> list[dict[str, Any]]:
    """Render a chat template and parse it into messages, escaping role lines in `inputs_to_escape` first.

    recurse_dicts: prompt flow's llm tool also escapes strings inside dict inputs; its prompty does not.
    """
    escape = build_escape_dict(inputs, inputs_to_escape, recurse_dicts=recurse_dicts)
    variables = escape_inputs(inputs, escape, inputs_to_escape, recurse_dicts=recurse_dicts)
    chat_str = render_template(
        template, variables, template_path=template_path, line_offset=line_offset, escape_dict=escape
    )
    messages = parse_chat(chat_str, escape_dict=escape, template_path=template_path)
    if escape:
        for message in messages:
            for key, val in message.items():
                message[key] = unescape_roles(val, escape)
    return messages


def render_prompt(
    template: str,
    inputs: Mapping[str, Any],
    *,
    inputs_to_escape: Collection[str] = (),
    template_path: str | None = None,
) -> PromptResult:
    """What a `prompt` node returns: the rendered text, carrying the escaping an llm node downstream needs."""
    result = PromptResult(render_template(template, inputs, template_path=template_path))
    escape = build_escape_dict(inputs, inputs_to_escape)
    if escape:
        result.escaped_mapping = dict(escape)
        variables = escape_inputs(inputs, escape, inputs_to_escape)
        result.escaped_string = render_template(
            template, variables, template_path=template_path, escape_dict=escape
        )
    return result


_IMAGE_MD = re.compile(r"\!\[(\s*image\s*)\]\(\{\{(\s*[^\s{}]+\s*)\}\}\)")


def preprocess_template_string(template: str) -> str:
    """Put `![image]({{var}})` markdown on its own line as `{{var}}`, as prompt flow does before rendering."""
    for match in _IMAGE_MD.findall(template):
        original = f"![{match[0]}]({{{{{match[1]}}}}})"
        template = template.replace(original, f"\n{{{{{match[1]}}}}}\n")
    return template
