"""The DAG view's data: a JSON-safe graph of a loaded flow, and the difference between two such graphs.

Pure functions over flowengine's model (no database, no request): the views hand the result to static/js/dag.js.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flowengine import Flow, Problem
from flowengine.model import Node, parse_reference

Graph = dict[str, Any]


def _node_id(name: str) -> str:
    return f"node:{name}"


def _input_id(name: str) -> str:
    return f"input:{name}"


def _output_id(name: str) -> str:
    return f"output:{name}"


def _ref_source(value: Any) -> str | None:
    """The graph id a `${...}` value points at, or None for a literal."""
    ref = parse_reference(value)
    if ref is None:
        return None
    return _input_id(ref.name) if ref.kind == "input" else _node_id(ref.name)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _node_signature(node: Node) -> str:
    """A stable text of everything that defines a node, so two versions can be compared."""
    body = {
        "type": node.type,
        "source": [node.source.type, node.source.path, node.source.tool],
        "inputs": {k: node.inputs[k] for k in sorted(node.inputs)},
        "connection": node.connection,
        "api": node.api,
        "aggregation": node.aggregation,
        "use_variants": node.use_variants,
        "activate": None if node.activate is None else [node.activate.when, node.activate.is_value],
    }
    return json.dumps(body, sort_keys=True, default=str)


def _problems_by_node(problems: Iterable[Problem]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in problems:
        if problem.node:
            where = f"{problem.field}: " if problem.field else ""
            found.setdefault(problem.node, []).append(where + problem.message)
    return found


def _io_nodes(flow: Flow) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [
        {
            "id": _input_id(name),
            "kind": "input",
            "label": name,
            "type": spec.type,
            "detail": "chat input"
            if spec.is_chat_input
            else ("chat history" if spec.is_chat_history else ""),
            "file": flow.file,
            "line": spec.line,
            "signature": json.dumps([spec.type, spec.default, spec.is_chat_input], default=str),
        }
        for name, spec in flow.inputs.items()
    ]
    outputs = [
        {
            "id": _output_id(name),
            "kind": "output",
            "label": name,
            "type": spec.type,
            "detail": _short(spec.reference) if spec.reference is not None else "",
            "file": flow.file,
            "line": spec.line,
            "signature": json.dumps([spec.type, spec.reference], default=str),
        }
        for name, spec in flow.outputs.items()
    ]
    return inputs, outputs


def _dag_graph(flow: Flow, problems: Mapping[str, list[str]]) -> Graph:
    inputs, outputs = _io_nodes(flow)
    nodes: list[dict[str, Any]] = [*inputs]
    edges: list[dict[str, Any]] = []
    known = {n["id"] for n in inputs} | {_node_id(n.name) for n in flow.nodes}
    for node in flow.nodes:
        variants = list(flow.variant_ids(node.name)) if node.use_variants else []
        source_path = node.source.path
        if node.use_variants and variants:
            chosen = flow.node_variants[node.name].variants.get(variants[0])
            if chosen is not None:
                source_path = chosen.node.source.path
        activate = ""
        if node.activate is not None:
            activate = f"when {_short(node.activate.when, 40)} is {_short(node.activate.is_value, 20)}"
        nodes.append(
            {
                "id": _node_id(node.name),
                "kind": "node",
                "label": node.name,
                "type": node.type,
                "tool": node.source.tool or "",
                "source": source_path or "",
                "file": source_path if node.source.type == "code" and source_path else flow.file,
                "line": None if source_path and node.source.type == "code" else node.line,
                "yaml_line": node.line,
                "aggregation": node.aggregation,
                "variants": variants,
                "activate": activate,
                "connection": node.connection or "",
                "inputs": {k: _short(v) for k, v in node.inputs.items()},
                "problems": problems.get(node.name, []),
                "signature": _node_signature(node),
            }
        )
        seen: set[tuple[str, str]] = set()
        for field_name, value in node.inputs.items():
            source = _ref_source(value)
            if source in known and (source, "data") not in seen:
                seen.add((source, "data"))
                edges.append(
                    {"source": source, "target": _node_id(node.name), "kind": "data", "label": field_name}
                )
        if node.activate is not None:
            source = _ref_source(node.activate.when)
            if source in known:
                edges.append(
                    {"source": source, "target": _node_id(node.name), "kind": "activate", "label": "activate"}
                )
    nodes.extend(outputs)
    for name, spec in flow.outputs.items():
        source = _ref_source(spec.reference)
        if source in known:
            edges.append({"source": source, "target": _output_id(name), "kind": "data", "label": ""})
    return {"kind": "dag", "nodes": nodes, "edges": edges}


def _single_step_graph(flow: Flow, problems: Sequence[Problem]) -> Graph:
    """Flex and prompty flows: inputs → one step (the entry or the prompt) → outputs."""
    inputs, outputs = _io_nodes(flow)
    sample_inputs = (flow.sample or {}).get("inputs") if isinstance(flow.sample, Mapping) else None
    if not inputs and isinstance(sample_inputs, Mapping):
        # A flex flow's inputs are its entry's parameters; the sample names them without importing user code.
        inputs = [
            {
                "id": _input_id(name),
                "kind": "input",
                "label": name,
                "type": "",
                "detail": "sample",
                "file": flow.file,
                "line": None,
                "signature": name,
            }
            for name in sample_inputs
        ]
    if flow.kind == "flex":
        entry = flow.entry or "entry"
        module = entry.split(":", 1)[0]
        step = {
            "id": "entry",
            "kind": "entry",
            "label": entry,
            "type": "flex",
            "source": f"{module.replace('.', '/')}.py",
            "file": f"{module.replace('.', '/')}.py",
            "line": None,
            "detail": ", ".join(f"{k}={_short(v.default, 20)}" for k, v in flow.init.items()),
        }
    else:
        spec = flow.prompty
        model = ""
        if spec is not None:
            configuration = getattr(spec, "configuration", None) or {}
            if isinstance(configuration, Mapping):
                model = str(configuration.get("model") or configuration.get("azure_deployment") or "")
        step = {
            "id": "prompty",
            "kind": "prompty",
            "label": flow.name or flow.file,
            "type": "prompty",
            "source": flow.file,
            "file": flow.file,
            "line": None,
            "detail": " · ".join(part for part in (getattr(spec, "api", "") or "", model) if part),
        }
    step["problems"] = [p.message for p in problems if p.file == step["file"] or p.file == flow.file]
    step["signature"] = json.dumps([step["label"], step["detail"]])
    if not outputs:
        outputs = [
            {
                "id": _output_id("output"),
                "kind": "output",
                "label": "output",
                "type": "",
                "detail": "",
                "file": flow.file,
                "line": None,
                "signature": "output",
            }
        ]
    edges = [{"source": n["id"], "target": step["id"], "kind": "data", "label": ""} for n in inputs]
    edges += [{"source": step["id"], "target": n["id"], "kind": "data", "label": ""} for n in outputs]
    return {"kind": flow.kind, "nodes": [*inputs, step, *outputs], "edges": edges}


def flow_graph(flow: Flow | None, problems: Sequence[Problem] = ()) -> Graph:
    """The graph the DAG view draws: {kind, nodes, edges}; nodes carry their problems and source file."""
    if flow is None:
        return {"kind": "unknown", "nodes": [], "edges": []}
    if flow.kind == "dag":
        return _dag_graph(flow, _problems_by_node(problems))
    return _single_step_graph(flow, problems)


def _source_files(node: Mapping[str, Any]) -> set[str]:
    return {node["source"]} if node.get("source") else set()


def graph_diff(old: Graph, new: Graph, *, changed_files: Iterable[str] = ()) -> Graph:
    """The union of two graphs with each node and edge marked added, removed, changed or same.

    A node counts as changed when its definition differs or when its source file's content changed.
    """
    changed = set(changed_files)
    old_nodes = {n["id"]: n for n in old["nodes"]}
    new_nodes = {n["id"]: n for n in new["nodes"]}
    nodes: list[dict[str, Any]] = []
    for node_id, node in new_nodes.items():
        before = old_nodes.get(node_id)
        if before is None:
            status = "added"
        elif before.get("signature") != node.get("signature") or _source_files(node) & changed:
            status = "changed"
        else:
            status = "same"
        nodes.append({**node, "diff": status, "problems": []})
    for node_id, node in old_nodes.items():
        if node_id not in new_nodes:
            nodes.append({**node, "diff": "removed", "problems": []})

    def key(edge: Mapping[str, Any]) -> tuple[str, str, str]:
        return edge["source"], edge["target"], edge["kind"]

    old_edges = {key(e): e for e in old["edges"]}
    new_edges = {key(e): e for e in new["edges"]}
    edges = [{**e, "diff": "same" if k in old_edges else "added"} for k, e in new_edges.items()]
    edges += [{**e, "diff": "removed"} for k, e in old_edges.items() if k not in new_edges]
    counts = {
        status: sum(1 for n in nodes if n["diff"] == status) for status in ("added", "removed", "changed")
    }
    return {"kind": new.get("kind", old.get("kind")), "nodes": nodes, "edges": edges, "counts": counts}
