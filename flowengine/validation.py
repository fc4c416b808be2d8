"""Validate a flow and report every problem at once, each with its file, line, node and field.

Validation never imports or runs user code: Python sources are read with `ast`, templates are only parsed.
It is safe to call in the web process.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from flowengine.loader import load_flow
from flowengine.model import (
    NODE_TYPES,
    VALUE_TYPES,
    Flow,
    FlowValidationError,
    Node,
    Problem,
    parse_reference,
)

FLEX_VALUE_TYPES = ("string", "int", "double", "bool", "list", "object")
_NODE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def validate(flow_or_path: Flow | str | Path) -> list[Problem]:
    """Every problem of a flow (or of the flow at a path), in file order; empty when valid."""
    if isinstance(flow_or_path, Flow):
        flow = flow_or_path
    else:
        try:
            flow = load_flow(flow_or_path)
        except FlowValidationError as exc:
            return list(exc.problems)
    problems = list(flow.load_problems)
    if flow.kind == "dag":
        problems.extend(_DagValidator(flow).run())
    elif flow.kind == "flex":
        problems.extend(_validate_flex(flow))
    problems.extend(_validate_includes(flow))
    return _dedupe_sorted(problems)


def check_valid(flow: Flow) -> None:
    """Raise FlowValidationError listing every problem unless the flow is valid."""
    problems = validate(flow)
    if problems:
        raise FlowValidationError(problems)


def _dedupe_sorted(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    unique = []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            unique.append(problem)
    return sorted(unique, key=lambda p: (p.file or "", p.line or 0, p.column or 0))


def _inside(folder: Path, rel: str) -> Path | None:
    """The resolved path of `rel` under `folder`, or None if it escapes the folder."""
    target = (folder / rel).resolve()
    return target if target.is_relative_to(folder.resolve()) else None


def _include_names(flow: Flow) -> set[str]:
    """Names that additional_includes bring into the snapshot root."""
    return {Path(inc).name for inc in flow.additional_includes}


def _validate_includes(flow: Flow) -> list[Problem]:
    problems = []
    for index, inc in enumerate(flow.additional_includes):
        if Path(inc).is_absolute():
            problems.append(
                flow.problem(
                    f"additional include '{inc}' must be a relative path",
                    "additional_includes",
                    field=f"additional_includes[{index}]",
                )
            )
        elif not (flow.path / inc).exists():
            problems.append(
                flow.problem(
                    f"additional include '{inc}' does not exist",
                    "additional_includes",
                    field=f"additional_includes[{index}]",
                )
            )
    return problems


def _check_type(flow: Flow, section: str, name: str, type_: str, allowed: tuple[str, ...]) -> list[Problem]:
    label = section.rstrip("s")
    if not type_:
        return [flow.problem(f"{label} '{name}' needs a 'type'", section, name, field=f"{section}.{name}")]
    if type_ not in allowed:
        return [
            flow.problem(
                f"{label} '{name}' has unknown type '{type_}' (expected one of: {', '.join(allowed)})",
                section,
                name,
                "type",
                field=f"{section}.{name}",
            )
        ]
    return []


class _DagValidator:
    """Checks of a flow.dag.yaml."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.problems: list[Problem] = []
        self.names = {node.name for node in flow.nodes}
        self.aggregation_names = {node.name for node in flow.nodes if node.aggregation}

    def add(self, message: str, *keys: str, node: str | None = None, field: str | None = None) -> None:
        self.problems.append(self.flow.problem(message, *keys, node=node, field=field))

    def run(self) -> list[Problem]:
        flow = self.flow
        self.inputs()
        self.outputs()
        seen: set[str] = set()
        for node in flow.nodes:
            if node.name in seen:
                self.add(
                    f"duplicate node name '{node.name}'", "nodes", node.name, node=node.name, field="name"
                )
            seen.add(node.name)
            if not _NODE_NAME_RE.match(node.name):
                self.add(
                    "node names may contain only letters, digits, '_' and '-', and start with a letter or '_'",
                    "nodes",
                    node.name,
                    "name",
                    node=node.name,
                    field="name",
                )
            self.variants_of(node)
            if node.use_variants and node.name in flow.node_variants:
                nv = flow.node_variants[node.name]
                for variant_id, body in nv.variants.items():
                    self.node(body.node, ("node_variants", node.name, "variants", variant_id, "node"))
            else:
                self.node(node, ("nodes", node.name))
        for name in flow.node_variants:
            if name not in self.names:
                self.add(
                    f"node_variants lists '{name}', which is not a node",
                    "node_variants",
                    name,
                    node=name,
                    field="node_variants",
                )
        self.cycles()
        return self.problems

    def inputs(self) -> None:
        flow = self.flow
        for name, spec in flow.inputs.items():
            self.problems.extend(_check_type(flow, "inputs", name, spec.type, VALUE_TYPES))
            if spec.enum and spec.default is not None and spec.default not in spec.enum:
                self.add(
                    f"default {spec.default!r} of input '{name}' is not one of its enum values",
                    "inputs",
                    name,
                    "default",
                    field=f"inputs.{name}",
                )
            if spec.is_chat_history and spec.type and spec.type != "list":
                self.add(
                    f"chat history input '{name}' must have type 'list'",
                    "inputs",
                    name,
                    "type",
                    field=f"inputs.{name}",
                )
        for flag, label in (("is_chat_input", "chat input"), ("is_chat_history", "chat history input")):
            marked = [n for n, spec in flow.inputs.items() if getattr(spec, flag)]
            if len(marked) > 1:
                self.add(
                    f"only one input may be the {label}; found {', '.join(marked)}",
                    "inputs",
                    marked[1],
                    flag,
                    field=f"inputs.{marked[1]}.{flag}",
                )
        marked = [n for n, spec in flow.outputs.items() if spec.is_chat_output]
        if len(marked) > 1:
            self.add(
                f"only one output may be the chat output; found {', '.join(marked)}",
                "outputs",
                marked[1],
                field=f"outputs.{marked[1]}.is_chat_output",
            )
        if flow.chat_input_name and not marked:
            self.add(
                "a chat flow (it has an is_chat_input input) needs one output with is_chat_output: true",
                "outputs",
                field="outputs",
            )

    def outputs(self) -> None:
        flow = self.flow
        for name, spec in flow.outputs.items():
            self.problems.extend(_check_type(flow, "outputs", name, spec.type, VALUE_TYPES))
            keys = ("outputs", name, "reference")
            if spec.reference is None or spec.reference == "":
                self.add(f"output '{name}' needs a 'reference'", *keys, field=f"outputs.{name}")
                continue
            ref = parse_reference(spec.reference)
            if ref is None:
                if isinstance(spec.reference, str) and "${" in spec.reference:
                    self.add(
                        f"output '{name}' has a malformed reference {spec.reference!r}",
                        *keys,
                        field=f"outputs.{name}",
                    )
                continue
            if ref.kind == "input":
                if ref.name not in flow.inputs:
                    self.add(
                        f"output '{name}' references unknown input '{ref.name}'",
                        *keys,
                        field=f"outputs.{name}",
                    )
            elif ref.name not in self.names:
                self.add(
                    f"output '{name}' references unknown node '{ref.name}'",
                    *keys,
                    field=f"outputs.{name}",
                )
            elif ref.section != "output":
                self.add(
                    f"output '{name}' must reference '${{{ref.name}.output}}', not '{ref.section}'",
                    *keys,
                    field=f"outputs.{name}",
                )

    def variants_of(self, node: Node) -> None:
        flow = self.flow
        nv = flow.node_variants.get(node.name)
        if not node.use_variants:
            return
        if nv is None:
            self.add(
                "use_variants is true but node_variants has no entry for this node",
                "nodes",
                node.name,
                "use_variants",
                node=node.name,
                field="use_variants",
            )
            return
        if not nv.variants:
            self.add(
                "node_variants entry has no variants",
                "node_variants",
                node.name,
                node=node.name,
                field="node_variants",
            )
        elif nv.default_variant_id not in nv.variants:
            self.add(
                f"default_variant_id '{nv.default_variant_id}' is not one of its variants "
                f"({', '.join(nv.variants)})",
                "node_variants",
                node.name,
                "default_variant_id",
                node=node.name,
                field="default_variant_id",
            )

    def node(self, node: Node, keys: tuple[str, ...]) -> None:
        flow = self.flow
        name = node.name
        if not node.type:
            self.add("a node needs a 'type'", *keys, node=name, field="type")
        elif node.type not in NODE_TYPES:
            self.add(
                f"unknown node type '{node.type}' (expected one of: {', '.join(NODE_TYPES)})",
                *keys,
                "type",
                node=name,
                field="type",
            )
        for field_name, ref in node.references():
            key_path = (*keys, *field_name.split(".", 1))
            if ref.kind == "input":
                if ref.name not in flow.inputs:
                    self.add(f"unknown flow input '{ref.name}'", *key_path, node=name, field=field_name)
                continue
            if ref.name == name:
                self.add("a node cannot reference its own output", *key_path, node=name, field=field_name)
            elif ref.name not in self.names:
                self.add(f"unknown node '{ref.name}'", *key_path, node=name, field=field_name)
            elif ref.section != "output":
                self.add(
                    f"'{ref.raw}' must reference the node's 'output' (found '{ref.section}')",
                    *key_path,
                    node=name,
                    field=field_name,
                )
            elif ref.name in self.aggregation_names and not node.aggregation:
                self.add(
                    f"node '{ref.name}' is an aggregation node; only aggregation nodes may reference it",
                    *key_path,
                    node=name,
                    field=field_name,
                )
        if node.activate is not None and parse_reference(node.activate.when) is None:
            self.add(
                "activate.when must be a reference such as '${node.output}' or '${inputs.x}'",
                *keys,
                "activate",
                "when",
                node=name,
                field="activate.when",
            )
        if node.type in ("llm", "prompt", "python", "custom_llm"):
            self.source(node, keys)
        if node.type == "llm":
            if not node.connection:
                self.add("an llm node needs a 'connection'", *keys, node=name, field="connection")
            if node.api not in ("chat", "completion"):
                self.add(
                    f"an llm node needs 'api: chat' or 'api: completion' (found {node.api!r})",
                    *keys,
                    "api",
                    node=name,
                    field="api",
                )

    def source(self, node: Node, keys: tuple[str, ...]) -> None:
        name = node.name
        source = node.source
        if source.type not in ("code", "package", "package_with_prompt"):
            self.add(
                f"unknown source type '{source.type}' (expected code, package or package_with_prompt)",
                *keys,
                "source",
                "type",
                node=name,
                field="source.type",
            )
            return
        if source.type == "package":
            if not source.tool:
                self.add("a package source needs a 'tool'", *keys, "source", node=name, field="source.tool")
            elif not _package_available(source.tool):
                self.add(
                    f"package tool '{source.tool}' is not installed",
                    *keys,
                    "source",
                    "tool",
                    node=name,
                    field="source.tool",
                )
            return
        if not source.path:
            self.add("the node needs 'source.path'", *keys, "source", node=name, field="source.path")
            return
        file_path = self.source_file(node, keys)
        if file_path is None:
            return
        if node.type == "python":
            self.python_source(node, keys, file_path)
        else:
            self.template_source(node, keys, file_path)

    def source_file(self, node: Node, keys: tuple[str, ...]) -> Path | None:
        flow = self.flow
        rel = node.source.path or ""
        if Path(rel).is_absolute():
            self.add(
                f"source path '{rel}' must be relative to the flow folder",
                *keys,
                "source",
                "path",
                node=node.name,
                field="source.path",
            )
            return None
        target = _inside(flow.path, rel)
        if target is None:
            self.add(
                f"source path '{rel}' points outside the flow folder",
                *keys,
                "source",
                "path",
                node=node.name,
                field="source.path",
            )
            return None
        if target.is_file():
            return target
        if Path(rel).parts and Path(rel).parts[0] in _include_names(flow):
            # The file comes in with additional_includes when the snapshot is built.
            for inc in flow.additional_includes:
                if Path(inc).name == Path(rel).parts[0]:
                    candidate = (flow.path / inc).parent / rel
                    return candidate if candidate.is_file() else None
        self.add(
            f"source file '{rel}' does not exist",
            *keys,
            "source",
            "path",
            node=node.name,
            field="source.path",
        )
        return None

    def python_source(self, node: Node, keys: tuple[str, ...], file_path: Path) -> None:
        rel = node.source.path or file_path.name
        try:
            tree = ast.parse(file_path.read_text(encoding="utf-8-sig"), filename=rel)
        except SyntaxError as exc:
            self.problems.append(
                Problem(
                    message=f"syntax error: {exc.msg}",
                    file=rel,
                    line=exc.lineno,
                    column=exc.offset,
                    node=node.name,
                    field="source.path",
                )
            )
            return
        except (OSError, UnicodeDecodeError) as exc:
            self.add(f"cannot read '{rel}': {exc}", *keys, "source", node=node.name, field="source.path")
            return
        functions = find_tool_functions(tree)
        if not functions:
            self.add(
                f"'{rel}' defines no function to run (decorate one with @tool)",
                *keys,
                "source",
                "path",
                node=node.name,
                field="source.path",
            )
            return
        if len(functions) > 1:
            self.add(
                f"'{rel}' has several @tool functions ({', '.join(f.name for f in functions)}); keep one",
                *keys,
                "source",
                "path",
                node=node.name,
                field="source.path",
            )
            return
        func = functions[0]
        params, has_var_kw, required = _signature(func)
        if not has_var_kw:
            for input_name in node.inputs:
                if input_name not in params:
                    self.add(
                        f"'{func.name}' in '{rel}' has no parameter '{input_name}'",
                        *keys,
                        "inputs",
                        input_name,
                        node=node.name,
                        field=f"inputs.{input_name}",
                    )
        for param in required:
            if param not in node.inputs:
                self.add(
                    f"required parameter '{param}' of '{func.name}' has no input",
                    *keys,
                    "inputs",
                    node=node.name,
                    field=f"inputs.{param}",
                )

    def template_source(self, node: Node, keys: tuple[str, ...], file_path: Path) -> None:
        rel = node.source.path or file_path.name
        try:
            text = file_path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            self.add(f"cannot read '{rel}': {exc}", *keys, "source", node=node.name, field="source.path")
            return
        try:
            SandboxedEnvironment().parse(text)
        except jinja2.TemplateSyntaxError as exc:
            self.problems.append(
                Problem(
                    message=f"template syntax error: {exc.message}",
                    file=rel,
                    line=exc.lineno,
                    node=node.name,
                    field="source.path",
                )
            )

    def cycles(self) -> None:
        """Report each cycle once, naming its nodes in order."""
        graph = {
            node.name: sorted(
                dep for dep in node.node_dependencies() if dep in self.names and dep != node.name
            )
            for node in self.flow.nodes
        }
        white, grey, black = 0, 1, 2
        color = dict.fromkeys(graph, white)
        reported: set[frozenset[str]] = set()
        for start in graph:
            if color[start] != white:
                continue
            stack: list[tuple[str, int]] = [(start, 0)]
            path: list[str] = []
            while stack:
                name, index = stack.pop()
                if index == 0:
                    color[name] = grey
                    path.append(name)
                deps = graph[name]
                if index < len(deps):
                    stack.append((name, index + 1))
                    dep = deps[index]
                    if color[dep] == white:
                        stack.append((dep, 0))
                    elif color[dep] == grey:
                        cycle = path[path.index(dep) :]
                        key = frozenset(cycle)
                        if key not in reported:
                            reported.add(key)
                            # Dependencies point backwards; show the flow direction a -> b -> a.
                            ordered = list(reversed(cycle))
                            text = " -> ".join([*ordered, ordered[0]])
                            self.add(
                                f"circular dependency: {text}",
                                "nodes",
                                ordered[0],
                                node=ordered[0],
                                field="inputs",
                            )
                else:
                    color[name] = black
                    path.pop()


def _package_available(dotted: str) -> bool:
    """Whether the top-level package of a dotted tool path can be imported (found, not executed)."""
    top = dotted.split(".", 1)[0]
    if not top:
        return False
    if top == "promptflow" and (Path(__file__).resolve().parent / "compat" / "promptflow").is_dir():
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _is_tool_decorator(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Name):
        return target.id == "tool"
    if isinstance(target, ast.Attribute):
        return target.attr == "tool"
    return False


def find_tool_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The module's @tool functions, or its only public top-level function when none is decorated."""
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    decorated = [f for f in functions if any(_is_tool_decorator(d) for d in f.decorator_list)]
    if decorated:
        return decorated
    public = [f for f in functions if not f.name.startswith("_")]
    return public if len(public) == 1 else []


def _signature(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[set[str], bool, list[str]]:
    """(parameter names, whether it takes **kwargs, required parameter names) of a function."""
    args = func.args
    positional = [*args.posonlyargs, *args.args]
    params = {a.arg for a in positional} | {a.arg for a in args.kwonlyargs}
    params.discard("self")
    first_default = len(positional) - len(args.defaults)
    required = [a.arg for i, a in enumerate(positional) if i < first_default and a.arg != "self"]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    return params, args.kwarg is not None, required


def _validate_flex(flow: Flow) -> list[Problem]:
    problems = []
    for section, specs in (("inputs", flow.inputs), ("outputs", flow.outputs)):
        for name, spec in specs.items():
            if spec.type:
                problems.extend(_check_type(flow, section, name, spec.type, FLEX_VALUE_TYPES))
    if not flow.entry:
        problems.append(flow.problem("a flex flow needs 'entry: module:function'", "entry", field="entry"))
        return problems
    if not _ENTRY_RE.match(flow.entry):
        problems.append(
            flow.problem(
                f"entry '{flow.entry}' must have the form 'module:function' or 'module:Class'",
                "entry",
                field="entry",
            )
        )
        return problems
    code_dir = _inside(flow.path, flow.code)
    if code_dir is None or not code_dir.is_dir():
        problems.append(flow.problem(f"code folder '{flow.code}' does not exist", "code", field="code"))
        return problems
    module, attr = flow.entry.split(":")
    rel_parts = module.split(".")
    candidates = [
        code_dir.joinpath(*rel_parts).with_suffix(".py"),
        code_dir.joinpath(*rel_parts, "__init__.py"),
    ]
    module_file = next((c for c in candidates if c.is_file()), None)
    if module_file is None:
        # The module may come from an installed package; the runner reports it if it cannot import it.
        return problems
    rel = str(module_file.relative_to(flow.path))
    try:
        tree = ast.parse(module_file.read_text(encoding="utf-8-sig"), filename=rel)
    except SyntaxError as exc:
        problems.append(
            Problem(
                message=f"syntax error: {exc.msg}",
                file=rel,
                line=exc.lineno,
                column=exc.offset,
                field="entry",
            )
        )
        return problems
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(flow.problem(f"cannot read '{rel}': {exc}", "entry", field="entry"))
        return problems
    defined = _top_level_names(tree)
    if attr not in defined:
        problems.append(
            flow.problem(f"'{rel}' defines no function or class named '{attr}'", "entry", field="entry")
        )
        return problems
    target = defined[attr]
    if isinstance(target, ast.ClassDef):
        methods = {n.name: n for n in target.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if "__call__" not in methods and not target.bases:
            problems.append(
                flow.problem(f"class '{attr}' in '{rel}' has no __call__ method", "entry", field="entry")
            )
        init = methods.get("__init__")
        if init is not None:
            params, has_var_kw, _ = _signature(init)
            if not has_var_kw:
                for name in flow.init:
                    if name not in params:
                        problems.append(
                            flow.problem(
                                f"__init__ of '{attr}' has no parameter '{name}'",
                                "init",
                                name,
                                field=f"init.{name}",
                            )
                        )
    elif flow.init:
        problems.append(
            flow.problem(
                f"'init' is only for class entries, but '{attr}' is a function",
                "init",
                field="init",
            )
        )
    return problems


def _top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = stmt
        elif isinstance(stmt, ast.ImportFrom | ast.Import):
            for alias in stmt.names:
                names[(alias.asname or alias.name).split(".")[0]] = stmt
    return names
