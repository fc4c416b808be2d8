"""Load and call user Python: DAG `python` nodes and flex entries.

This runs user code, so it belongs in the runner process (or the local CLI), never in the web server.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
import threading
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from flowengine import hooks

_import_lock = threading.RLock()


class ToolLoadError(Exception):
    """User code could not be loaded; the message names the file and what is wrong."""


def ensure_promptflow_importable() -> None:
    """Make `import promptflow` work: the real package when installed, else our compatibility package."""
    from flowengine import compat

    compat.install()


def add_to_sys_path(folder: Path, *, first: bool = True) -> None:
    """Put a flow's folder on sys.path (first by default) so its modules import each other as under prompt flow."""
    text = str(folder)
    if text not in sys.path:
        if first:
            sys.path.insert(0, text)
        else:
            sys.path.append(text)


def _module_name_for(file: Path, root: Path) -> str:
    rel = file.relative_to(root).with_suffix("")
    return ".".join(rel.parts)


def _forget_foreign_module(name: str, root: Path) -> None:
    """Drop a cached module of the same name that came from another folder.

    One process may load several flows over its life (a test session, a local CLI); without this,
    a second flow's `utils.py` would silently resolve to the first flow's.
    """
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if module is not None and (file is None or not Path(file).resolve().is_relative_to(root)):
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def load_module_from_file(file: Path, root: Path) -> ModuleType:
    """Import `file` as the module its path under `root` names (hello.py -> hello, a/b.py -> a.b)."""
    ensure_promptflow_importable()
    add_to_sys_path(root)
    name = _module_name_for(file, root)
    with _import_lock:
        _forget_foreign_module(name.split(".")[0], root)
        existing = sys.modules.get(name)
        if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == file.resolve():
            return existing
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ToolLoadError(f"cannot load '{file.name}' as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module


def import_entry_module(module_name: str, code_dir: Path) -> ModuleType:
    """Import a flex entry's module with the code folder first on sys.path."""
    ensure_promptflow_importable()
    add_to_sys_path(code_dir)
    with _import_lock:
        _forget_foreign_module(module_name.split(".")[0], code_dir)
        return importlib.import_module(module_name)


def _is_tool(obj: Any) -> bool:
    # prompt flow's own @tool sets `__tool`; the compatibility package's sets its own marker.
    return callable(obj) and (hasattr(obj, "__tool") or hooks.is_tool(obj))


def find_tool_function(module: ModuleType, file_label: str) -> Callable[..., Any]:
    """The module's one @tool function, or its only public function defined there; else ToolLoadError."""
    members = [
        obj
        for _, obj in inspect.getmembers(module)
        if inspect.isfunction(obj) or (callable(obj) and _is_tool(obj))
    ]
    tools = [obj for obj in members if _is_tool(obj)]
    tools = [t for t in tools if getattr(_original(t), "__module__", None) == module.__name__] or tools
    if len(tools) == 1:
        return tools[0]
    if len(tools) > 1:
        names = ", ".join(sorted(getattr(t, "__name__", "?") for t in tools))
        raise ToolLoadError(f"'{file_label}' has several @tool functions ({names}); keep one per file")
    local = [
        f
        for f in members
        if inspect.isfunction(f) and f.__module__ == module.__name__ and not f.__name__.startswith("_")
    ]
    if len(local) == 1:
        return local[0]
    raise ToolLoadError(f"'{file_label}' defines no @tool function")


def _original(func: Any) -> Any:
    seen = 0
    while seen < 20:
        inner = getattr(func, "__original_function", None) or getattr(func, "__wrapped__", None)
        if inner is None:
            return func
        func = inner
        seen += 1
    return func


def signature_of(func: Callable[..., Any]) -> inspect.Signature:
    """The signature of the user's function beneath any decorators."""
    try:
        return _cached_signature(func)
    except TypeError:  # an unhashable callable object: no caching
        return _signature(func)


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(_original(func))
    except (TypeError, ValueError):
        return inspect.signature(func)


# Nodes call the same few functions on every line; signatures and type hints are the costly part of a call.
@functools.lru_cache(maxsize=1024)
def _cached_signature(func: Callable[..., Any]) -> inspect.Signature:
    return _signature(func)


def is_async_callable(func: Callable[..., Any]) -> bool:
    """Whether calling `func` returns an awaitable or async generator."""
    target = func
    if not inspect.isfunction(target) and not inspect.ismethod(target) and hasattr(target, "__call__"):  # noqa: B004
        target = target.__call__
    return inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target)


_SIMPLE_TYPES: dict[Any, Callable[[Any], Any]] = {int: int, float: float, str: str}


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1]
    return getattr(annotation, "__name__", "") or ""


def is_connection_annotation(annotation: Any) -> bool:
    """Whether a parameter annotation names a prompt flow connection class."""
    return _annotation_name(annotation).endswith("Connection")


def is_model_config_annotation(annotation: Any) -> bool:
    """Whether a parameter annotation names a prompt flow model configuration class."""
    return _annotation_name(annotation).endswith("ModelConfiguration")


def _resolved_hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return _cached_hints(func)
    except TypeError:  # an unhashable callable object: no caching
        return _hints(func)


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_original(func))
    except Exception:  # noqa: BLE001 - unresolved forward references fall back to the raw annotations
        return {}


@functools.lru_cache(maxsize=1024)
def _cached_hints(func: Callable[..., Any]) -> dict[str, Any]:
    return _hints(func)


def convert_literal(value: Any, annotation: Any) -> Any:
    """Coerce a YAML literal to a simple annotated type (int, float, str, bool), as prompt flow does."""
    if annotation is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    convert = _SIMPLE_TYPES.get(annotation)
    if convert is None or isinstance(value, annotation) or value is None:
        return value
    if annotation is str and not isinstance(value, int | float | bool):
        return value
    try:
        return convert(value)
    except (TypeError, ValueError):
        return value


def connection_object(conn: Any, annotation: Any = None) -> Any:
    """A prompt flow connection object (from `promptflow.connections`) for one of our Connection records."""
    from flowengine.compat._connections import to_promptflow_connection

    ensure_promptflow_importable()
    return to_promptflow_connection(conn)


def model_config_object(value: Any, annotation: Any, connections: Mapping[str, Any]) -> Any:
    """Turn a dict (maybe naming a `connection`) into the annotated prompt flow model configuration."""
    if not isinstance(value, Mapping):
        return value
    ensure_promptflow_importable()
    core = importlib.import_module("promptflow.core")
    cls = getattr(core, _annotation_name(annotation), None)
    if cls is None:
        return value
    data = dict(value)
    conn_name = data.get("connection")
    if isinstance(conn_name, str) and conn_name in connections and hasattr(cls, "from_connection"):
        conn = connection_object(connections[conn_name])
        extra = {k: v for k, v in data.items() if k in ("model", "azure_deployment") and v}
        return cls.from_connection(connection=conn, **extra)
    return cls(**data)


def resolve_arguments(
    func: Callable[..., Any],
    values: Mapping[str, Any],
    *,
    connections: Mapping[str, Any],
    literal_keys: frozenset[str] = frozenset(),
    label: str,
) -> dict[str, Any]:
    """Map resolved input values onto `func`'s parameters: connections and model configurations by name,
    literals coerced to simple annotated types. Raises ToolLoadError naming `label` for unknown connections."""
    sig = signature_of(func)
    hints = _resolved_hints(func)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        param = sig.parameters.get(name)
        annotation = hints.get(name, param.annotation if param is not None else inspect.Parameter.empty)
        if annotation is not inspect.Parameter.empty and is_connection_annotation(annotation):
            if isinstance(value, str):
                if value not in connections:
                    raise ToolLoadError(f"connection '{value}' (input '{name}') is not defined")
                value = connection_object(connections[value], annotation)
        elif annotation is not inspect.Parameter.empty and is_model_config_annotation(annotation):
            value = model_config_object(value, annotation, connections)
        elif name in literal_keys and annotation is not inspect.Parameter.empty:
            value = convert_literal(value, annotation)
        kwargs[name] = value
    return kwargs
