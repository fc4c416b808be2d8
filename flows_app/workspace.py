"""What the authoring page shows of one flow version: its file tree, the loaded flow, problems and graph.

Reads only: it materialises the version's snapshot (cached by hash) and asks flowengine to load and validate it.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flowengine import Flow, FlowValidationError, Problem, load_flow, validate
from flows_app.flow_graph import Graph, flow_graph

# CodeMirror modes by file name ending; anything else opens as plain text.
EDITOR_MODES: dict[str, str] = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".py": "python",
    ".jinja2": "jinja2",
    ".j2": "jinja2",
    ".jinja": "jinja2",
    ".json": "json",
    ".jsonl": "json",
    ".md": "markdown",
    ".prompty": "prompty",
    ".txt": "text",
}
FLOW_FILES = ("flow.dag.yaml", "flow.dag.yml", "flow.flex.yaml", "flow.flex.yml")


def editor_mode(path: str) -> str:
    """The editor mode for a file, from its name."""
    _, ext = posixpath.splitext(path.lower())
    return EDITOR_MODES.get(ext, "text")


@dataclass
class TreeNode:
    """A folder or file of the file tree."""

    name: str
    path: str
    is_dir: bool
    size: int = 0
    children: list[TreeNode] = field(default_factory=list)

    @property
    def ext(self) -> str:
        """The file name's extension without the dot, lower case ('' for none), for the file icon."""
        return posixpath.splitext(self.name)[1].lstrip(".").lower()


def file_tree(paths: Mapping[str, int] | Iterable[str]) -> list[TreeNode]:
    """Nested folders and files, folders first, each level sorted by name (case-insensitive)."""
    sizes = dict(paths) if isinstance(paths, Mapping) else dict.fromkeys(paths, 0)
    root = TreeNode(name="", path="", is_dir=True)
    folders: dict[str, TreeNode] = {"": root}
    for path in sorted(sizes):
        parent = root
        parts = path.split("/")
        for depth, part in enumerate(parts[:-1], start=1):
            key = "/".join(parts[:depth])
            folder = folders.get(key)
            if folder is None:
                folder = TreeNode(name=part, path=key, is_dir=True)
                folders[key] = folder
                parent.children.append(folder)
            parent = folder
        parent.children.append(TreeNode(name=parts[-1], path=path, is_dir=False, size=sizes[path]))

    def order(node: TreeNode) -> None:
        node.children.sort(key=lambda child: (not child.is_dir, child.name.casefold()))
        for child in node.children:
            order(child)

    order(root)
    return root.children


def main_file(paths: Iterable[str]) -> str | None:
    """The file the editor opens first: the flow definition, else the single .prompty, else the first file."""
    names = sorted(paths)
    for candidate in FLOW_FILES:
        if candidate in names:
            return candidate
    prompty = [p for p in names if p.endswith(".prompty") and "/" not in p]
    if prompty:
        return prompty[0]
    return names[0] if names else None


def folder_zip(files: Mapping[str, bytes], folder: str) -> bytes:
    """The files under `folder` as a zip whose entries are relative to the folder (sorted, fixed times)."""
    prefix = folder.strip("/") + "/"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in files if p.startswith(prefix)):
            info = zipfile.ZipInfo(path[len(prefix) :], date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, files[path])
    return buffer.getvalue()


@dataclass
class WorkspaceState:
    """The loaded flow of one version: None when no flow file loads; problems include load errors."""

    flow: Flow | None
    problems: list[Problem]
    graph: Graph
    kind: str

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """The flow's inputs and outputs as rows for the side pane."""
        if self.flow is None:
            return {"inputs": [], "outputs": []}
        inputs = [
            {
                "name": n,
                "type": s.type,
                "default": s.default,
                "chat": s.is_chat_input or s.is_chat_history,
                "line": s.line,
            }
            for n, s in self.flow.inputs.items()
        ]
        outputs = [
            {"name": n, "type": s.type, "reference": s.reference, "chat": s.is_chat_output, "line": s.line}
            for n, s in self.flow.outputs.items()
        ]
        return {"inputs": inputs, "outputs": outputs}


def workspace_state(folder: Any) -> WorkspaceState:
    """Load and validate the flow in a materialised snapshot folder, collecting every problem."""
    try:
        flow = load_flow(folder)
    except FlowValidationError as error:
        # Messages about the folder itself name the private cache path: show the flow's own view instead.
        problems = [
            replace(p, message=p.message.replace(f"'{folder}'", "of this flow")) for p in error.problems
        ]
        return WorkspaceState(flow=None, problems=problems, graph=flow_graph(None), kind="")
    except (FileNotFoundError, NotADirectoryError) as error:
        problem = Problem(
            message=f"No flow file: add flow.dag.yaml, flow.flex.yaml or one .prompty file ({error})."
        )
        return WorkspaceState(flow=None, problems=[problem], graph=flow_graph(None), kind="")
    try:
        problems = validate(flow)
    except FlowValidationError as error:
        problems = error.problems
    return WorkspaceState(flow=flow, problems=problems, graph=flow_graph(flow, problems), kind=flow.kind)
