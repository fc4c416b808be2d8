"""Single-test streaming: the messages the test pane receives, how engine events become them, and the pane's
fragments (form, history, trace tree).

There is no channel-layer group here: the test consumer relays its own runner's events straight to its
socket, so a token costs no extra hop. Every message is a JSON object with a `type` (the MESSAGE_* names
below); messages about one test carry its id in `test`, so the page drops anything from an earlier test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from channels.db import database_sync_to_async
from django.http import Http404
from django.template.loader import render_to_string

from flowengine import events
from flows_app import selectors, services

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from flows_app.models import FlowTest

# Messages to the page.
MESSAGE_READY: Final = "ready"  # on connect: form, history, chat roles
MESSAGE_FORM: Final = "form"  # the form again (after a save made a new head)
MESSAGE_HISTORY: Final = "history"  # the history list again
MESSAGE_REFUSED: Final = "refused"  # a test that did not start, with the reason
MESSAGE_STARTED: Final = "started"  # a test began: its id, inputs, variant, node
MESSAGE_NODE: Final = "node"  # a node badge: running, completed, bypassed, failed (with duration)
MESSAGE_STREAM: Final = (
    "stream"  # streaming begins: the outputs that do not stream, the names of those that do
)
MESSAGE_CHUNK: Final = "chunk"  # text appended to one output
MESSAGE_LOG: Final = "log"  # a line the flow's code printed
MESSAGE_SPAN: Final = "span"  # a finished trace span
MESSAGE_ERROR: Final = "error"  # an error not tied to one node
MESSAGE_DONE: Final = "done"  # the test ended: status, outputs, error, trace tree, history
MESSAGE_RECORD: Final = "record"  # an earlier test, reopened from the history

# Actions the page sends: {"action": ACTION_*, ...}.
ACTION_RUN: Final = "run"  # inputs, variant, node, init
ACTION_CANCEL: Final = "cancel"
ACTION_OPEN: Final = "open"  # id
ACTION_FORM: Final = "form"
ACTION_HISTORY: Final = "history"

# What one test keeps: enough to read back, bounded so a chatty flow cannot fill the database.
MAX_LOG_LINES: Final = 2000
MAX_LOG_CHARS: Final = 1_000_000
MAX_SPANS: Final = 1000
MAX_PREVIEW_CHARS: Final = 20_000

TEMPLATES: Final = "flows_app/test"


def _error_dict(error: events.ErrorInfo | None) -> dict[str, Any] | None:
    return error.to_dict() if error is not None else None


class TestRecord:
    """Follows one test's events: turns each into its page message and keeps what the history stores."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, test_id: int) -> None:
        self.test_id = test_id
        self.logs: list[dict[str, Any]] = []
        self.log_chars = 0
        self.spans: list[dict[str, Any]] = []
        self.node_runs: dict[str, dict[str, Any]] = {}
        self.streamed: dict[str, list[str]] = {}
        self.outputs: dict[str, Any] = {}
        self.status: str | None = None
        self.error: dict[str, Any] | None = None
        self.usage: dict[str, Any] = {}
        self.duration_ms: float | None = None
        self.started = time.perf_counter()

    def add(self, event: events.Event) -> dict[str, Any] | None:
        """Record the event; the message for the page, or None when the page needs none."""
        test = self.test_id
        if isinstance(event, events.OutputChunk):
            if not event.delta:
                return None
            self.streamed.setdefault(event.output, []).append(event.delta)
            return {"type": MESSAGE_CHUNK, "test": test, "output": event.output, "delta": event.delta}
        if isinstance(event, events.NodeStarted):
            self.node_runs[event.node] = {"status": "running"}
            return {"type": MESSAGE_NODE, "test": test, "node": event.node, "status": "running"}
        if isinstance(event, events.NodeCompleted):
            self.node_runs[event.node] = {"status": "completed", "duration_ms": event.duration_ms}
            return {
                "type": MESSAGE_NODE,
                "test": test,
                "node": event.node,
                "status": "completed",
                "duration_ms": event.duration_ms,
            }
        if isinstance(event, events.NodeBypassed):
            self.node_runs[event.node] = {"status": "bypassed"}
            return {"type": MESSAGE_NODE, "test": test, "node": event.node, "status": "bypassed"}
        if isinstance(event, events.NodeFailed):
            error = _error_dict(event.error)
            self.node_runs[event.node] = {
                "status": "failed",
                "duration_ms": event.duration_ms,
                "error": error,
            }
            return {
                "type": MESSAGE_NODE,
                "test": test,
                "node": event.node,
                "status": "failed",
                "duration_ms": event.duration_ms,
                "error": error,
            }
        if isinstance(event, events.StreamStarted):
            self.outputs.update(event.outputs)
            for name in event.streams:
                self.streamed.setdefault(name, [])
            return {
                "type": MESSAGE_STREAM,
                "test": test,
                "outputs": event.to_dict()["outputs"],
                "streams": list(event.streams),
            }
        if isinstance(event, events.LogLine):
            entry = {"stream": event.stream, "text": event.text, "node": event.node}
            if len(self.logs) < MAX_LOG_LINES and self.log_chars < MAX_LOG_CHARS:
                self.logs.append(entry)
                self.log_chars += len(event.text)
            return {"type": MESSAGE_LOG, "test": test, **entry}
        if isinstance(event, events.TraceSpan):
            span = event.to_dict()
            span.pop("type", None)
            if len(self.spans) < MAX_SPANS:
                self.spans.append(span)
            return {"type": MESSAGE_SPAN, "test": test, "span": _span_summary(span)}
        if isinstance(event, events.ErrorEvent):
            self.error = self.error or _error_dict(event.error)
            return {"type": MESSAGE_ERROR, "test": test, "error": _error_dict(event.error)}
        if isinstance(event, events.LineCompleted):
            data = event.to_dict()
            self.outputs = data["outputs"] or self._joined()
            self.status = event.status
            self.error = _error_dict(event.error) or (self.error if event.status == "Failed" else None)
            self.usage = data.get("usage") or {}
            self.duration_ms = event.duration_ms
        return None

    def _joined(self) -> dict[str, Any]:
        return {**self.outputs, **{name: "".join(parts) for name, parts in self.streamed.items()}}

    def final(self, *, canceled: bool) -> dict[str, Any]:
        """The keyword arguments of services.flowtest_finish for how this test ended."""
        status = self.status or "Failed"
        error = self.error
        if canceled:
            status = "Canceled"
            error = {
                "code": "UserError",
                "type": "Canceled",
                "message": "The test was canceled.",
                "node": None,
                "traceback": None,
            }
        elif self.status is None and error is None:
            error = {
                "code": "SystemError",
                "type": "Stopped",
                "message": "The test stopped before it finished.",
                "node": None,
                "traceback": None,
            }
        for run in self.node_runs.values():
            if run["status"] == "running" and status != "Completed":
                run["status"] = "canceled" if canceled else "failed"
        return {
            "status": status,
            "outputs": self.outputs if status == "Completed" else self._joined(),
            "error": error,
            "logs": self.logs,
            "trace": self.spans,
            "node_runs": self.node_runs,
            "usage": self.usage,
            "duration_ms": self.duration_ms
            if self.duration_ms is not None
            else (time.perf_counter() - self.started) * 1000,
        }


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_PREVIEW_CHARS else text[:MAX_PREVIEW_CHARS] + "\n… (cut)"


def _span_summary(span: Mapping[str, Any]) -> dict[str, Any]:
    usage = span.get("usage") or {}
    return {
        "span_id": span.get("span_id"),
        "parent_id": span.get("parent_id"),
        "name": span.get("name"),
        "kind": span.get("kind"),
        "duration_ms": round((float(span.get("end") or 0) - float(span.get("start") or 0)) * 1000, 1),
        "total_tokens": usage.get("total_tokens"),
        "error": span.get("error"),
    }


def trace_tree(
    spans: list[Mapping[str, Any]], line_usage: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The spans as a tree (flow → nodes → LLM calls and traced functions), children in start order, each
    with its duration, token counts and its inputs and output as readable text.

    `line_usage` is the whole line's token count: the root flow span shows it when it has none of its own
    (a streamed LLM call's span ends when its stream is handed on, before its tokens are counted).
    """
    nodes: dict[str, dict[str, Any]] = {}
    for span in sorted(spans, key=lambda s: float(s.get("start") or 0)):
        usage = span.get("usage") or {}
        if not usage and span.get("kind") == "flow" and not span.get("parent_id"):
            usage = line_usage or {}
        nodes[str(span.get("span_id"))] = {
            "id": str(span.get("span_id")),
            "parent_id": span.get("parent_id"),
            "name": span.get("name") or "",
            "kind": span.get("kind") or "function",
            "duration_ms": max(0.0, (float(span.get("end") or 0) - float(span.get("start") or 0)) * 1000),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "inputs": _preview(span.get("inputs")) if span.get("inputs") not in (None, {}, "") else "",
            "output": _preview(span.get("output")) if span.get("output") is not None else "",
            "error": span.get("error") or "",
            "children": [],
        }
    roots: list[dict[str, Any]] = []
    for node in nodes.values():
        parent = nodes.get(str(node["parent_id"])) if node["parent_id"] else None
        (parent["children"] if parent is not None else roots).append(node)
    return roots


def render_trace(spans: list[Mapping[str, Any]], line_usage: Mapping[str, Any] | None = None) -> str:
    """The trace tree fragment."""
    roots = trace_tree(list(spans), line_usage)
    return render_to_string(f"{TEMPLATES}/_trace.html", {"roots": roots, "count": len(spans)})


def render_form(form: Mapping[str, Any]) -> str:
    """The inputs form fragment (fields, chat box, variant and node pickers)."""
    return render_to_string(f"{TEMPLATES}/_form.html", {"form": form})


def render_history(tests: Any) -> str:
    """The history list fragment."""
    return render_to_string(f"{TEMPLATES}/_history.html", {"tests": list(tests)})


def _chat_roles(form: Mapping[str, Any]) -> dict[str, Any] | None:
    return dict(form["chat"]) if form.get("chat") else None


def ready_message(user: AbstractBaseUser, flow_id: int) -> dict[str, Any]:
    """What the page gets on connect: the form, the history and the chat roles of the saved head."""
    form = selectors.flowtest_form_for(user, flow_id)
    return {
        "type": MESSAGE_READY,
        "form": render_form(form),
        "history": render_history(selectors.flowtest_list_for(user, flow_id)),
        "chat": _chat_roles(form),
        "version": form["version"].number,
        "outputs": form["outputs"],
    }


def form_message(user: AbstractBaseUser, flow_id: int) -> dict[str, Any]:
    """The form of the saved head again."""
    form = selectors.flowtest_form_for(user, flow_id)
    return {
        "type": MESSAGE_FORM,
        "form": render_form(form),
        "chat": _chat_roles(form),
        "version": form["version"].number,
        "outputs": form["outputs"],
    }


def history_message(user: AbstractBaseUser, flow_id: int) -> dict[str, Any]:
    """The history list again."""
    return {"type": MESSAGE_HISTORY, "history": render_history(selectors.flowtest_list_for(user, flow_id))}


def test_dict(test: FlowTest) -> dict[str, Any]:
    """A recorded test as the page shows it."""
    return {
        "id": test.pk,
        "version": test.version.number,
        "user": test.user.get_username() if test.user else None,
        "created_at": test.created_at.isoformat(),
        "status": test.status,
        "inputs": test.inputs,
        "outputs": test.outputs,
        "error": test.error,
        "logs": test.logs,
        "variant": test.variant,
        "node": test.node,
        "node_runs": test.node_runs,
        "usage": test.usage,
        "duration_ms": test.duration_ms,
    }


def record_message(user: AbstractBaseUser, flow_id: int, test_id: Any) -> dict[str, Any]:
    """An earlier test for the page to show again, with its trace tree."""
    test = selectors.flowtest_get_for(user, flow_id, test_id)
    return {"type": MESSAGE_RECORD, "test": test_dict(test), "trace": render_trace(test.trace, test.usage)}


def _text(value: Any, limit: int = 300) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


async def test_messages(
    *, session: services.FlowTestSession, user: AbstractBaseUser, flow_id: int, request: Mapping[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Run one test in the socket's session and yield the page's messages as its events arrive.

    The test is recorded as it ends however it ends (completed, failed, canceled, or the socket closed);
    the last message is `done` with the trace tree and the refreshed history.
    """
    try:
        test, plan = await database_sync_to_async(services.flowtest_start)(
            user=user,
            flow_id=flow_id,
            inputs=request.get("inputs") if request.get("inputs") is not None else {},
            variant=_text(request.get("variant")),
            node=_text(request.get("node")),
            init=request.get("init") if request.get("init") is not None else {},
        )
    except (services.FlowTestBusy, services.FlowTestRequestError) as error:
        yield {"type": MESSAGE_REFUSED, "message": str(error)}
        return
    except Http404:
        yield {
            "type": MESSAGE_REFUSED,
            "message": "This flow no longer exists or is no longer shared with you.",
        }
        return
    record = TestRecord(test.pk)
    yield {
        "type": MESSAGE_STARTED,
        "test": test.pk,
        "version": test.version.number,
        "inputs": test.inputs,
        "variant": test.variant,
        "node": test.node,
    }
    try:
        async with contextlib.aclosing(session.events(plan=plan, inputs=test.inputs)) as stream:
            async for event in stream:
                message = record.add(event)
                if message is not None:
                    yield message
    finally:
        final = record.final(canceled=session.canceled)
        # Recorded even when the socket went away mid-test: shielded from that cancellation.
        await asyncio.shield(database_sync_to_async(services.flowtest_finish)(test_id=test.pk, **final))
    history = await database_sync_to_async(history_message)(user, flow_id)
    yield {
        "type": MESSAGE_DONE,
        "test": test.pk,
        "status": final["status"],
        "outputs": final["outputs"],
        "error": final["error"],
        "node_runs": final["node_runs"],
        "usage": final["usage"],
        "duration_ms": final["duration_ms"],
        "trace": render_trace(final["trace"], final["usage"]),
        "history": history["history"],
    }
