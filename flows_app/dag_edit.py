"""Edits of a flow.dag.yaml text made by the structured view: add an input, an output or a node.

Pure functions from text to text. They insert new YAML at the end of the top-level section so that the user's
comments, key order and formatting survive; when the section's layout is unusual they fall back to rewriting
the whole document. Every result is parsed again and compared with the intended data before it is returned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import yaml

NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INPUT_TYPES: Final = ("string", "int", "double", "bool", "list", "object")
NODE_TYPES: Final = ("llm", "prompt", "python")
_TOP_KEY_RE: Final = re.compile(r"^([A-Za-z_$][\w$-]*)\s*:(.*)$")


class DagEditError(ValueError):
    """The edit cannot be made; the message names the field and the reason."""


def _load(text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DagEditError(f"flow.dag.yaml cannot be parsed{where}: fix it in raw mode first.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DagEditError("flow.dag.yaml must be a mapping at the top level: fix it in raw mode first.")
    return data


def _check_name(name: str, what: str) -> None:
    if not NAME_RE.match(name):
        raise DagEditError(f"{what} name '{name}': use letters, digits and '_', not starting with a digit.")


def _section_bounds(lines: list[str], key: str) -> tuple[int, int, str] | None:
    """(index of the `key:` line, index after its block, rest of the key line) for a top-level key."""
    start = None
    rest = ""
    for index, line in enumerate(lines):
        match = _TOP_KEY_RE.match(line)
        if match and match.group(1) == key:
            start, rest = index, match.group(2)
            break
    if start is None:
        return None
    end = start + 1
    last_content = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line.startswith((" ", "\t", "#", "-")):
            break
        if line.startswith("-") and not line.startswith("---"):
            last_content = end + 1
        elif line.strip() and not line.lstrip().startswith("#"):
            last_content = end + 1
        end += 1
    return start, last_content, rest


def _indent_of_children(lines: list[str], start: int, end: int) -> str | None:
    for line in lines[start + 1 : end]:
        if line.strip() and not line.lstrip().startswith("#"):
            return line[: len(line) - len(line.lstrip())]
    return None


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _insert(text: str, key: str, block: list[str], empty_value: str) -> str | None:
    """Insert `block` lines at the end of top-level section `key`; None when the layout is not a plain block."""
    lines = text.splitlines()
    bounds = _section_bounds(lines, key)
    if bounds is None:
        prefix = text if text.endswith("\n") or not text else text + "\n"
        return prefix + f"{key}:\n" + "\n".join(block) + "\n"
    start, end, rest = bounds
    value = rest.split("#", 1)[0].strip()
    if value in ("{}", "[]", "", "null", "~") and end == start + 1:
        lines[start] = f"{key}:"
        lines[start + 1 : start + 1] = block
        return "\n".join(lines) + "\n"
    if value:
        return None
    lines[end:end] = block
    return "\n".join(lines) + "\n"


def _mapping_block(lines_text: str, indent: str) -> list[str]:
    return [indent + line if line else line for line in lines_text.rstrip("\n").splitlines()]


def _finish(text: str, new_text: str | None, expected: dict[str, Any]) -> str:
    if new_text is not None:
        try:
            if yaml.safe_load(new_text) == expected:
                return new_text
        except yaml.YAMLError:
            pass
    # The section's layout (flow style, anchors, odd indentation) defeated the text edit: rewrite it all.
    return _dump(expected)


def dag_add_input(text: str, *, name: str, type: str = "string", default: Any = None) -> str:
    """flow.dag.yaml text with a new flow input `name` of `type` (and an optional default)."""
    _check_name(name, "Input")
    if type not in INPUT_TYPES:
        raise DagEditError(f"Input '{name}': type must be one of {', '.join(INPUT_TYPES)}.")
    data = _load(text)
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, Mapping):
        raise DagEditError("flow.dag.yaml: 'inputs' must be a mapping: fix it in raw mode first.")
    if name in inputs:
        raise DagEditError(f"Input '{name}' already exists.")
    spec: dict[str, Any] = {"type": type}
    if default not in (None, ""):
        spec["default"] = default
    expected = {**data, "inputs": {**inputs, name: spec}}
    lines = text.splitlines()
    bounds = _section_bounds(lines, "inputs")
    indent = "  "
    if bounds is not None:
        indent = _indent_of_children(lines, bounds[0], bounds[1]) or "  "
    block = _mapping_block(_dump({name: spec}), indent)
    return _finish(text, _insert(text, "inputs", block, "{}"), expected)


def dag_add_output(text: str, *, name: str, reference: str, type: str = "string") -> str:
    """flow.dag.yaml text with a new flow output `name` that takes `reference` (e.g. `${node.output}`)."""
    _check_name(name, "Output")
    data = _load(text)
    outputs = data.get("outputs") or {}
    if not isinstance(outputs, Mapping):
        raise DagEditError("flow.dag.yaml: 'outputs' must be a mapping: fix it in raw mode first.")
    if name in outputs:
        raise DagEditError(f"Output '{name}' already exists.")
    spec = {"type": type, "reference": reference}
    expected = {**data, "outputs": {**outputs, name: spec}}
    lines = text.splitlines()
    bounds = _section_bounds(lines, "outputs")
    indent = "  "
    if bounds is not None:
        indent = _indent_of_children(lines, bounds[0], bounds[1]) or "  "
    block = _mapping_block(_dump({name: spec}), indent)
    return _finish(text, _insert(text, "outputs", block, "{}"), expected)


def node_source_file(*, name: str, type: str) -> tuple[str, str]:
    """The (path, starter content) of the source file a new node of `type` gets."""
    if type == "python":
        return f"{name}.py", (
            f"from promptflow.core import tool\n\n\n@tool\ndef {name}(text: str) -> str:\n    return text\n"
        )
    if type == "llm":
        return f"{name}.jinja2", "system:\nYou are a helpful assistant.\n\nuser:\n{{text}}\n"
    return f"{name}.jinja2", "{{text}}\n"


def dag_add_node(
    text: str,
    *,
    name: str,
    type: str,
    source_path: str,
    inputs: Mapping[str, Any],
    connection: str = "",
    model: str = "",
) -> str:
    """flow.dag.yaml text with a new node appended to `nodes` (code source at `source_path`)."""
    _check_name(name, "Node")
    if type not in NODE_TYPES:
        raise DagEditError(f"Node '{name}': type must be one of {', '.join(NODE_TYPES)}.")
    data = _load(text)
    nodes = data.get("nodes") or []
    if not isinstance(nodes, list):
        raise DagEditError("flow.dag.yaml: 'nodes' must be a list: fix it in raw mode first.")
    if any(isinstance(n, Mapping) and n.get("name") == name for n in nodes):
        raise DagEditError(f"Node '{name}' already exists.")
    for key in inputs:
        _check_name(key, f"Node '{name}' input")
    node: dict[str, Any] = {"name": name, "type": type, "source": {"type": "code", "path": source_path}}
    node_inputs = dict(inputs)
    if type == "llm":
        if model:
            node_inputs = {"model": model, **node_inputs}
        node["inputs"] = node_inputs
        node["api"] = "chat"
        if not connection:
            raise DagEditError(f"Node '{name}': an llm node needs a connection name.")
        node["connection"] = connection
    else:
        node["inputs"] = node_inputs
    expected = {**data, "nodes": [*nodes, node]}
    lines = text.splitlines()
    bounds = _section_bounds(lines, "nodes")
    indent = ""
    if bounds is not None:
        for line in lines[bounds[0] + 1 : bounds[1]]:
            stripped = line.lstrip()
            if stripped.startswith("- "):
                indent = line[: len(line) - len(stripped)]
                break
    block = _mapping_block(_dump([node]), indent)
    return _finish(text, _insert(text, "nodes", block, "[]"), expected)
