"""Events are JSON-safe and rebuild from their dicts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from flowengine import events
from flowengine.events import (
    ErrorInfo,
    LineCompleted,
    NodeFailed,
    OutputChunk,
    TraceSpan,
    from_dict,
    to_jsonable,
)


def test_every_event_round_trips_through_json():
    error = ErrorInfo(code="UserError", type="ValueError", message="bad", node="n", traceback="tb")
    samples = [
        events.NodeStarted(node="n", line_number=1),
        events.NodeCompleted(node="n", line_number=1, output={"a": [1, 2]}, duration_ms=3.5),
        events.NodeBypassed(node="n", line_number=1),
        NodeFailed(node="n", line_number=1, error=error, duration_ms=1.0),
        events.StreamStarted(line_number=1, outputs={"x": 1}, streams=["answer"]),
        OutputChunk(output="answer", delta="he", line_number=1),
        LineCompleted(
            line_number=1, outputs={"a": 1}, status="Failed", error=error, usage={"total_tokens": 3}
        ),
        events.LogLine(stream="stderr", text="warn", node="n", line_number=1),
        TraceSpan(span_id="s1", parent_id=None, name="n", kind="llm", usage={"total_tokens": 3}),
        events.Metrics(metrics={"accuracy": 0.5}),
        events.ErrorEvent(error=error),
    ]
    for event in samples:
        data = json.loads(json.dumps(event.to_dict()))
        assert data["type"] == event.type
        assert from_dict(data) == event


def test_unknown_event_types_are_refused():
    with pytest.raises(ValueError, match="unknown event type"):
        from_dict({"type": "nope"})


def test_odd_values_become_json_safe():
    @dataclasses.dataclass
    class Point:
        x: int

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    value = to_jsonable({"p": Point(1), "t": (1, 2), "o": Opaque(), "nan": math.nan, 3: b"bytes"})
    assert value == {"p": {"x": 1}, "t": [1, 2], "o": "opaque!", "nan": "nan", "3": "bytes"}
    json.dumps(value)


def test_error_info_keeps_only_user_frames(tmp_path):
    user_file = tmp_path / "tool.py"
    user_file.write_text("def boom():\n    raise KeyError('k')\n")
    namespace: dict = {}
    exec(compile(user_file.read_text(), str(user_file), "exec"), namespace)  # noqa: S102 - test fixture code
    try:
        namespace["boom"]()
    except KeyError as exc:
        info = ErrorInfo.from_exception(exc, node="n", user_files=(str(tmp_path),))
    assert info.type == "KeyError" and info.node == "n"
    assert "tool.py" in info.traceback and "test_events.py" not in info.traceback
