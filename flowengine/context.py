"""Per-line execution context shared with tools and the `promptflow` compatibility package.

The executor sets a `RunContext` for each line (and for aggregation) in a context variable; code running
inside a node (including in worker threads, which copy the context) reaches it through the functions here:
`emit`, `span`, `record_usage`, `current_connections`. Printed output is routed to the node that printed it.
Metrics and `@trace` spans from user code arrive through `flowengine.hooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from flowengine import hooks
from flowengine.events import Event, LogLine, TraceSpan


@dataclass
class RunContext:
    """What code running for one line (or one aggregation) can reach."""

    sink: Callable[[Event], None]
    line_number: int | None = None
    connections: Mapping[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    flow_dir: str | None = None
    trace: bool = True  # False when nobody reads TraceSpan events: spans are then not built
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_usage(self, usage: Mapping[str, Any] | None) -> None:
        """Add token counts to the line's total (thread-safe)."""
        if not usage:
            return
        with self._lock:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = usage.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.usage[key] = self.usage.get(key, 0) + int(value)


_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("flowengine_run", default=None)
_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowengine_node", default=None)
_span: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowengine_span", default=None)


def current() -> RunContext | None:
    """The RunContext of the running line, if any."""
    return _run.get()


def current_node() -> str | None:
    """The name of the node whose code is running, if any."""
    return _node.get()


def current_span_id() -> str | None:
    """The id of the innermost open span, to parent new spans under."""
    return _span.get()


def current_connections() -> Mapping[str, Any]:
    """The connections the running flow was given (name -> flowengine Connection)."""
    ctx = _run.get()
    return ctx.connections if ctx is not None else {}


def set_run(ctx: RunContext | None) -> contextvars.Token[RunContext | None]:
    """Make `ctx` current in this context; used by the executor."""
    return _run.set(ctx)


def set_node(name: str | None) -> contextvars.Token[str | None]:
    """Mark the node whose code runs in this context; used by the executor."""
    return _node.set(name)


def set_span(span_id: str | None) -> contextvars.Token[str | None]:
    """Make `span_id` the parent of spans opened in this context."""
    return _span.set(span_id)


def emit(event: Event) -> None:
    """Send an event to the running line's stream; does nothing outside a line."""
    ctx = _run.get()
    if ctx is not None:
        ctx.sink(event)


def record_usage(usage: Mapping[str, Any] | None) -> None:
    """Add LLM token usage made by tool code (prompty, OpenAI calls) to the line's total."""
    ctx = _run.get()
    if ctx is not None:
        ctx.add_usage(usage)


class SpanHandle:
    """An open span; set its output (and usage) before it closes."""

    def __init__(self, span_id: str) -> None:
        self.span_id = span_id
        self.output: Any = None
        self.usage: dict[str, int] | None = None
        self.attributes: dict[str, Any] = {}

    def set_output(self, output: Any, usage: Mapping[str, Any] | None = None) -> None:
        """Record what the span produced."""
        self.output = output
        if usage:
            self.usage = {k: int(v) for k, v in usage.items() if isinstance(v, int | float)}


@contextlib.contextmanager
def span(name: str, kind: str = "function", inputs: Any = None) -> Iterator[SpanHandle]:
    """Open a trace span around a block; emits a TraceSpan when the block ends (with the error if it raised).

    Usage recorded on the handle is added to the line's token total, so an LLM call counts once.
    """
    ctx = _run.get()
    if ctx is not None and not ctx.trace:
        yield from _untraced_span(ctx)
        return
    span_id = hooks.new_span_id()
    parent = _span.get()
    handle = SpanHandle(span_id)
    token = _span.set(span_id)
    start = time.time()
    error: str | None = None
    ctx = _run.get()
    # `@trace`d user functions called inside this span report through flowengine.hooks; parent them here.
    collecting = hooks.collect_spans(_hook_sink(ctx), parent_id=span_id) if ctx else contextlib.nullcontext()
    try:
        with collecting:
            yield handle
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _span.reset(token)
        ctx = _run.get()
        if ctx is not None:
            if handle.usage:
                ctx.add_usage(handle.usage)
            ctx.sink(
                TraceSpan(
                    span_id=span_id,
                    parent_id=parent,
                    name=name,
                    kind=kind if kind in ("flow", "node", "llm", "function") else "function",  # type: ignore[arg-type]
                    start=start,
                    end=time.time(),
                    inputs=inputs,
                    output=handle.output,
                    usage=handle.usage,
                    error=error,
                    line_number=ctx.line_number,
                    attributes={**handle.attributes, **({"node_name": _node.get()} if _node.get() else {})},
                )
            )


def _untraced_span(ctx: RunContext) -> Iterator[SpanHandle]:
    """A span of a line whose traces nobody reads: only its token usage (and that of `@trace` calls) counts."""
    handle = SpanHandle("")
    try:
        with hooks.collect_spans(_usage_sink(ctx)):
            yield handle
    finally:
        if handle.usage:
            ctx.add_usage(handle.usage)


def _usage_sink(ctx: RunContext) -> Callable[[dict[str, Any]], None]:
    def sink(data: dict[str, Any]) -> None:
        ctx.add_usage(data.get("usage") or None)

    return sink


def _hook_sink(ctx: RunContext) -> Callable[[dict[str, Any]], None]:
    """Turn span dicts from flowengine.hooks into TraceSpan events of this line (adding any token usage)."""

    def sink(data: dict[str, Any]) -> None:
        usage = data.get("usage") or None
        if usage:
            ctx.add_usage(usage)
        kind = data.get("kind")
        ctx.sink(
            TraceSpan(
                span_id=str(data.get("span_id") or hooks.new_span_id()),
                parent_id=data.get("parent_id"),
                name=str(data.get("name") or ""),
                kind=kind if kind in ("flow", "node", "llm", "function") else "function",
                start=float(data.get("start") or 0.0),
                end=float(data.get("end") or 0.0),
                inputs=data.get("inputs"),
                output=data.get("output"),
                usage=dict(usage) if usage else None,
                error=data.get("error"),
                line_number=ctx.line_number,
                attributes=dict(data.get("attributes") or {}),
            )
        )

    return sink


def make_threadsafe_sink(
    loop: asyncio.AbstractEventLoop, put: Callable[[Event], None]
) -> Callable[[Event], None]:
    """A sink callable from any thread that hands events to `put` on `loop`'s thread.

    Call it from the thread running `loop` (it is made there): sync tools run on that thread too, with the
    running loop hidden from them, and their events must keep their place before the node's own.
    """
    owner = threading.get_ident()

    def sink(event: Event) -> None:
        if threading.get_ident() == owner:
            put(event)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(put, event)

    return sink


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: text written inside a node becomes LogLine events.

    Writes outside any node go to the original stream, so the process's own output is untouched.
    """

    def __init__(self, original: TextIO, name: str) -> None:
        super().__init__()
        self.original = original
        self.stream_name = name
        self._partial: dict[tuple[int, str | None], str] = {}
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8") or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    def write(self, text: str) -> int:
        ctx = _run.get()
        node = _node.get()
        if ctx is None:
            return self.original.write(text)
        key = (id(ctx), node)
        with self._lock:
            buffered = self._partial.pop(key, "") + text
            *lines, rest = buffered.split("\n")
            if rest:
                self._partial[key] = rest
        for line in lines:
            ctx.sink(LogLine(stream=self.stream_name, text=line, node=node, line_number=ctx.line_number))  # type: ignore[arg-type]
        return len(text)

    def flush_context(self, ctx: RunContext) -> None:
        """Emit any unterminated text `ctx` wrote, at the end of a node or line."""
        with self._lock:
            keys = [k for k in self._partial if k[0] == id(ctx)]
            pending = [(k[1], self._partial.pop(k)) for k in keys]
        for node, text in pending:
            ctx.sink(LogLine(stream=self.stream_name, text=text, node=node, line_number=ctx.line_number))  # type: ignore[arg-type]

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.original.flush()


_install_lock = threading.Lock()


def install_output_capture() -> None:
    """Route sys.stdout and sys.stderr through the node-aware streams (idempotent)."""
    if isinstance(sys.stdout, _RoutedStream) and isinstance(sys.stderr, _RoutedStream):
        return  # every line calls this: the common case takes no lock
    with _install_lock:
        if not isinstance(sys.stdout, _RoutedStream):
            sys.stdout = _RoutedStream(sys.stdout, "stdout")  # type: ignore[assignment]
        if not isinstance(sys.stderr, _RoutedStream):
            sys.stderr = _RoutedStream(sys.stderr, "stderr")  # type: ignore[assignment]


def flush_output(ctx: RunContext) -> None:
    """Emit partial printed lines that `ctx` left without a newline."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _RoutedStream):
            stream.flush_context(ctx)
