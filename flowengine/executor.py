"""Run flows: one line at a time as a stream of events, and aggregation over a run's lines.

Independent DAG nodes run concurrently: async tools on the event loop, sync tools in a thread pool (or, once a
sync tool has shown that its calls are quick, on the loop too).
This module runs user code; use it inside the runner process (or the local CLI), not the web server.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowengine import context as ctxmod
from flowengine import hooks
from flowengine.events import (
    ErrorEvent,
    ErrorInfo,
    Event,
    LineCompleted,
    Metrics,
    NodeBypassed,
    NodeCompleted,
    NodeFailed,
    NodeStarted,
    OutputChunk,
    StreamStarted,
    TraceSpan,
    from_dict,
    to_jsonable,
)
from flowengine.model import Flow, FlowValidationError, Node, Problem, parse_reference, resolve_property
from flowengine.tools import python_tool
from flowengine.validation import check_valid

_DONE = object()


# A sync tool whose last INLINE_AFTER_CALLS calls each took under INLINE_MAX_SECONDS runs on the event loop
# instead of in the thread pool: the hop to a thread and back costs more than such a call, and with many lines
# in flight every hop also waits for a full turn of the loop. One call on the loop that takes longer than
# INLINE_DEMOTE_SECONDS sends the tool back to the pool for good.
INLINE_AFTER_CALLS = 16
INLINE_MAX_SECONDS = 0.001
INLINE_DEMOTE_SECONDS = 0.005


class _SyncPlace:
    """Where one sync tool runs: in the thread pool until it has proved itself quick, then on the loop."""

    __slots__ = ("demoted", "inline", "quick")

    def __init__(self) -> None:
        self.quick = 0
        self.inline = False
        self.demoted = False

    def call_timed(
        self, context: contextvars.Context, func: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Call in a pool thread, counting quick calls in a row."""
        started = time.perf_counter()
        try:
            return context.run(func, **kwargs)
        finally:
            quick = time.perf_counter() - started < INLINE_MAX_SECONDS
            # Threads race on the count; a lost update only delays the move by a call.
            self.quick = self.quick + 1 if quick else 0
            if self.quick >= INLINE_AFTER_CALLS and not self.demoted:
                self.inline = True

    def call_inline(
        self, context: contextvars.Context, func: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Call on the loop's thread, as if from a pool thread: user code that starts its own event loop
        (asyncio.run) must not see ours running."""
        loop = asyncio.get_running_loop()
        asyncio._set_running_loop(None)
        started = time.perf_counter()
        try:
            return context.run(func, **kwargs)
        finally:
            asyncio._set_running_loop(loop)
            if time.perf_counter() - started > INLINE_DEMOTE_SECONDS:
                self.inline = False
                self.demoted = True


class FlowRunError(Exception):
    """A user-facing failure of a line or aggregation (bad inputs, missing connection, bad reference)."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class _NodeFailure(Exception):
    """Carries the ErrorInfo of the node that failed a line."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class LineResult:
    """The outcome of one line, as `aggregate` and batch runs need it."""

    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "Completed"
    error: ErrorInfo | None = None
    aggregation_inputs: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    line_number: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    duration_ms: float = 0.0

    @classmethod
    def from_event(cls, event: LineCompleted, events: list[Event] | None = None) -> LineResult:
        """The LineResult a LineCompleted event describes."""
        return cls(
            outputs=dict(event.outputs),
            status=event.status,
            error=event.error,
            aggregation_inputs=dict(event.aggregation_inputs),
            events=list(events or []),
            usage=dict(event.usage),
            line_number=event.line_number,
            inputs=dict(event.inputs),
            duration_ms=event.duration_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the LineCompleted form, without the other events)."""
        return LineCompleted(
            line_number=self.line_number,
            outputs=self.outputs,
            status="Completed" if self.status == "Completed" else "Failed",
            error=self.error,
            aggregation_inputs=self.aggregation_inputs,
            duration_ms=self.duration_ms,
            usage=self.usage,
            inputs=self.inputs,
        ).to_dict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LineResult:
        """Rebuild from `to_dict()` or from a LineCompleted event dict."""
        payload = dict(data)
        payload["type"] = LineCompleted.type
        event = from_dict(payload)
        assert isinstance(event, LineCompleted)
        return cls.from_event(event)


@dataclass
class AggregationResult:
    """The outcome of aggregation: metrics, aggregation node outputs, and the events it produced."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    status: str = "Completed"
    error: ErrorInfo | None = None


def _is_stream(value: Any) -> bool:
    if isinstance(value, str | bytes | dict | list | tuple):
        return False
    return isinstance(value, Iterator) or hasattr(value, "__anext__")


def _parse_value(type_name: str, value: Any, name: str, line_number: int | None) -> Any:
    """Convert a flow input to its declared type, with prompt flow's rules."""
    where = f"flow input '{name}'" + (f" in line {line_number}" if line_number is not None else "")
    try:
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if type_name == "double":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if type_name == "string":
            return value if isinstance(value, str) else str(value)
        if type_name == "list":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, list):
                raise ValueError
            return value
        if type_name == "object" and isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value
    except json.JSONDecodeError as exc:
        raise FlowRunError(
            f"the value of {where} has type '{type_name}' but is not valid JSON: {exc.msg}"
        ) from None
    except (TypeError, ValueError):
        raise FlowRunError(f"the value {value!r} of {where} does not match its type '{type_name}'") from None


class _Line:
    """State of one running line (or one aggregation pass)."""

    def __init__(self, ctx: ctxmod.RunContext, inputs: dict[str, Any], stream: bool) -> None:
        self.ctx = ctx
        self.inputs = inputs
        self.stream = stream
        self.outputs: dict[str, Any] = {}
        self.bypassed: set[str] = set()
        # Aggregation: already-collected per-line values, keyed like `${grade.output}`.
        self.overrides: dict[str, Any] = {}

    def emit(self, event: Event) -> None:
        self.ctx.sink(event)


# prompt flow's built-in LLM tool, used by `custom_llm` nodes with a prompt template.
_BUILTIN_LLM_TOOL = "promptflow.tools.llm.llm"


class FlowExecutor:
    """Runs one flow (with a chosen variant and init) for many lines."""

    def __init__(
        self,
        flow: Flow,
        *,
        connections: Mapping[str, Any] | None = None,
        variant: str | None = None,
        init: Mapping[str, Any] | None = None,
        max_concurrency: int = 16,
        line_timeout: float | None = None,
        apply_environment: bool = True,
    ) -> None:
        if flow.kind == "dag":
            flow = flow.with_variant(variant)
        elif variant:
            raise FlowValidationError(
                [Problem(message=f"a {flow.kind} flow has no variants (got {variant!r})", field="variant")]
            )
        check_valid(flow)
        self.flow = flow
        self.connections: dict[str, Any] = dict(connections or {})
        self.init = dict(init or {})
        self.max_concurrency = max(1, int(max_concurrency))
        self.line_timeout = line_timeout
        self._pool = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="flowengine-node"
        )
        self._tools: dict[str, Callable[..., Any]] = {}
        self._places: dict[Callable[..., Any], _SyncPlace] = {}
        self._templates: dict[tuple[str, str], str] = {}
        self._load_lock = threading.Lock()
        self._entry: Any = None
        self._entry_lock: asyncio.Lock | None = None
        self._include_dirs = self._additional_include_dirs()
        self._user_roots = (str(flow.path), *self._include_dirs)
        self._node_users = self._count_node_users()
        if apply_environment:
            # As prompt flow's executor does: the flow's environment_variables (with `${conn.key}`
            # resolved) are set for the process, which is a runner dedicated to this flow, and user
            # code that resolves connections by name (Prompty, model configurations) finds ours.
            os.environ.update(environment_for(flow, self.connections))
            if self.connections:
                from flowengine.connections import set_current_connections

                set_current_connections(self.connections)

    def _additional_include_dirs(self) -> tuple[str, ...]:
        """Folders whose modules additional_includes bring in, for running a flow in place (no snapshot).

        A snapshot copies each include into the flow folder; running the source folder directly instead
        makes the same imports work by putting each include's parent folder on sys.path.
        """
        dirs = []
        for inc in self.flow.additional_includes:
            target = (self.flow.path / inc).resolve()
            if (
                target.exists()
                and not target.is_relative_to(self.flow.path)
                and str(target.parent) not in dirs
            ):
                dirs.append(str(target.parent))
        return tuple(dirs)

    def _prepare_imports(self) -> None:
        python_tool.ensure_promptflow_importable()
        python_tool.add_to_sys_path(self.flow.path)
        for folder in self._include_dirs:
            python_tool.add_to_sys_path(Path(folder), first=False)

    # -- public API ---------------------------------------------------------------------------------------

    async def run_line(
        self,
        inputs: Mapping[str, Any],
        *,
        line_number: int | None = None,
        node: str | None = None,
        stream: bool = False,
        event_types: Collection[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Run one line and yield its events; the last one is always LineCompleted.

        `node` runs that single node with `inputs` holding flow inputs and, for each node it depends on,
        `<node>.output` (or `${<node>.output}`). With `stream`, outputs that are streams arrive as
        OutputChunk events after a StreamStarted event carrying the other outputs. `event_types` limits
        the events to these types (LineCompleted always comes); without "trace_span" no spans are built.
        """
        body = self._line_body(dict(inputs), line_number, node, stream)
        async for event in self._drive(body, line_number, event_types):
            yield event

    async def run_line_into(
        self,
        emit: Callable[[Event], None],
        inputs: Mapping[str, Any],
        *,
        line_number: int | None = None,
        node: str | None = None,
        stream: bool = False,
        event_types: Collection[str] | None = None,
    ) -> None:
        """Run one line in the calling task, handing each event to `emit` (on this loop's thread) as it comes.

        Arguments and events are those of `run_line`. Without a task and a queue of its own, a line that gets its
        LLM answer goes on to its end, and its caller to its next line, in the same pass of the event loop: with
        many lines in flight, the lines whose answers arrived together no longer wait for each other's every step.
        The caller's task must be the line's alone while it runs (its context variables become the line's).
        """
        body = self._line_body(dict(inputs), line_number, node, stream)
        ctx = self._line_context(asyncio.get_running_loop(), emit, line_number, event_types)
        ctxmod.install_output_capture()
        await self._enter(body, ctx)

    async def run_line_result(self, inputs: Mapping[str, Any], **kwargs: Any) -> LineResult:
        """Run one line and collect it into a LineResult (with every event)."""
        events: list[Event] = []
        last: LineCompleted | None = None
        async for event in self.run_line(inputs, **kwargs):
            events.append(event)
            if isinstance(event, LineCompleted):
                last = event
        assert last is not None
        return LineResult.from_event(last, events)

    async def aggregate_events(self, results: Sequence[LineResult]) -> AsyncIterator[Event]:
        """Run aggregation over the lines' results and yield its events; the last is Metrics."""
        async for event in self._drive(self._aggregate_body(list(results)), None):
            yield event

    async def aggregate(self, results: Sequence[LineResult]) -> AggregationResult:
        """Run DAG aggregation nodes (or a flex class's `__aggregate__`) over the completed lines."""
        outcome = AggregationResult()
        async for event in self.aggregate_events(results):
            outcome.events.append(event)
            if isinstance(event, Metrics):
                outcome.metrics = dict(event.metrics)
            elif isinstance(event, NodeCompleted):
                outcome.outputs[event.node] = event.output
            elif isinstance(event, ErrorEvent | NodeFailed) and event.error is not None:
                outcome.status = "Failed"
                outcome.error = outcome.error or event.error
        return outcome

    def close(self) -> None:
        """Release the thread pool; running sync tools finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -------------------------------------------------------------------------------------------

    async def _drive(
        self,
        body: Callable[[ctxmod.RunContext], Awaitable[None]],
        line_number: int | None,
        event_types: Collection[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Run `body` as its own task with a fresh RunContext and relay the events it emits."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ctx = self._line_context(loop, queue.put_nowait, line_number, event_types)

        async def runner() -> None:
            try:
                await self._enter(body, ctx)
            finally:
                queue.put_nowait(_DONE)

        ctxmod.install_output_capture()
        # A separate task keeps the context variables out of the caller's context.
        task = loop.create_task(runner(), context=contextvars.copy_context())
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            await task
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    def _line_context(
        self,
        loop: asyncio.AbstractEventLoop,
        put: Callable[[Event], None],
        line_number: int | None,
        event_types: Collection[str] | None,
    ) -> ctxmod.RunContext:
        """A fresh RunContext whose events (of `event_types`, when given) go to `put` on `loop`'s thread."""
        if event_types is not None:
            wanted = frozenset(event_types) | {LineCompleted.type}
            relay = put

            def put(event: Event) -> None:
                # Unwanted events stop here rather than travel on to be dropped later.
                if event.type in wanted:
                    relay(event)

        return ctxmod.RunContext(
            sink=ctxmod.make_threadsafe_sink(loop, put),
            line_number=line_number,
            connections=self.connections,
            flow_dir=str(self.flow.path),
            trace=event_types is None or TraceSpan.type in event_types,
        )

    @staticmethod
    async def _enter(body: Callable[[ctxmod.RunContext], Awaitable[None]], ctx: ctxmod.RunContext) -> None:
        ctxmod.set_run(ctx)
        ctxmod.set_node(None)
        ctxmod.set_span(None)
        await body(ctx)

    def _error(self, exc: BaseException, node: str | None = None) -> ErrorInfo:
        if isinstance(exc, _NodeFailure):
            return exc.error
        if isinstance(exc, FlowRunError | python_tool.ToolLoadError):
            where = getattr(exc, "node", None) or node
            message = str(exc)
            if where and not message.startswith("node '"):
                message = f"node '{where}': {message}"
            return ErrorInfo(code="UserError", type=type(exc).__name__, message=message, node=where)
        if isinstance(exc, FlowValidationError):
            return ErrorInfo(code="UserError", type="FlowValidationError", message=str(exc), node=node)
        # A provider's 5xx after every retry is the service's fault, not the flow author's. The LLM module is
        # looked up rather than imported: when it was never loaded, this cannot be one of its errors.
        llm = sys.modules.get("flowengine.llm")
        system = llm is not None and isinstance(exc, llm.LLMError) and not exc.user_error
        code = "SystemError" if system else "UserError"
        return ErrorInfo.from_exception(exc, node=node, code=code, user_files=self._user_roots)

    # -- one line -------------------------------------------------------------------------------------------

    def _line_body(
        self, raw_inputs: dict[str, Any], line_number: int | None, node: str | None, stream: bool
    ) -> Callable[[ctxmod.RunContext], Awaitable[None]]:
        async def body(ctx: ctxmod.RunContext) -> None:
            started = time.perf_counter()
            outputs: dict[str, Any] = {}
            aggregation_inputs: dict[str, Any] = {}
            error: ErrorInfo | None = None
            inputs = dict(raw_inputs)
            try:
                with ctxmod.span(self.flow.name or "flow", "flow", raw_inputs) as flow_span:
                    inputs = self._prepare_inputs(raw_inputs, line_number, partial=node is not None)
                    line = _Line(ctx, inputs, stream)
                    run = self._run_line_inner(line, node)
                    if self.line_timeout:
                        async with asyncio.timeout(self.line_timeout):
                            outputs, aggregation_inputs = await run
                    else:
                        outputs, aggregation_inputs = await run
                    flow_span.set_output(outputs)
            except TimeoutError:
                error = ErrorInfo(
                    code="UserError",
                    type="LineExecutionTimeoutError",
                    message=(
                        f"line {line_number if line_number is not None else 0} execution timeout "
                        f"for exceeding {self.line_timeout:g} seconds"
                    ),
                )
            except Exception as exc:  # every failure ends the line with an error, never an exception
                error = self._error(exc)
            ctxmod.flush_output(ctx)
            ctx.sink(
                LineCompleted(
                    line_number=line_number,
                    outputs=outputs if error is None else {},
                    status="Completed" if error is None else "Failed",
                    error=error,
                    aggregation_inputs=aggregation_inputs if error is None else {},
                    duration_ms=(time.perf_counter() - started) * 1000,
                    usage=dict(ctx.usage),
                    inputs=inputs,
                )
            )

        return body

    def _prepare_inputs(
        self, raw: Mapping[str, Any], line_number: int | None, *, partial: bool = False
    ) -> dict[str, Any]:
        """Apply defaults and convert declared types; missing required inputs are a user error."""
        inputs = dict(raw)
        missing = []
        for name, spec in self.flow.inputs.items():
            if name not in inputs:
                if spec.has_default:
                    inputs[name] = spec.default
                elif self.flow.kind == "dag" and not partial:
                    missing.append(name)
                continue
            if self.flow.kind == "dag" and spec.type and inputs[name] is not None:
                inputs[name] = _parse_value(spec.type, inputs[name], name, line_number)
        if missing:
            where = f" in line {line_number}" if line_number is not None else ""
            names = ", ".join(f"'{m}'" for m in missing)
            raise FlowRunError(f"no value was given for flow input {names}{where}")
        return inputs

    async def _run_line_inner(self, line: _Line, node: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.flow.kind == "dag":
            if node is not None:
                return await self._run_single_node(line, node)
            await self._run_dag(line, self.flow.line_nodes)
            outputs = self._extract_outputs(line)
            aggregation_inputs = self._aggregation_inputs(line)
        elif self.flow.kind == "flex":
            raw = await self._run_flex(line)
            outputs = _flex_outputs(raw)
            aggregation_inputs = {"line_result": raw}
        else:
            outputs = await self._run_prompty(line)
            aggregation_inputs = {}
        outputs = await self._finish_outputs(line, outputs)
        return outputs, aggregation_inputs

    async def _finish_outputs(self, line: _Line, outputs: dict[str, Any]) -> dict[str, Any]:
        """Stream (or join) outputs that are generators, so the final outputs are plain values."""
        streams = [name for name, value in outputs.items() if _is_stream(value)]
        if not streams:
            return outputs
        if line.stream:
            plain = {k: v for k, v in outputs.items() if k not in streams}
            line.emit(StreamStarted(line_number=line.ctx.line_number, outputs=plain, streams=streams))
        joined: dict[int, str] = {}
        final = dict(outputs)
        for name in streams:
            value = outputs[name]
            if id(value) in joined:
                final[name] = joined[id(value)]
                continue
            parts = []
            async for chunk in self._iterate(value):
                text = chunk if isinstance(chunk, str) else str(chunk)
                parts.append(text)
                if line.stream:
                    line.emit(OutputChunk(output=name, delta=text, line_number=line.ctx.line_number))
            joined[id(value)] = final[name] = "".join(parts)
        return final

    async def _iterate(self, value: Any) -> AsyncIterator[Any]:
        """Iterate a sync or async stream; sync generators advance in the pool (they run user code)."""
        if hasattr(value, "__anext__"):
            async for item in value:
                yield item
            return
        loop = asyncio.get_running_loop()
        end = object()
        context = contextvars.copy_context()
        while True:
            item = await loop.run_in_executor(self._pool, context.run, next, value, end)
            if item is end:
                return
            yield item

    # -- DAG ------------------------------------------------------------------------------------------------

    def _count_node_users(self) -> dict[str, int]:
        """How many other nodes read each node's output (streams are joined for those)."""
        users: dict[str, int] = {}
        for node in self.flow.nodes:
            for dep in node.node_dependencies():
                users[dep] = users.get(dep, 0) + 1
        return users

    def _streamable(self, node: Node) -> bool:
        """Prompt flow streams a node's output only when a flow output, and no other node, reads it."""
        if self._node_users.get(node.name):
            return False
        for output in self.flow.outputs.values():
            ref = parse_reference(output.reference)
            if ref is not None and ref.kind == "node" and ref.name == node.name and not ref.property:
                return True
        return False

    async def _run_dag(self, line: _Line, nodes: Sequence[Node]) -> None:
        """Run `nodes` in dependency order, as many at once as are ready; the first failure fails the line."""
        pending = list(nodes)
        running: dict[asyncio.Task[Any], Node] = {}
        known = {n.name for n in nodes}
        try:
            while pending or running:
                startable: list[Node] = []
                progressed = True
                while progressed:
                    progressed = False
                    for node in list(pending):
                        if not self._ready(line, node, known):
                            continue
                        pending.remove(node)
                        progressed = True
                        if self._bypassable(line, node):
                            line.bypassed.add(node.name)
                            line.outputs[node.name] = None
                            line.emit(NodeBypassed(node=node.name, line_number=line.ctx.line_number))
                            continue
                        startable.append(node)
                if len(startable) == 1 and not running:
                    # The only node that can run is awaited right here: a chain of nodes then costs no task
                    # and no extra pass of the event loop per node, which adds up with many lines in flight.
                    node = startable[0]
                    line.outputs[node.name] = await self._run_node(line, node)
                    continue
                for node in startable:
                    task = asyncio.get_running_loop().create_task(self._run_node(line, node))
                    running[task] = node
                if not running:
                    if pending:
                        names = ", ".join(n.name for n in pending)
                        raise FlowRunError(f"nodes {names} can never run: their dependencies form a cycle")
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node = running.pop(task)
                    line.outputs[node.name] = task.result()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def _ready(self, line: _Line, node: Node, known: set[str]) -> bool:
        for dep in node.node_dependencies():
            if dep in known and dep not in line.outputs and dep not in line.bypassed:
                return False
        return True

    def _bypassable(self, line: _Line, node: Node) -> bool:
        if node.activate is not None:
            ref = parse_reference(node.activate.when)
            if ref is not None and ref.kind == "node" and ref.name in line.bypassed:
                return True
            value = self._resolve(line, node, node.activate.when, "activate.when")
            return bool(value != node.activate.is_value)
        deps = [ref for _, ref in node.references() if ref.kind == "node"]
        return bool(deps) and all(ref.name in line.bypassed for ref in deps)

    def _resolve(self, line: _Line, node: Node | None, value: Any, field_name: str) -> Any:
        """The value of a node input (or condition): a literal, a flow input, or a node output property."""
        ref = parse_reference(value)
        if ref is None:
            return value
        where = f"{field_name} of node '{node.name}'" if node else field_name
        if ref.kind == "input":
            if ref.name not in line.inputs:
                raise FlowRunError(
                    f"{where}: flow input '{ref.name}' has no value", node=node.name if node else None
                )
            return line.inputs[ref.name]
        if ref.serialize() in line.overrides:
            return line.overrides[ref.serialize()]
        if ref.name not in line.outputs:
            raise FlowRunError(f"{where}: node '{ref.name}' has no output", node=node.name if node else None)
        output = line.outputs[ref.name]
        if ref.section != "output":
            raise FlowRunError(
                f"{where}: only '${{{ref.name}.output}}' can be referenced", node=node.name if node else None
            )
        if not ref.property or output is None:
            return output
        try:
            return resolve_property(output, ref.property)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            raise FlowRunError(
                f"{where}: the output of node '{ref.name}' has no property '{ref.property}'",
                node=node.name if node else None,
            ) from None

    def _node_inputs(self, line: _Line, node: Node, func: Callable[..., Any] | None) -> dict[str, Any]:
        """Resolve a node's inputs; an input fed by a bypassed node is dropped when the function has a default."""
        params = python_tool.signature_of(func).parameters if func is not None else {}
        values: dict[str, Any] = {}
        for key, raw in node.inputs.items():
            ref = parse_reference(raw)
            if ref is not None and ref.kind == "node" and ref.name in line.bypassed:
                param = params.get(key)
                if param is not None and param.default is not inspect.Parameter.empty:
                    continue
                values[key] = None
                continue
            values[key] = self._resolve(line, node, raw, f"input '{key}'")
        return values

    async def _run_node(self, line: _Line, node: Node) -> Any:
        """Run one node with its events and span; raises _NodeFailure on error."""
        line.emit(NodeStarted(node=node.name, line_number=line.ctx.line_number))
        started = time.perf_counter()
        ctxmod.set_node(node.name)
        try:
            stream_node = line.stream and self._streamable(node)
            with ctxmod.span(node.name, "node") as node_span:
                result = await self._invoke(line, node, node_span, stream_node)
                if _is_stream(result) and not stream_node:
                    result = await self._join(result)
                node_span.set_output("<stream>" if _is_stream(result) else result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self._error(exc, node.name)
            if not error.node:
                error = dataclasses.replace(error, node=node.name)
            ctxmod.flush_output(line.ctx)
            line.emit(
                NodeFailed(
                    node=node.name,
                    line_number=line.ctx.line_number,
                    error=error,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            )
            raise _NodeFailure(error) from exc
        finally:
            ctxmod.set_node(None)
        if _is_stream(result):
            return self._record_stream(line, node, result, started)
        ctxmod.flush_output(line.ctx)
        line.emit(
            NodeCompleted(
                node=node.name,
                line_number=line.ctx.line_number,
                output=result,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )
        return result

    async def _join(self, stream: Any) -> str:
        parts = [chunk if isinstance(chunk, str) else str(chunk) async for chunk in self._iterate(stream)]
        return "".join(parts)

    def _record_stream(self, line: _Line, node: Node, stream: Any, started: float) -> AsyncIterator[Any]:
        """Wrap a streamed node output so NodeCompleted (with the joined text) is emitted when it ends."""
        iterate = self._iterate

        async def recorder() -> AsyncIterator[Any]:
            parts: list[str] = []
            try:
                async for chunk in iterate(stream):
                    parts.append(chunk if isinstance(chunk, str) else str(chunk))
                    yield chunk
            except Exception as exc:
                error = self._error(exc, node.name)
                line.emit(
                    NodeFailed(
                        node=node.name,
                        line_number=line.ctx.line_number,
                        error=error,
                        duration_ms=(time.perf_counter() - started) * 1000,
                    )
                )
                raise _NodeFailure(error) from exc
            line.emit(
                NodeCompleted(
                    node=node.name,
                    line_number=line.ctx.line_number,
                    output="".join(parts),
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            )

        return recorder()

    async def _invoke(self, line: _Line, node: Node, node_span: ctxmod.SpanHandle, stream: bool) -> Any:
        if node.source.type == "package" or node.type == "custom_llm":
            return await self._run_package_tool(line, node)
        if node.type == "python":
            func = await self._python_tool(node)
            values = self._node_inputs(line, node, func)
            node_span.attributes["inputs"] = values
            literal_keys = frozenset(k for k, v in node.inputs.items() if parse_reference(v) is None)
            kwargs = python_tool.resolve_arguments(
                func,
                values,
                connections=self.connections,
                literal_keys=literal_keys,
                label=f"node '{node.name}'",
            )
            return await self._call(func, kwargs)
        if node.type == "prompt":
            from flowengine.tools.prompt_tool import read_template, run_prompt_node

            values = self._node_inputs(line, node, None)
            rel = node.source.path or ""
            template = self._template_text("prompt", rel, lambda: read_template(self.flow.path, rel))
            return run_prompt_node(
                template=template,
                template_path=rel,
                inputs=values,
                inputs_to_escape=self._inputs_to_escape(node),
            )
        if node.type == "llm" or (node.type == "custom_llm" and node.source.tool == _BUILTIN_LLM_TOOL):
            values = self._node_inputs(line, node, None)
            return await self._run_llm(line, node, values, stream)
        raise FlowRunError(f"node type '{node.type}' is not supported", node=node.name)

    def _inputs_to_escape(self, node: Node) -> list[str]:
        """Inputs fed straight from flow inputs: role-like text in them must not become chat roles."""
        return [
            k
            for k, v in node.inputs.items()
            if (ref := parse_reference(v)) is not None and ref.kind == "input"
        ]

    async def _call(self, func: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        """Call user code: coroutines on the loop, plain functions in the pool with this context."""
        if python_tool.is_async_callable(func):
            result = func(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        context = contextvars.copy_context()
        try:
            place = self._places.get(func)
            if place is None:
                place = self._places[func] = _SyncPlace()
        except TypeError:  # an unhashable callable object: no record is kept, so it stays in the pool
            place = _SyncPlace()
        if place.inline:
            result = place.call_inline(context, func, kwargs)
        else:
            loop = asyncio.get_running_loop()
            call = functools.partial(place.call_timed, context, func, kwargs)
            result = await loop.run_in_executor(self._pool, call)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _python_tool(self, node: Node) -> Callable[..., Any]:
        """Load (once) the tool function of a python node; loading runs module code, so in the pool."""
        cached = self._tools.get(node.name)
        if cached is not None:
            return cached
        rel = node.source.path or ""
        file = self._source_file(rel)

        def load() -> Callable[..., Any]:
            self._prepare_imports()
            with self._load_lock:
                if node.name in self._tools:
                    return self._tools[node.name]
                module = python_tool.load_module_from_file(
                    file, file.parent if not file.is_relative_to(self.flow.path) else self.flow.path
                )
                func = python_tool.find_tool_function(module, rel)
                self._tools[node.name] = func
                return func

        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        try:
            return await loop.run_in_executor(self._pool, context.run, load)
        except python_tool.ToolLoadError as exc:
            raise FlowRunError(f"cannot load '{rel}': {exc}", node=node.name) from None

    def _template_text(self, kind: str, rel: str, read: Callable[[], str]) -> str:
        """A node's template, read once per executor (prompt flow too reads it when the flow loads)."""
        key = (kind, rel)
        text = self._templates.get(key)
        if text is None:
            text = self._templates[key] = read()
        return text

    def _source_file(self, rel: str) -> Path:
        """A node's source file: in the flow folder, or brought by additional_includes."""
        target = (self.flow.path / rel).resolve()
        if target.is_file():
            return target
        first = Path(rel).parts[0] if Path(rel).parts else rel
        for inc in self.flow.additional_includes:
            if Path(inc).name == first:
                candidate = ((self.flow.path / inc).parent / rel).resolve()
                if candidate.is_file():
                    return candidate
        return target

    async def _run_llm(self, line: _Line, node: Node, values: dict[str, Any], stream: bool) -> Any:
        from flowengine.tools.llm_tool import run_llm_node

        if not node.connection or node.connection not in self.connections:
            raise FlowRunError(f"connection '{node.connection}' is not defined", node=node.name)
        rel = node.source.path or ""
        template = self._template_text(
            "llm", rel, lambda: self._source_file(rel).read_text(encoding="utf-8-sig")
        )
        custom = node.type == "custom_llm"
        api = (values.pop("api", None) if custom else None) or node.api or "chat"
        with ctxmod.span(f"{node.name}.{api}", "llm", values) as llm_span:
            result = await run_llm_node(
                connection=self.connections[node.connection],
                api=api,
                template=template,
                template_path=rel,
                inputs=values,
                stream=stream,
                inputs_to_escape=self._inputs_to_escape(node),
                source_tool=node.source.tool if custom else None,
                node=node.name,
            )
            output = result.output
            if not _is_stream(output):
                llm_span.set_output(output, getattr(result, "usage", None))
                return output
            llm_span.set_output("<stream>")
        return self._count_stream_usage(line, output, result)

    def _count_stream_usage(self, line: _Line, stream: Any, result: Any) -> AsyncIterator[Any]:
        """Add a streamed LLM call's token usage to the line once the stream is exhausted."""

        async def counted() -> AsyncIterator[Any]:
            async for chunk in self._iterate(stream):
                yield chunk
            line.ctx.add_usage(getattr(result, "usage", None))

        return counted()

    async def _run_package_tool(self, line: _Line, node: Node) -> Any:
        dotted = node.source.tool or ""
        module_name, _, attr = dotted.rpartition(".")
        try:
            python_tool.ensure_promptflow_importable()
            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            raise FlowRunError(f"package tool '{dotted}' is not installed", node=node.name) from None
        values = self._node_inputs(line, node, func)
        if node.connection:
            values.setdefault("connection", node.connection)
        kwargs = python_tool.resolve_arguments(
            func, values, connections=self.connections, label=f"node '{node.name}'"
        )
        return await self._call(func, kwargs)

    async def _run_single_node(self, line: _Line, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        node = self.flow.node(name)
        if node is None:
            raise FlowRunError(f"the flow has no node '{name}'")
        for dep in node.node_dependencies():
            for key in (f"${{{dep}.output}}", f"{dep}.output", dep):
                if key in line.inputs:
                    line.outputs[dep] = line.inputs[key]
                    break
            else:
                raise FlowRunError(f"give the output of node '{dep}' as input '{dep}.output'", node=name)
        await self._run_dag(line, [node])
        outputs = await self._finish_outputs(line, {"output": line.outputs.get(name)})
        return outputs, {}

    def _extract_outputs(self, line: _Line) -> dict[str, Any]:
        """Flow outputs from node outputs; outputs of aggregation nodes are left out, as in prompt flow."""
        outputs: dict[str, Any] = {}
        for name, spec in self.flow.outputs.items():
            ref = parse_reference(spec.reference)
            if ref is None:
                outputs[name] = spec.reference
                continue
            if ref.kind == "node":
                target = self.flow.node(ref.name)
                if target is not None and target.aggregation:
                    continue
            try:
                outputs[name] = self._resolve(line, None, spec.reference, f"output '{name}'")
            except FlowRunError as exc:
                raise FlowRunError(str(exc)) from None
        return outputs

    def _aggregation_inputs(self, line: _Line) -> dict[str, Any]:
        """Values of this line that aggregation nodes read, keyed like `${grade.output}`."""
        line_nodes = {n.name for n in self.flow.line_nodes}
        found: dict[str, Any] = {}
        for node in self.flow.aggregation_nodes:
            for _, ref in node.references():
                if ref.kind != "node" or ref.name not in line_nodes:
                    continue
                key = ref.serialize()
                if key in found:
                    continue
                found[key] = None if ref.name in line.bypassed else self._resolve(line, node, ref.raw, key)
        return found

    # -- flex and prompty -------------------------------------------------------------------------------------

    async def _flex_callable(self) -> Callable[..., Any]:
        if self._entry is not None:
            return self._entry  # type: ignore[no-any-return]
        if self._entry_lock is None:
            self._entry_lock = asyncio.Lock()
        async with self._entry_lock:
            if self._entry is None:
                loop = asyncio.get_running_loop()
                context = contextvars.copy_context()
                self._entry = await loop.run_in_executor(self._pool, context.run, self._load_entry)
        return self._entry  # type: ignore[no-any-return]

    def _load_entry(self) -> Any:
        self._prepare_imports()
        module_name, _, attr = (self.flow.entry or "").partition(":")
        code_dir = (self.flow.path / self.flow.code).resolve()
        module = python_tool.import_entry_module(module_name, code_dir)
        target = getattr(module, attr, None)
        if target is None:
            raise FlowRunError(f"entry '{self.flow.entry}': '{module_name}' has no '{attr}'")
        if not inspect.isclass(target):
            return target
        init = dict(self.flow.sample.get("init") or {}) if self.flow.sample and not self.init else {}
        init.update(self.init)
        for name, spec in self.flow.init.items():
            if name not in init and spec.has_default:
                init[name] = spec.default
        kwargs = python_tool.resolve_arguments(
            target.__init__, init, connections=self.connections, label=f"init of '{attr}'"
        )
        return target(**kwargs)

    async def _run_flex(self, line: _Line) -> Any:
        entry = await self._flex_callable()
        func = entry if inspect.isfunction(entry) or inspect.ismethod(entry) else entry.__call__
        sig = python_tool.signature_of(func)
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        kwargs = {k: v for k, v in line.inputs.items() if takes_all or k in sig.parameters}
        missing = [
            name
            for name, p in sig.parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and name not in kwargs
            and name != "self"
        ]
        if missing:
            raise FlowRunError(f"no value was given for flow input {', '.join(repr(m) for m in missing)}")
        kwargs = python_tool.resolve_arguments(func, kwargs, connections=self.connections, label="entry")
        with ctxmod.span(self.flow.entry or "entry", "function", kwargs) as entry_span:
            result = await self._call(func, kwargs)
            if not line.stream:
                result = await _join_nested_streams(self, result)
            entry_span.set_output(result if not _is_stream(result) else "<stream>")
        return result

    async def _run_prompty(self, line: _Line) -> dict[str, Any]:
        from flowengine.prompty import run_prompty

        spec = self.flow.prompty
        with ctxmod.span(self.flow.name or "prompty", "llm", line.inputs) as llm_span:
            result = await run_prompty(spec, line.inputs, connections=self.connections, stream=line.stream)
            output = result.output
            if _is_stream(output):
                llm_span.set_output("<stream>")
                output = self._count_stream_usage(line, output, result)
            else:
                llm_span.set_output(output, getattr(result, "usage", None))
        if isinstance(output, Mapping) and any(name != "output" for name in self.flow.outputs):
            return dict(output)
        return {"output": output}

    # -- aggregation ------------------------------------------------------------------------------------------

    def _aggregate_body(self, results: list[LineResult]) -> Callable[[ctxmod.RunContext], Awaitable[None]]:
        async def body(ctx: ctxmod.RunContext) -> None:
            completed = [r for r in results if r.status == "Completed"]
            returned: dict[str, Any] = {}
            with hooks.collect_metrics() as collector:
                try:
                    if self.flow.kind == "dag":
                        await self._aggregate_dag(ctx, completed)
                    elif self.flow.kind == "flex":
                        returned = await self._aggregate_flex(ctx, completed)
                except _NodeFailure:
                    pass  # NodeFailed already carries the error
                except Exception as exc:
                    ctx.sink(ErrorEvent(error=self._error(exc)))
            ctxmod.flush_output(ctx)
            ctx.sink(Metrics(metrics={**collector.as_dict(), **returned}))

        return body

    async def _aggregate_dag(self, ctx: ctxmod.RunContext, completed: list[LineResult]) -> None:
        nodes = self.flow.aggregation_nodes
        if not nodes:
            return
        inputs: dict[str, list[Any]] = {}
        for name, spec in self.flow.inputs.items():
            values = [r.inputs.get(name, spec.default) for r in completed]
            if spec.type:
                values = [
                    _parse_value(spec.type, v, name, r.line_number) if v is not None else v
                    for v, r in zip(values, completed, strict=True)
                ]
            inputs[name] = values
        line = _Line(ctx, inputs, stream=False)
        aggregation_names = {n.name for n in nodes}
        for node in nodes:
            for _, ref in node.references():
                if ref.kind == "node" and ref.name not in aggregation_names:
                    key = ref.serialize()
                    line.overrides[key] = [r.aggregation_inputs.get(key) for r in completed]
        await self._run_dag(line, nodes)

    async def _aggregate_flex(self, ctx: ctxmod.RunContext, completed: list[LineResult]) -> dict[str, Any]:
        """Call `__aggregate__` with the completed lines' outputs; a returned dict is the metrics."""
        entry = await self._flex_callable()
        aggregate_func = getattr(entry, "__aggregate__", None)
        if aggregate_func is None or inspect.isfunction(entry):
            return {}
        params = [p for p in python_tool.signature_of(aggregate_func).parameters if p != "self"]
        values = [r.aggregation_inputs.get("line_result") for r in completed]
        kwargs = {params[0]: values} if params else {}
        ctx.sink(NodeStarted(node="__aggregate__"))
        started = time.perf_counter()
        with ctxmod.span("__aggregate__", "function") as agg_span:
            try:
                result = await self._call(aggregate_func, kwargs)
            except Exception as exc:
                error = self._error(exc, "__aggregate__")
                ctx.sink(
                    NodeFailed(
                        node="__aggregate__", error=error, duration_ms=(time.perf_counter() - started) * 1000
                    )
                )
                raise _NodeFailure(error) from exc
            agg_span.set_output(result)
        ctx.sink(
            NodeCompleted(
                node="__aggregate__", output=result, duration_ms=(time.perf_counter() - started) * 1000
            )
        )
        return {str(k): v for k, v in result.items()} if isinstance(result, Mapping) else {}


async def _join_nested_streams(executor: FlowExecutor, value: Any) -> Any:
    """Join generator values in a flex result (the result itself, dict values or dataclass fields)."""
    if _is_stream(value):
        return await executor._join(value)
    if isinstance(value, dict):
        return {k: (await executor._join(v)) if _is_stream(v) else v for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: await executor._join(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if _is_stream(getattr(value, f.name))
        }
        return dataclasses.replace(value, **changes) if changes else value
    return value


_CONNECTION_REF = re.compile(r"^\$\{([^.{}]+)\.([^{}]+)\}$")


def environment_for(flow: Flow, connections: Mapping[str, Any]) -> dict[str, str]:
    """The flow's environment_variables with `${connection.key}` values resolved from `connections`."""
    resolved: dict[str, str] = {}
    for key, value in flow.environment_variables.items():
        text = str(value)
        match = _CONNECTION_REF.match(text.strip())
        if match and match.group(1) in connections:
            conn = connections[match.group(1)]
            for source in (getattr(conn, "secrets", {}) or {}, getattr(conn, "configs", {}) or {}):
                if match.group(2) in source:
                    text = str(source[match.group(2)])
                    break
        resolved[str(key)] = text
    return resolved


def _flex_outputs(raw: Any) -> dict[str, Any]:
    """A flex entry's return value as flow outputs: dicts and dataclasses by key, anything else as `output`."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        return {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
    return {"output": raw}


__all__ = ["AggregationResult", "FlowExecutor", "FlowRunError", "LineResult", "TraceSpan", "to_jsonable"]
