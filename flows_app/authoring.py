"""The authoring workspace's page contexts and structured edits, composed from selectors and services.

Views call one function here (or one service); this module keeps them thin. Reads go through the user-scoped
selectors, writes through the storage services, each carrying the version the page was based on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError
from django.utils.safestring import SafeString, mark_safe

from flowengine import FlowValidationError, load_flow
from flows_app import dag_edit
from flows_app.diffing import decode_text, diff_table_html, merge3, rows_from_unified, unified_rows
from flows_app.flow_graph import Graph, flow_graph, graph_diff
from flows_app.selectors import flow_get_for, flow_version_get_for, flow_version_pair_for
from flows_app.services import (
    flow_file_save,
    flow_files_upload,
    flow_path_clean,
    flow_version_diff,
    snapshot_file_read,
    snapshot_materialize,
)
from flows_app.workspace import editor_mode, file_tree, main_file, workspace_state

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from flows_app.models import Flow, FlowVersion

# Files larger than this open as "download only" instead of in the editor.
MAX_EDITOR_BYTES = 2 * 1024 * 1024
DAG_FILE = "flow.dag.yaml"
# Diff rows a diff page renders before it collapses the remaining files, as code review tools do with large diffs.
DIFF_PAGE_ROWS = 2000


def _read(version: FlowVersion, path: str) -> bytes | None:
    if path not in version.snapshot.manifest:
        return None
    return snapshot_file_read(snapshot=version.snapshot, path=path)


def role_context(flow: Flow, version: FlowVersion) -> dict[str, Any]:
    """Who may do what on this page: the role, and whether edit controls show (editors, on the head only)."""
    role = getattr(flow, "role", None)
    is_head = flow.head_id == version.pk
    return {
        "role": role,
        "can_edit": role in ("owner", "editor") and is_head,
        "is_head": is_head,
        "is_owner": role == "owner",
    }


def side_context(version: FlowVersion) -> dict[str, Any]:
    """The side pane: the graph, the inputs and outputs and the validation problems of a version."""
    state = workspace_state(snapshot_materialize(snapshot_sha=version.snapshot_id))
    return {"state": state, "graph": state.graph, "io": state.io(), "problems": state.problems}


def files_context(version: FlowVersion) -> dict[str, Any]:
    """The file tree of a version (paths only: the manifest has them without reading any file)."""
    manifest = version.snapshot.manifest
    return {"tree": file_tree(list(manifest)), "file_count": len(manifest)}


def editor_context(
    version: FlowVersion, path: str | None, *, mode: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """The editor pane for one file of a version, or the structured view of a DAG flow."""
    manifest = version.snapshot.manifest
    if path is None or path not in manifest:
        path = main_file(manifest)
    context: dict[str, Any] = {
        "path": path,
        "line": line,
        "structured": mode == "structured",
        "version": version,
    }
    if mode == "structured":
        context["structure"] = structure_context(version)
    if path is None:
        return context
    data = _read(version, path) or b""
    text = decode_text(data) if len(data) <= MAX_EDITOR_BYTES else None
    context.update(text=text, size=len(data), editor_mode=editor_mode(path), binary=text is None)
    return context


def structure_context(version: FlowVersion) -> dict[str, Any] | None:
    """The structured view of a DAG flow: inputs, nodes with their prompt text, outputs; None for other kinds."""
    state = workspace_state(snapshot_materialize(snapshot_sha=version.snapshot_id))
    flow = state.flow
    if flow is None or flow.kind != "dag":
        return None
    nodes = []
    for node in flow.nodes:
        source = node.source.path or ""
        prompt = None
        if source.endswith((".jinja2", ".j2", ".jinja")) and source in version.snapshot.manifest:
            prompt = decode_text(_read(version, source))
        nodes.append(
            {
                "node": node,
                "source": source,
                "prompt": prompt,
                "has_file": source in version.snapshot.manifest,
                "variants": flow.variant_ids(node.name),
                "problems": [p for p in state.problems if p.node == node.name],
            }
        )
    return {"flow": flow, "nodes": nodes, "io": state.io(), "problems": state.problems}


def page_context(
    user: AbstractBaseUser,
    flow_id: int,
    *,
    number: int | None,
    path: str | None,
    mode: str | None,
    line: int | None = None,
) -> dict[str, Any]:
    """Everything the authoring page renders for a version (the head unless `number`)."""
    flow = flow_get_for(user, flow_id)
    version = flow_version_get_for(user, flow_id, number)
    context: dict[str, Any] = {"flow": flow, "version": version, **role_context(flow, version)}
    context.update(files_context(version))
    context.update(side_context(version))
    context["is_dag"] = context["state"].kind == "dag"
    if mode is None and path is None and context["is_dag"]:
        mode = "raw"
    context["editor"] = editor_context(version, path, mode=mode, line=line)
    return context


def conflict_context(
    user: AbstractBaseUser, flow_id: int, *, path: str, mine: str, based_on: int, head: FlowVersion | None
) -> dict[str, Any]:
    """What the conflict view shows: the other change, yours, and a proposed merge of both."""
    flow = flow_get_for(user, flow_id)
    base = flow_version_get_for(user, flow_id, based_on)
    head = flow_version_get_for(user, flow_id, head.number if head else None)
    base_text = decode_text(_read(base, path)) or ""
    head_bytes = _read(head, path)
    theirs = (decode_text(head_bytes) or "") if head_bytes is not None else ""
    author = head.author.get_username() if head.author else "someone"
    merged = merge3(base_text, mine, theirs, ours_label="yours", theirs_label=f"v{head.number} ({author})")
    return {
        "flow": flow,
        "path": path,
        "base": base,
        "head": head,
        "head_author": author,
        "deleted_in_head": head_bytes is None,
        "their_rows": unified_rows(base_text, theirs),
        "your_rows": unified_rows(base_text, mine),
        "merged": merged.text,
        "conflicts": merged.conflicts,
        "editor_mode": editor_mode(path),
        "can_edit": True,
    }


def file_add(user: AbstractBaseUser, flow_id: int, *, path: str, based_on: int) -> FlowVersion:
    """Add an empty file; a path ending in '/' adds a folder (holding an empty `.gitkeep`, as git does)."""
    target = path.strip()
    if target.endswith("/"):
        target += ".gitkeep"
    flow_path_clean(target)
    flow = flow_get_for(user, flow_id, edit=True)
    base = flow_version_get_for(user, flow_id, based_on)
    manifest = base.snapshot.manifest
    if target in manifest or any(p.startswith(target + "/") for p in manifest):
        raise ValidationError(f"'{target}' already exists.")
    return flow_file_save(
        flow=flow, user=user, path=target, content=b"", based_on=based_on, message=f"Add {target}"
    )


def structure_edit(
    user: AbstractBaseUser, flow_id: int, *, based_on: int, what: str, fields: Mapping[str, Any]
) -> FlowVersion:
    """Apply a structured-view edit (`what`: input, output or node) to flow.dag.yaml and save it as one version.

    A new node also gets a starter source file unless one exists at that path.
    """
    flow = flow_get_for(user, flow_id, edit=True)
    base = flow_version_get_for(user, flow_id, based_on)
    data = _read(base, DAG_FILE)
    if data is None:
        raise ValidationError(f"This flow has no {DAG_FILE}: the structured view edits DAG flows only.")
    text = decode_text(data) or ""
    extra: dict[str, bytes] = {}
    try:
        if what == "input":
            text = dag_edit.dag_add_input(text, **fields)
        elif what == "output":
            text = dag_edit.dag_add_output(text, **fields)
        else:
            source, starter = dag_edit.node_source_file(name=fields["name"], type=fields["type"])
            text = dag_edit.dag_add_node(text, source_path=source, **fields)
            if source not in base.snapshot.manifest:
                extra[source] = starter.encode()
    except dag_edit.DagEditError as exc:
        raise ValidationError(str(exc)) from None
    return flow_files_upload(
        flow=flow,
        user=user,
        files={DAG_FILE: text.encode("utf-8"), **extra},
        based_on=based_on,
        message=f"Add {what} '{fields.get('name', '')}'",
    )


@functools.lru_cache(maxsize=256)
def _snapshot_graph(snapshot_sha: str) -> Graph:
    # A snapshot never changes, so neither does its graph: each process parses a snapshot's flow once. Callers
    # share the cached dict and must not change it (graph_diff builds new nodes and edges).
    try:
        flow = load_flow(snapshot_materialize(snapshot_sha=snapshot_sha))
    except (FlowValidationError, FileNotFoundError, NotADirectoryError):
        flow = None
    return flow_graph(flow)


def _version_options(numbers: list[int], selected: int) -> SafeString:
    # A flow can have thousands of versions and the page has two pickers: plain joins of integers cost
    # microseconds where a template loop costs milliseconds. Integers need no escaping.
    return mark_safe(
        "".join(
            f'<option value="{n}" selected>v{n}</option>'
            if n == selected
            else f'<option value="{n}">v{n}</option>'
            for n in numbers
        )
    )


def file_changes_shown(files: list[dict[str, Any]], *, budget: int | None = None) -> list[dict[str, Any]]:
    """The changed files of a flow_version_diff with their rows, counts and rendered diff tables.

    Files are rendered in order until `budget` rows; later ones come collapsed (counts only). None: no limit.
    """
    changes = []
    for item in files:
        rows = rows_from_unified(item["unified_diff"])
        collapsed = budget is not None and len(rows) > budget
        if budget is not None and not collapsed:
            budget -= len(rows)
        changes.append(
            {
                **item,
                "rows": rows,
                "lines": len(rows),
                "added": sum(1 for r in rows if r.kind == "add"),
                "removed": sum(1 for r in rows if r.kind == "del"),
                "collapsed": collapsed,
                "table": None if collapsed or item["binary"] else diff_table_html(rows),
            }
        )
    return changes


def diff_context(
    user: AbstractBaseUser, flow_id: int, *, a: int | None, b: int | None, full: bool = False
) -> dict[str, Any]:
    """File diffs and the DAG diff from version `a` to version `b` (default: the one before the head, the head).

    Diffs are rendered in path order until DIFF_PAGE_ROWS rows; later files come collapsed (with their counts)
    behind a "show full diff" link, unless `full`.
    """
    flow, old, new, numbers = flow_version_pair_for(user, flow_id, a=a, b=b)
    # Only files whose content hashes differ are read and compared (flow_version_diff works from the manifests).
    diff = flow_version_diff(a=old.snapshot, b=new.snapshot)
    changes = file_changes_shown(diff["files"], budget=None if full else DIFF_PAGE_ROWS)
    graph = graph_diff(
        _snapshot_graph(old.snapshot_id),
        _snapshot_graph(new.snapshot_id),
        changed_files=[c["path"] for c in changes],
    )
    return {
        "flow": flow,
        "old": old,
        "new": new,
        "changes": changes,
        "collapsed": sum(1 for c in changes if c["collapsed"]),
        "graph": graph,
        "dag": diff["dag"],
        "added": sum(c["added"] for c in changes),
        "removed": sum(c["removed"] for c in changes),
        "options_a": _version_options(numbers, old.number),
        "options_b": _version_options(numbers, new.number),
    }
