"""Load flow.dag.yaml, flow.flex.yaml and .prompty files into the immutable Flow model.

YAML is read with a safe loader that refuses python tags, duplicate keys, alias bombs, deep nesting and
oversized files, and records the line and column of every key so problems can point at them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.nodes import Node as YamlNode

from flowengine.model import (
    Activate,
    Flow,
    FlowValidationError,
    InputDef,
    Node,
    NodeSource,
    NodeVariant,
    NodeVariants,
    OutputDef,
    Problem,
    frozen_mapping,
)

DAG_FILE = "flow.dag.yaml"
FLEX_FILE = "flow.flex.yaml"
FLOW_FILES = (DAG_FILE, "flow.dag.yml", FLEX_FILE, "flow.flex.yml")
PROMPTY_SUFFIX = ".prompty"

MAX_YAML_BYTES = 10 * 1024 * 1024
MAX_ALIASES = 100
MAX_DEPTH = 100


class _LimitedSafeLoader(yaml.SafeLoader):
    """A SafeLoader with limits on aliases and nesting depth, and a refusal of duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: YamlNode | None, index: Any) -> YamlNode | None:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(
                    problem=f"more than {MAX_ALIASES} aliases; refusing to expand them", problem_mark=mark
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(
                    problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=mark
                )
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


def _check_duplicates(node: YamlNode) -> None:
    """Raise a marked error on the second occurrence of a key in any mapping."""
    stack = [node]
    seen_nodes: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, MappingNode):
            keys: set[Any] = set()
            for key_node, value_node in current.value:
                if isinstance(key_node, ScalarNode):
                    if key_node.value in keys and key_node.tag != "tag:yaml.org,2002:merge":
                        raise yaml.MarkedYAMLError(
                            problem=f"duplicate key {key_node.value!r}", problem_mark=key_node.start_mark
                        )
                    keys.add(key_node.value)
                stack.append(value_node)
        elif isinstance(current, SequenceNode):
            stack.extend(current.value)


def _record_locations(node: YamlNode, prefix: str, out: dict[str, tuple[int, int]]) -> None:
    """Map each dotted key path to the 1-based line and column of its key.

    List items are addressed by their `name` field when they have one (nodes), else by index.
    """
    stack: list[tuple[YamlNode, str]] = [(node, prefix)]
    while stack:
        current, path = stack.pop()
        if isinstance(current, MappingNode):
            for key_node, value_node in current.value:
                if not isinstance(key_node, ScalarNode):
                    continue
                child = f"{path}.{key_node.value}" if path else str(key_node.value)
                out.setdefault(child, (key_node.start_mark.line + 1, key_node.start_mark.column + 1))
                stack.append((value_node, child))
        elif isinstance(current, SequenceNode):
            for index, item in enumerate(current.value):
                label = str(index)
                if isinstance(item, MappingNode):
                    for key_node, value_node in item.value:
                        if getattr(key_node, "value", None) == "name" and isinstance(value_node, ScalarNode):
                            label = str(value_node.value)
                            break
                child = f"{path}.{label}" if path else label
                out.setdefault(child, (item.start_mark.line + 1, item.start_mark.column + 1))
                stack.append((item, child))


def load_yaml_text(text: str, file: str, *, line_offset: int = 0) -> tuple[Any, dict[str, tuple[int, int]]]:
    """Safely parse YAML text; returns (data, locations). Raises FlowValidationError with line and column."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise FlowValidationError(
            [Problem(message=f"the file is larger than {MAX_YAML_BYTES // (1024 * 1024)} MB", file=file)]
        )
    loader = _LimitedSafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        _check_duplicates(root)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
        raise FlowValidationError(
            [
                Problem(
                    message=f"invalid YAML: {message}",
                    file=file,
                    line=(mark.line + 1 + line_offset) if mark else None,
                    column=(mark.column + 1) if mark else None,
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise FlowValidationError([Problem(message=f"invalid YAML: {exc}", file=file)]) from None
    except RecursionError:
        raise FlowValidationError([Problem(message="invalid YAML: nested too deeply", file=file)]) from None
    finally:
        loader.dispose()
    locations: dict[str, tuple[int, int]] = {}
    _record_locations(root, "", locations)
    if line_offset:
        locations = {k: (line + line_offset, col) for k, (line, col) in locations.items()}
    return data, locations


def _read_text(path: Path, file: str) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FlowValidationError(
            [Problem(message=f"cannot read the file: {exc.strerror}", file=file)]
        ) from None
    if size > MAX_YAML_BYTES:
        raise FlowValidationError(
            [Problem(message=f"the file is larger than {MAX_YAML_BYTES // (1024 * 1024)} MB", file=file)]
        )
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FlowValidationError(
            [Problem(message=f"the file is not valid UTF-8 (byte {exc.start})", file=file)]
        ) from None
    except OSError as exc:
        raise FlowValidationError(
            [Problem(message=f"cannot read the file: {exc.strerror}", file=file)]
        ) from None


def find_flow_file(path: str | Path) -> tuple[Path, str]:
    """Resolve a folder or file to (flow folder, file name relative to it); raises FlowValidationError."""
    target = Path(path)
    if target.is_file():
        return target.parent.resolve(), target.name
    if not target.is_dir():
        raise FlowValidationError([Problem(message=f"no flow at '{path}': not a file or folder")])
    folder = target.resolve()
    for name in FLOW_FILES:
        if (folder / name).is_file():
            return folder, name
    prompties = sorted(p.name for p in folder.glob(f"*{PROMPTY_SUFFIX}") if p.is_file())
    if len(prompties) == 1:
        return folder, prompties[0]
    if len(prompties) > 1:
        raise FlowValidationError(
            [
                Problem(
                    message=(
                        f"the folder has no {DAG_FILE} or {FLEX_FILE} and several .prompty files "
                        f"({', '.join(prompties)}); name the one to use"
                    )
                )
            ]
        )
    raise FlowValidationError(
        [Problem(message=f"the folder '{path}' has no {DAG_FILE}, {FLEX_FILE} or .prompty file")]
    )


def load_flow(path: str | Path) -> Flow:
    """Read a flow folder (or a flow file) of any of the three formats into a Flow.

    Raises FlowValidationError when the file cannot be read or parsed at all; structural problems found
    while reading are kept on `Flow.load_problems` and reported by `validate` with the rest.
    """
    folder, file = find_flow_file(path)
    if file.endswith(PROMPTY_SUFFIX):
        return _load_prompty_flow(folder, file)
    text = _read_text(folder / file, file)
    data, locations = load_yaml_text(text, file)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise FlowValidationError(
            [Problem(message="the flow file must be a YAML mapping at the top level", file=file, line=1)]
        )
    builder = _Builder(folder, file, locations)
    if file.startswith("flow.flex") or ("entry" in data and "nodes" not in data):
        return builder.flex(data)
    return builder.dag(data)


def _load_prompty_flow(folder: Path, file: str) -> Flow:
    from flowengine.prompty import load_prompty

    spec = load_prompty(folder / file)
    inputs = {}
    for name, raw in (getattr(spec, "inputs", None) or {}).items():
        raw = raw if isinstance(raw, Mapping) else {"default": raw}
        inputs[name] = InputDef(
            name=str(name),
            type=str(raw.get("type", "string")),
            default=raw.get("default"),
            description=str(raw.get("description") or ""),
            is_chat_input=bool(raw.get("is_chat_input", False)),
            is_chat_history=bool(raw.get("is_chat_history", False)),
        )
    outputs = {}
    for name, raw in (getattr(spec, "outputs", None) or {}).items():
        raw = raw if isinstance(raw, Mapping) else {}
        outputs[name] = OutputDef(name=str(name), type=str(raw.get("type", "string")))
    if not outputs:
        outputs = {"output": OutputDef(name="output", type="string")}
    sample = getattr(spec, "sample", None)
    return Flow(
        kind="prompty",
        path=folder,
        file=file,
        inputs=frozen_mapping(inputs),
        outputs=frozen_mapping(outputs),
        prompty=spec,
        name=str(getattr(spec, "name", "") or Path(file).stem),
        description=str(getattr(spec, "description", "") or ""),
        sample=frozen_mapping(sample) if isinstance(sample, Mapping) else None,
    )


class _Builder:
    """Turns parsed YAML into model objects, collecting structural problems instead of stopping."""

    def __init__(self, folder: Path, file: str, locations: dict[str, tuple[int, int]]) -> None:
        self.folder = folder
        self.file = file
        self.locations = locations
        self.problems: list[Problem] = []

    def problem(self, message: str, *keys: str, node: str | None = None, field: str | None = None) -> None:
        line, column = self._locate(keys)
        self.problems.append(
            Problem(message=message, file=self.file, line=line, column=column, node=node, field=field)
        )

    def _locate(self, keys: tuple[str, ...]) -> tuple[int | None, int | None]:
        parts = list(keys)
        while parts:
            loc = self.locations.get(".".join(parts))
            if loc is not None:
                return loc
            parts.pop()
        return None, None

    def mapping(self, value: Any, *keys: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(f"'{'.'.join(keys)}' must be a mapping", *keys, field=".".join(keys))
            return {}
        return value

    def common(self, data: Mapping[str, Any]) -> dict[str, Any]:
        env_vars = self.mapping(data.get("environment_variables"), "environment_variables")
        includes = data.get("additional_includes") or []
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            self.problem(
                "'additional_includes' must be a list of relative paths",
                "additional_includes",
                field="additional_includes",
            )
            includes = []
        return {
            "environment_variables": frozen_mapping(
                {str(k): "" if v is None else str(v) for k, v in env_vars.items()}
            ),
            "additional_includes": tuple(includes),
            "environment": frozen_mapping(self.mapping(data.get("environment"), "environment")),
            "name": str(data.get("display_name") or data.get("name") or self.folder.name),
            "description": str(data.get("description") or ""),
            "flow_type": str(data.get("type") or "standard"),
        }

    def input_def(self, name: str, raw: Any, section: str) -> InputDef:
        line = self.locations.get(f"{section}.{name}", (None, None))[0]
        if not isinstance(raw, Mapping):
            # `inputs: {x: string}` is a common shorthand in hand-written files.
            if isinstance(raw, str):
                return InputDef(name=name, type=raw, line=line)
            self.problem(f"{section[:-1]} '{name}' must be a mapping with a 'type'", section, name)
            return InputDef(name=name, line=line)
        enum = raw.get("enum") or ()
        return InputDef(
            name=name,
            type=str(raw.get("type", "")) if raw.get("type") is not None else "",
            default=raw.get("default"),
            description=str(raw.get("description") or ""),
            enum=tuple(enum) if isinstance(enum, list) else (),
            is_chat_input=bool(raw.get("is_chat_input", False)),
            is_chat_history=bool(raw.get("is_chat_history", False)),
            line=line,
        )

    def inputs(self, data: Mapping[str, Any], section: str = "inputs") -> dict[str, InputDef]:
        return {
            str(name): self.input_def(str(name), raw, section)
            for name, raw in self.mapping(data.get(section), section).items()
        }

    def outputs(self, data: Mapping[str, Any]) -> dict[str, OutputDef]:
        result = {}
        for name, raw in self.mapping(data.get("outputs"), "outputs").items():
            name = str(name)
            line = self.locations.get(f"outputs.{name}", (None, None))[0]
            if not isinstance(raw, Mapping):
                if isinstance(raw, str):
                    result[name] = OutputDef(name=name, type=raw, line=line)
                    continue
                self.problem(f"output '{name}' must be a mapping", "outputs", name, field=f"outputs.{name}")
                result[name] = OutputDef(name=name, line=line)
                continue
            result[name] = OutputDef(
                name=name,
                type=str(raw.get("type", "")) if raw.get("type") is not None else "",
                reference=raw.get("reference"),
                description=str(raw.get("description") or ""),
                is_chat_output=bool(raw.get("is_chat_output", False)),
                evaluation_only=bool(raw.get("evaluation_only", False)),
                line=line,
            )
        return result

    def node(self, raw: Any, keys: tuple[str, ...], name: str | None = None) -> Node | None:
        if not isinstance(raw, Mapping):
            self.problem("a node must be a mapping", *keys)
            return None
        node_name = name if name is not None else raw.get("name")
        if not node_name or not isinstance(node_name, str):
            self.problem("a node needs a 'name'", *keys, field="name")
            node_name = f"<node {keys[-1]}>"
        source_raw = raw.get("source") or {}
        if isinstance(source_raw, str):
            source = NodeSource(type="code", path=source_raw)
        elif isinstance(source_raw, Mapping):
            source = NodeSource(
                type=str(source_raw.get("type") or "code"),
                path=None if source_raw.get("path") is None else str(source_raw.get("path")),
                tool=None if source_raw.get("tool") is None else str(source_raw.get("tool")),
            )
        else:
            self.problem("'source' must be a mapping", *keys, "source", node=node_name, field="source")
            source = NodeSource()
        inputs = raw.get("inputs") or {}
        if not isinstance(inputs, Mapping):
            self.problem("'inputs' must be a mapping", *keys, "inputs", node=node_name, field="inputs")
            inputs = {}
        activate = None
        activate_raw = raw.get("activate")
        if activate_raw is not None:
            if (
                not isinstance(activate_raw, Mapping)
                or "when" not in activate_raw
                or "is" not in activate_raw
            ):
                self.problem(
                    "'activate' must be a mapping with 'when' and 'is'",
                    *keys,
                    "activate",
                    node=node_name,
                    field="activate",
                )
            else:
                activate = Activate(when=activate_raw["when"], is_value=activate_raw["is"])
        line = self.locations.get(".".join(keys), (None, None))[0]
        return Node(
            name=node_name,
            type=str(raw.get("type") or ""),
            source=source,
            inputs=frozen_mapping({str(k): v for k, v in inputs.items()}),
            connection=None if raw.get("connection") is None else str(raw.get("connection")),
            api=None if raw.get("api") is None else str(raw.get("api")),
            provider=None if raw.get("provider") is None else str(raw.get("provider")),
            module=None if raw.get("module") is None else str(raw.get("module")),
            aggregation=bool(raw.get("aggregation", False) or raw.get("reduce", False)),
            use_variants=bool(raw.get("use_variants", False)),
            activate=activate,
            enable_cache=bool(raw.get("enable_cache", False)),
            comment=str(raw.get("comment") or ""),
            line=line,
        )

    def dag(self, data: Mapping[str, Any]) -> Flow:
        nodes_raw = data.get("nodes")
        if nodes_raw is None:
            nodes_raw = []
        if not isinstance(nodes_raw, list):
            self.problem("'nodes' must be a list", "nodes", field="nodes")
            nodes_raw = []
        nodes = []
        for index, raw in enumerate(nodes_raw):
            label = (
                raw.get("name") if isinstance(raw, Mapping) and isinstance(raw.get("name"), str) else index
            )
            node = self.node(raw, ("nodes", str(label)))
            if node is not None:
                nodes.append(node)
        variants: dict[str, NodeVariants] = {}
        for node_name, raw in self.mapping(data.get("node_variants"), "node_variants").items():
            node_name = str(node_name)
            keys = ("node_variants", node_name)
            if not isinstance(raw, Mapping):
                self.problem("node variants must be a mapping", *keys, node=node_name)
                continue
            bodies = {}
            for variant_id, body in self.mapping(raw.get("variants"), *keys, "variants").items():
                variant_id = str(variant_id)
                vkeys = (*keys, "variants", variant_id)
                if not isinstance(body, Mapping) or not isinstance(body.get("node"), Mapping):
                    self.problem(f"variant '{variant_id}' needs a 'node'", *vkeys, node=node_name)
                    continue
                vnode = self.node(body["node"], (*vkeys, "node"), name=node_name)
                if vnode is not None:
                    bodies[variant_id] = NodeVariant(
                        node=vnode, description=str(body.get("description") or "")
                    )
            default_id = raw.get("default_variant_id")
            variants[node_name] = NodeVariants(
                default_variant_id=str(default_id) if default_id is not None else "",
                variants=frozen_mapping(bodies),
            )
        flow = Flow(
            kind="dag",
            path=self.folder,
            file=self.file,
            inputs=frozen_mapping(self.inputs(data)),
            outputs=frozen_mapping(self.outputs(data)),
            nodes=tuple(nodes),
            node_variants=frozen_mapping(variants),
            locations=frozen_mapping(self.locations),
            **self.common(data),
        )
        return _with_problems(flow, self.problems)

    def flex(self, data: Mapping[str, Any]) -> Flow:
        entry = data.get("entry")
        if entry is not None and not isinstance(entry, str):
            self.problem("'entry' must be a string 'module:function'", "entry", field="entry")
            entry = None
        code = data.get("code") or "."
        if not isinstance(code, str):
            self.problem("'code' must be a relative folder", "code", field="code")
            code = "."
        sample = self.sample(data.get("sample"))
        flow = Flow(
            kind="flex",
            path=self.folder,
            file=self.file,
            inputs=frozen_mapping(self.inputs(data)),
            outputs=frozen_mapping(self.outputs(data)),
            entry=entry,
            code=code,
            init=frozen_mapping(self.inputs(data, "init")),
            sample=sample,
            locations=frozen_mapping(self.locations),
            **self.common(data),
        )
        return _with_problems(flow, self.problems)

    def sample(self, raw: Any) -> Mapping[str, Any] | None:
        if raw is None:
            return None
        if isinstance(raw, str) and raw.startswith("${file:") and raw.endswith("}"):
            rel = raw[len("${file:") : -1].strip()
            target = (self.folder / rel).resolve()
            if not target.is_relative_to(self.folder):
                self.problem(f"sample file '{rel}' is outside the flow folder", "sample", field="sample")
                return None
            try:
                raw = json.loads(target.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                self.problem(f"cannot read sample file '{rel}': {exc}", "sample", field="sample")
                return None
        if not isinstance(raw, Mapping):
            self.problem("'sample' must be a mapping", "sample", field="sample")
            return None
        return frozen_mapping(raw)


def _with_problems(flow: Flow, problems: list[Problem]) -> Flow:
    if not problems:
        return flow
    from dataclasses import replace

    return replace(flow, load_problems=tuple(problems))
