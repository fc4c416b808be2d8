"""Hooks user code calls (`tool`, `log_metric`, `trace`) that the executor observes through context variables.

The `promptflow` compatibility package re-exports these, so code written for prompt flow feeds our executor.
The executor installs collectors with `collect_metrics()` and `collect_spans(sink)`; without them the hooks
are harmless no-ops, as in prompt flow outside a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

TOOL_ATTR = "__flowengine_tool__"


def new_span_id() -> str:
    """A 16-hex-digit span id: unique within a trace, not a secret, so it costs no system call."""
    # The random module reseeds in a forked child, so runners forked from one parent do not share ids.
    return f"{random.getrandbits(64):016x}"


# -- tool -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolInfo:
    """What `@tool(...)` recorded about a function."""

    name: str | None = None
    description: str | None = None
    type: str | None = None
    input_settings: dict[str, Any] | None = None
    streaming_option_parameter: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tool(
    func: F | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    type: str | None = None,
    input_settings: dict[str, Any] | None = None,
    streaming_option_parameter: str | None = None,
    **kwargs: Any,
) -> Any:
    """Mark a function as a tool (`@tool` or `@tool(name=...)`); the function itself is returned unchanged."""

    def mark(f: F) -> F:
        info = ToolInfo(
            name=name,
            description=description,
            type=type,
            input_settings=input_settings,
            streaming_option_parameter=streaming_option_parameter,
            extra=dict(kwargs),
        )
        try:
            setattr(f, TOOL_ATTR, info)
        except (AttributeError, TypeError):
            # Builtins and some callables refuse attributes; wrap them so they can be marked.
            @functools.wraps(f)
            def wrapper(*a: Any, **kw: Any) -> Any:
                return f(*a, **kw)

            setattr(wrapper, TOOL_ATTR, info)
            return wrapper  # type: ignore[return-value]
        return f

    if func is not None:
        return mark(func)
    return mark


def is_tool(obj: Any) -> bool:
    """Whether `obj` was marked with `@tool`."""
    return getattr(obj, TOOL_ATTR, None) is not None


def tool_info(obj: Any) -> ToolInfo | None:
    """The `@tool` metadata of `obj`, if marked."""
    return getattr(obj, TOOL_ATTR, None)


class ToolProvider:
    """Base class of class-based tools (prompt flow's ToolProvider): __init__ takes the tool's init inputs."""

    def __init__(self) -> None:
        pass

    @classmethod
    def get_initialize_inputs(cls) -> dict[str, inspect.Parameter]:
        """The __init__ parameters (besides self)."""
        params = inspect.signature(cls.__init__).parameters
        return {
            k: v for k, v in params.items() if k != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)
        }


# -- log_metric -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One logged metric."""

    key: str
    value: float
    variant_id: str | None = None


class MetricsCollector:
    """The metrics logged while it is installed, in order."""

    def __init__(self) -> None:
        self.items: list[Metric] = []

    def as_dict(self) -> dict[str, float]:
        """Metric name -> value (the last value logged under a name wins)."""
        return {m.key: m.value for m in self.items}


_metrics: contextvars.ContextVar[MetricsCollector | None] = contextvars.ContextVar(
    "flowengine_metrics", default=None
)


def log_metric(key: str, value: float | int, variant_id: str | None = None) -> None:
    """Record a metric (in an aggregation node or __aggregate__); ignored where no collector is installed."""
    collector = _metrics.get()
    if collector is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__}") from None
    collector.items.append(Metric(key=str(key), value=value, variant_id=variant_id))


@contextlib.contextmanager
def collect_metrics() -> Iterator[MetricsCollector]:
    """Install a metrics collector for the code run inside (and threads/tasks started from it)."""
    collector = MetricsCollector()
    token = _metrics.set(collector)
    try:
        yield collector
    finally:
        _metrics.reset(token)


# -- trace ----------------------------------------------------------------------------------------------

SpanSink = Callable[[dict[str, Any]], None]
_span_sink: contextvars.ContextVar[SpanSink | None] = contextvars.ContextVar(
    "flowengine_span_sink", default=None
)
_current_span: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flowengine_current_span", default=None
)
_MAX_TRACE_CHARS = 10_000


@contextlib.contextmanager
def collect_spans(sink: SpanSink, *, parent_id: str | None = None) -> Iterator[None]:
    """Send spans of `@trace`d calls to `sink` (a dict per span); `parent_id` parents the outermost ones."""
    token = _span_sink.set(sink)
    parent = _current_span.set(parent_id)
    try:
        yield
    finally:
        _current_span.reset(parent)
        _span_sink.reset(token)


def current_span_id() -> str | None:
    """The id of the innermost open span (or the parent installed by collect_spans)."""
    return _current_span.get()


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A JSON-serialisable, size-bounded version of a value for a trace."""
    if value is None or isinstance(value, bool | int | str):
        return (
            value
            if not isinstance(value, str) or len(value) <= _MAX_TRACE_CHARS
            else value[:_MAX_TRACE_CHARS]
        )
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth > 8:
        return repr(value)[:200]
    if isinstance(value, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in list(value.items())[:200]}
    if isinstance(value, list | tuple | set):
        return [json_safe(v, _depth + 1) for v in list(value)[:200]]
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)[:_MAX_TRACE_CHARS]


class _Span:
    def __init__(self, name: str, inputs: dict[str, Any]) -> None:
        self.sink = _span_sink.get()
        self.span_id = new_span_id()
        self.parent_id = _current_span.get()
        self.name = name
        self.inputs = inputs
        self.start = time.time()
        self.token: contextvars.Token[str | None] | None = None

    def enter(self) -> None:
        self.token = _current_span.set(self.span_id)

    def exit_context(self) -> None:
        if self.token is not None:
            with contextlib.suppress(ValueError):
                # A generator may be finished in another context than it started in.
                _current_span.reset(self.token)
            self.token = None

    def finish(self, output: Any = None, error: BaseException | None = None) -> None:
        if self.sink is None:
            return
        self.sink(
            {
                "span_id": self.span_id,
                "parent_id": self.parent_id,
                "name": self.name,
                "kind": "function",
                "start": self.start,
                "end": time.time(),
                "inputs": json_safe(self.inputs),
                "output": json_safe(output),
                "usage": None,
                "error": None if error is None else f"{type(error).__name__}: {error}",
            }
        )


def _bound_inputs(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {"args": list(args), **kwargs}
    return {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}


def trace(func: F | None = None, **_: Any) -> Any:
    """Record calls of the function as trace spans (sync, async, generators); a no-op without a collector."""

    def decorate(f: F) -> F:
        name = getattr(f, "__qualname__", getattr(f, "__name__", "function"))

        if inspect.isasyncgenfunction(f):

            @functools.wraps(f)
            async def agen_wrapper(*args: Any, **kwargs: Any) -> Any:
                if _span_sink.get() is None:
                    async for item in f(*args, **kwargs):
                        yield item
                    return
                span = _Span(name, _bound_inputs(f, args, kwargs))
                items: list[Any] = []
                span.enter()
                try:
                    async for item in f(*args, **kwargs):
                        items.append(item)
                        yield item
                except BaseException as exc:
                    span.finish(items, exc)
                    raise
                finally:
                    span.exit_context()
                span.finish(_joined(items))

            return agen_wrapper  # type: ignore[return-value]

        if inspect.iscoroutinefunction(f):

            @functools.wraps(f)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if _span_sink.get() is None:
                    return await f(*args, **kwargs)
                span = _Span(name, _bound_inputs(f, args, kwargs))
                span.enter()
                try:
                    result = await f(*args, **kwargs)
                except BaseException as exc:
                    span.finish(None, exc)
                    raise
                finally:
                    span.exit_context()
                span.finish(result)
                return result

            return async_wrapper  # type: ignore[return-value]

        if inspect.isgeneratorfunction(f):

            @functools.wraps(f)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                if _span_sink.get() is None:
                    yield from f(*args, **kwargs)
                    return
                span = _Span(name, _bound_inputs(f, args, kwargs))
                items: list[Any] = []
                span.enter()
                try:
                    for item in f(*args, **kwargs):
                        items.append(item)
                        yield item
                except BaseException as exc:
                    span.finish(items, exc)
                    raise
                finally:
                    span.exit_context()
                span.finish(_joined(items))

            return gen_wrapper  # type: ignore[return-value]

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _span_sink.get() is None:
                return f(*args, **kwargs)
            span = _Span(name, _bound_inputs(f, args, kwargs))
            span.enter()
            try:
                result = f(*args, **kwargs)
            except BaseException as exc:
                span.finish(None, exc)
                raise
            finally:
                span.exit_context()
            span.finish(result)
            return result

        return wrapper  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate


def _joined(items: list[Any]) -> Any:
    return "".join(items) if items and all(isinstance(i, str) for i in items) else items


def start_trace(*args: Any, **kwargs: Any) -> None:
    """prompt flow's start_trace: the studio always records traces, so there is nothing to start."""
    return None
