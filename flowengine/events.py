"""Typed events that execution yields; each turns into a JSON-safe dict and back."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import math
import traceback as _traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Literal

ErrorCode = Literal["UserError", "SystemError"]


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of `value`: containers recursed, dataclasses and models as dicts, others as text."""
    if _depth > 64:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Infinity; keep them readable rather than failing the whole event.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _depth + 1)
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, PurePath):
        return str(value)
    for method in ("model_dump", "to_dict", "dict"):
        func = getattr(value, method, None)
        if callable(func):
            try:
                return to_jsonable(func(), _depth + 1)
            except Exception:  # noqa: BLE001 - a broken user object still gets shown as text
                break
    return str(value)


@dataclass(frozen=True)
class ErrorInfo:
    """An error as users see it; `traceback` holds only the frames of the user's own code."""

    code: ErrorCode
    type: str
    message: str
    node: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "code": self.code,
            "type": self.type,
            "message": self.message,
            "node": self.node,
            "traceback": self.traceback,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorInfo:
        """The inverse of `to_dict`."""
        return cls(
            code="UserError" if data.get("code") == "UserError" else "SystemError",
            type=str(data.get("type") or ""),
            message=str(data.get("message") or ""),
            node=data.get("node"),
            traceback=data.get("traceback"),
        )

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        node: str | None = None,
        code: ErrorCode = "UserError",
        user_files: tuple[str, ...] = (),
    ) -> ErrorInfo:
        """An ErrorInfo for `exc`, keeping only traceback frames from files under `user_files` roots."""
        frames = _traceback.extract_tb(exc.__traceback__)
        if user_files:
            frames = _traceback.StackSummary.from_list(
                [f for f in frames if any(f.filename.startswith(root) for root in user_files)]
            )
        text = None
        if frames:
            text = "Traceback (most recent call last):\n" + "".join(frames.format())
            text += "".join(_traceback.format_exception_only(type(exc), exc))
        message = str(exc) or type(exc).__name__
        if node:
            message = f"node '{node}' failed: {type(exc).__name__}: {message}"
        return cls(code=code, type=type(exc).__name__, message=message, node=node, traceback=text)


@dataclass(frozen=True)
class Event:
    """Base class of every event."""

    type: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that includes the event `type`."""
        data: dict[str, Any] = {"type": self.type}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            data[name] = value.to_dict() if isinstance(value, ErrorInfo) else to_jsonable(value)
        return data


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() builds its answer anew on every call; a runner sends several events per line.
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class NodeStarted(Event):
    """A node began to run."""

    type: ClassVar[str] = "node_started"
    node: str
    line_number: int | None = None


@dataclass(frozen=True)
class NodeCompleted(Event):
    """A node finished; `output` is its (possibly joined streamed) output."""

    type: ClassVar[str] = "node_completed"
    node: str
    line_number: int | None = None
    output: Any = None
    duration_ms: float = 0.0


@dataclass(frozen=True)
class NodeBypassed(Event):
    """A node was skipped by its activate condition or because all it depends on was skipped."""

    type: ClassVar[str] = "node_bypassed"
    node: str
    line_number: int | None = None


@dataclass(frozen=True)
class NodeFailed(Event):
    """A node raised."""

    type: ClassVar[str] = "node_failed"
    node: str
    line_number: int | None = None
    error: ErrorInfo | None = None
    duration_ms: float = 0.0


@dataclass(frozen=True)
class StreamStarted(Event):
    """Streaming begins: `outputs` holds every output that is not streamed, `streams` names the others."""

    type: ClassVar[str] = "stream_started"
    line_number: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    streams: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutputChunk(Event):
    """One streamed piece of a flow output."""

    type: ClassVar[str] = "output_chunk"
    output: str
    delta: str
    line_number: int | None = None


@dataclass(frozen=True)
class LineCompleted(Event):
    """The last event of a line: its outputs (streams joined), status and what aggregation needs."""

    type: ClassVar[str] = "line_completed"
    line_number: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    status: Literal["Completed", "Failed"] = "Completed"
    error: ErrorInfo | None = None
    aggregation_inputs: dict[str, Any] = field(default_factory=dict)
    duration_ms: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogLine(Event):
    """A line a tool printed (or logged) while running."""

    type: ClassVar[str] = "log"
    stream: Literal["stdout", "stderr"] = "stdout"
    text: str = ""
    node: str | None = None
    line_number: int | None = None


@dataclass(frozen=True)
class TraceSpan(Event):
    """A finished span: the flow, a node, an LLM call or a traced function."""

    type: ClassVar[str] = "trace_span"
    span_id: str
    parent_id: str | None = None
    name: str = ""
    kind: Literal["flow", "node", "llm", "function"] = "function"
    start: float = 0.0
    end: float = 0.0
    inputs: Any = None
    output: Any = None
    usage: dict[str, int] | None = None
    error: str | None = None
    line_number: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics(Event):
    """Metrics logged by aggregation (log_metric, or the dict a flex `__aggregate__` returns)."""

    type: ClassVar[str] = "metrics"
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent(Event):
    """An error not tied to one node (bad inputs, a flow that cannot load, a failed aggregation)."""

    type: ClassVar[str] = "error"
    error: ErrorInfo | None = None
    line_number: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        NodeStarted,
        NodeCompleted,
        NodeBypassed,
        NodeFailed,
        StreamStarted,
        OutputChunk,
        LineCompleted,
        LogLine,
        TraceSpan,
        Metrics,
        ErrorEvent,
    )
}


def from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from `Event.to_dict()` output; raises ValueError for an unknown type."""
    kind = data.get("type")
    cls = EVENT_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "error" and isinstance(value, Mapping):
            value = ErrorInfo.from_dict(value)
        kwargs[f.name] = value
    return cls(**kwargs)
