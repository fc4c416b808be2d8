"""The flow model: one immutable shape for flow.dag.yaml, flow.flex.yaml and .prompty flows."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from flowengine.prompty import PromptySpec

FlowKind = Literal["dag", "flex", "prompty"]

# Value types prompt flow accepts for flow inputs and outputs.
VALUE_TYPES = ("int", "double", "bool", "string", "list", "object", "image")
NODE_TYPES = ("llm", "python", "prompt", "custom_llm")
SOURCE_TYPES = ("code", "package", "package_with_prompt")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


def frozen_mapping(data: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of a copy of `data`, so the model stays immutable."""
    if not data:
        return _EMPTY
    return MappingProxyType(dict(data))


@dataclass(frozen=True)
class Problem:
    """One validation problem, located as precisely as the source allows."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    node: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        what = []
        if self.node:
            what.append(f"node '{self.node}'")
        if self.field:
            what.append(f"field '{self.field}'")
        prefix = (", ".join(what) + ": ") if what else ""
        return f"{where}{prefix}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of this problem."""
        return {
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "node": self.node,
            "field": self.field,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        """The inverse of `to_dict`."""
        return cls(
            message=str(data.get("message", "")),
            file=data.get("file"),
            line=data.get("line"),
            column=data.get("column"),
            node=data.get("node"),
            field=data.get("field"),
        )


class FlowValidationError(Exception):
    """A flow could not be loaded or is not valid; `.problems` lists every problem found."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return "the flow is not valid"
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"] + [f"  {p}" for p in self.problems]
        return "\n".join(lines)


_REFERENCE_RE = re.compile(r"^\$\{([^{}]+)\}$")
FLOW_INPUT_PREFIXES = ("inputs.", "flow.")


@dataclass(frozen=True)
class Reference:
    """A parsed `${...}` reference: to a flow input, or to (a property of) a node's output."""

    kind: Literal["input", "node"]
    name: str
    section: str = ""
    property: str = ""
    raw: str = ""

    def serialize(self) -> str:
        """The canonical text of the reference, as prompt flow keys aggregation inputs."""
        if self.kind == "input":
            return "${inputs." + self.name + "}"
        text = f"{self.name}.{self.section}"
        if self.property:
            text += f".{self.property}"
        return "${" + text + "}"


def parse_reference(value: Any) -> Reference | None:
    """Parse a whole-value `${...}` reference as prompt flow does, or None for a literal."""
    if not isinstance(value, str):
        return None
    return _parse_reference_text(value)


# The executor resolves every node input of every line: the same few texts, parsed once.
@functools.lru_cache(maxsize=4096)
def _parse_reference_text(value: str) -> Reference | None:
    match = _REFERENCE_RE.match(value.strip())
    if not match:
        return None
    body = match.group(1).strip()
    for prefix in FLOW_INPUT_PREFIXES:
        if body.startswith(prefix):
            return Reference(kind="input", name=body[len(prefix) :], raw=value)
    if "." not in body:
        return Reference(kind="node", name=body, section="output", raw=value)
    node_name, rest = body.split(".", 1)
    if "." not in rest:
        return Reference(kind="node", name=node_name, section=rest, raw=value)
    section, prop = rest.split(".", 1)
    return Reference(kind="node", name=node_name, section=section, property=prop, raw=value)


_PROPERTY_RE = re.compile(r"(\w+)|(\['.*?'\])|(\[\".*?\"\])|(\[\d+\])")


def resolve_property(value: Any, prop: str) -> Any:
    """Walk `a.b[0]['c']` into a node output as prompt flow does; raises KeyError/IndexError/AttributeError."""
    for groups in _PROPERTY_RE.findall(prop):
        part = next(g for g in groups if g)
        if part.startswith("[") and part.endswith("]"):
            index: Any = part[1:-1]
            if index[:1] in {"'", '"'}:
                index = index[1:-1]
            else:
                index = int(index)
            value = value[index]
        elif isinstance(value, Mapping):
            value = value[part]
        else:
            value = getattr(value, part)
    return value


@dataclass(frozen=True)
class InputDef:
    """A declared flow input (or flex init parameter)."""

    name: str
    type: str = "string"
    default: Any = None
    description: str = ""
    enum: tuple[Any, ...] = ()
    is_chat_input: bool = False
    is_chat_history: bool = False
    line: int | None = None

    @property
    def has_default(self) -> bool:
        """Prompt flow treats a `default` of null as no default."""
        return self.default is not None


@dataclass(frozen=True)
class OutputDef:
    """A declared flow output; `reference` is the raw `${...}` text (or a literal)."""

    name: str
    type: str = "string"
    reference: Any = None
    description: str = ""
    is_chat_output: bool = False
    evaluation_only: bool = False
    line: int | None = None


@dataclass(frozen=True)
class NodeSource:
    """Where a node's code or template comes from."""

    type: str = "code"
    path: str | None = None
    tool: str | None = None


@dataclass(frozen=True)
class Activate:
    """`activate: {when: ..., is: ...}`: the node runs only when `when` resolves equal to `is`."""

    when: Any
    is_value: Any


@dataclass(frozen=True)
class Node:
    """One node of a DAG flow."""

    name: str
    type: str
    source: NodeSource = field(default_factory=NodeSource)
    inputs: Mapping[str, Any] = field(default_factory=_empty)
    connection: str | None = None
    api: str | None = None
    provider: str | None = None
    module: str | None = None
    aggregation: bool = False
    use_variants: bool = False
    activate: Activate | None = None
    enable_cache: bool = False
    comment: str = ""
    line: int | None = None

    def references(self) -> list[tuple[str, Reference]]:
        """Every reference this node depends on, with the field that holds it."""
        found = []
        for key, value in self.inputs.items():
            ref = parse_reference(value)
            if ref is not None:
                found.append((f"inputs.{key}", ref))
        if self.activate is not None:
            ref = parse_reference(self.activate.when)
            if ref is not None:
                found.append(("activate.when", ref))
        return found

    def node_dependencies(self) -> set[str]:
        """Names of the nodes this node must wait for."""
        return {ref.name for _, ref in self.references() if ref.kind == "node"}


@dataclass(frozen=True)
class NodeVariant:
    """One variant of a node: the node body (named like the node) and a description."""

    node: Node
    description: str = ""


@dataclass(frozen=True)
class NodeVariants:
    """All variants of one node."""

    default_variant_id: str
    variants: Mapping[str, NodeVariant] = field(default_factory=_empty)


_VARIANT_RE = re.compile(r"^\$\{([^.{}]+)\.([^.{}]+)\}$")


def parse_variant(text: str) -> tuple[str, str]:
    """Split `${node.variant_1}` into (node, variant_id); raises ValueError naming the expected form."""
    match = _VARIANT_RE.match(text.strip())
    if not match:
        raise ValueError(f"invalid variant {text!r}: expected the form '${{node_name.variant_id}}'")
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class Flow:
    """A loaded flow of any of the three formats."""

    kind: FlowKind
    path: Path
    file: str
    inputs: Mapping[str, InputDef] = field(default_factory=_empty)
    outputs: Mapping[str, OutputDef] = field(default_factory=_empty)
    nodes: tuple[Node, ...] = ()
    node_variants: Mapping[str, NodeVariants] = field(default_factory=_empty)
    environment_variables: Mapping[str, str] = field(default_factory=_empty)
    additional_includes: tuple[str, ...] = ()
    entry: str | None = None
    code: str = "."
    init: Mapping[str, InputDef] = field(default_factory=_empty)
    sample: Mapping[str, Any] | None = None
    prompty: PromptySpec | None = None
    name: str = ""
    description: str = ""
    flow_type: str = "standard"
    environment: Mapping[str, Any] = field(default_factory=_empty)
    # Dotted key path ("nodes.answer.inputs.q") -> (line, column), both 1-based.
    locations: Mapping[str, tuple[int, int]] = field(default_factory=_empty)
    load_problems: tuple[Problem, ...] = ()

    @property
    def flow_file(self) -> Path:
        """The absolute path of the flow's definition file."""
        return self.path / self.file

    def node(self, name: str) -> Node | None:
        """The node called `name`, if any."""
        return next((n for n in self.nodes if n.name == name), None)

    def locate(self, *keys: str) -> tuple[int | None, int | None]:
        """The (line, column) of the deepest known key along `keys`, or (None, None)."""
        parts = list(keys)
        while parts:
            loc = self.locations.get(".".join(parts))
            if loc is not None:
                return loc
            parts.pop()
        return None, None

    def problem(self, message: str, *keys: str, node: str | None = None, field: str | None = None) -> Problem:
        """A Problem in this flow's file, located at the key path `keys`."""
        line, column = self.locate(*keys)
        return Problem(message=message, file=self.file, line=line, column=column, node=node, field=field)

    @property
    def chat_input_name(self) -> str | None:
        """The input marked `is_chat_input`, if this is a chat flow."""
        return next((i.name for i in self.inputs.values() if i.is_chat_input), None)

    @property
    def chat_history_name(self) -> str | None:
        """The input marked `is_chat_history`, if this is a chat flow."""
        return next((i.name for i in self.inputs.values() if i.is_chat_history), None)

    @property
    def chat_output_name(self) -> str | None:
        """The output marked `is_chat_output`, if this is a chat flow."""
        return next((o.name for o in self.outputs.values() if o.is_chat_output), None)

    @property
    def is_chat(self) -> bool:
        """Whether the flow has a chat input (prompt flow's definition of a chat flow)."""
        return self.chat_input_name is not None

    @property
    def aggregation_nodes(self) -> tuple[Node, ...]:
        """The nodes that run once over all lines."""
        return tuple(n for n in self.nodes if n.aggregation)

    @property
    def line_nodes(self) -> tuple[Node, ...]:
        """The nodes that run once per line."""
        return tuple(n for n in self.nodes if not n.aggregation)

    @property
    def has_aggregation(self) -> bool:
        """Whether `aggregate` has anything to run (aggregation nodes, or possibly a flex `__aggregate__`)."""
        return bool(self.aggregation_nodes) or self.kind == "flex"

    def variant_ids(self, node_name: str) -> tuple[str, ...]:
        """The variant ids of a node, default first."""
        nv = self.node_variants.get(node_name)
        if nv is None:
            return ()
        ids = list(nv.variants)
        if nv.default_variant_id in ids:
            ids.remove(nv.default_variant_id)
            ids.insert(0, nv.default_variant_id)
        return tuple(ids)

    def with_variant(self, variant: str | None = None) -> Flow:
        """This flow with every `use_variants` node replaced by its chosen (or default) variant.

        `variant` is `${node.variant_id}`; raises FlowValidationError naming the node or variant if unknown.
        """
        chosen_node, chosen_id = (None, None)
        if variant:
            try:
                chosen_node, chosen_id = parse_variant(variant)
            except ValueError as exc:
                raise FlowValidationError([Problem(message=str(exc), field="variant")]) from None
            if chosen_node not in self.node_variants:
                raise FlowValidationError(
                    [
                        Problem(
                            message=f"node '{chosen_node}' has no variants (variant {variant!r})",
                            file=self.file,
                            field="variant",
                        )
                    ]
                )
            if chosen_id not in self.node_variants[chosen_node].variants:
                known = ", ".join(self.node_variants[chosen_node].variants) or "none"
                raise FlowValidationError(
                    [
                        Problem(
                            message=f"node '{chosen_node}' has no variant '{chosen_id}' (known: {known})",
                            file=self.file,
                            field="variant",
                        )
                    ]
                )
        nodes = []
        for node in self.nodes:
            nv = self.node_variants.get(node.name)
            if not node.use_variants or nv is None:
                nodes.append(node)
                continue
            variant_id = chosen_id if node.name == chosen_node else nv.default_variant_id
            body = nv.variants.get(variant_id or "")
            if body is None:
                nodes.append(node)
                continue
            nodes.append(
                replace(body.node, name=node.name, use_variants=False, line=body.node.line or node.line)
            )
        return replace(self, nodes=tuple(nodes))
