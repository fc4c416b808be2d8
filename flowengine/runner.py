"""The runner process: `python -m flowengine.runner` runs one flow's lines for a parent over JSON lines.

Requests arrive one per line on stdin and replies leave one per line on a private copy of the original
stdout, so nothing the flow's code prints can corrupt the protocol:

    {"op": "init", "id": "init", "flow_dir": ..., "connections": {name: Connection dict}, "variant": ...,
     "init": {...}, "environment_variables": {...}, "concurrency": lines in flight, "max_concurrency": threads}
    {"op": "line", "id": "...", "inputs": {...}, "line_number": N, "stream": bool, "node": null}
    {"op": "aggregate", "id": "...", "results": [LineCompleted dicts]}
    {"op": "cancel", "id": "..."}
    {"op": "exit"}

Every reply is `{"id": ..., "event": <Event.to_dict()>}`; the end of a request's events is marked by
`{"id": ..., "done": true}`. A line request with `"hold": true` (a batch line, whose caller stores its events
when it ends) has its trace spans and its LineCompleted held and sent with its end, in one reply:
`{"id": ..., "events": [<Event.to_dict()>, ...], "done": true}`.

Output of user code (print, logging to stderr, C-level writes) becomes `LogLine` events: Python-level
writes are attributed to the line that made them through a context variable; raw fd writes go to the only
running line, or carry `"id": null` when several run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import faulthandler
import fcntl
import gc
import json
import os
import re
import resource
import select
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# (request id, line number) of the line whose code is running in the current context.
_CURRENT: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar(
    "flowengine_runner_current", default=None
)

STREAM_LIMIT = 256 * 1024 * 1024
DEFAULT_CONCURRENCY = 128
GC_THRESHOLD = 20_000
PIPE_SIZE = 1 << 20
# What a line request with "hold" gets with its end rather than as it comes.
HELD_EVENTS = frozenset(("trace_span", "line_completed"))
_ENV_REF = re.compile(r"^\$\{([^.{}]+)\.([^{}]+)\}$")


@dataclass(frozen=True)
class Limits:
    """Resource limits the runner applies to itself before any user code is loaded."""

    memory_mb: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = None
    file_size_mb: int | None = None

    def to_json(self) -> str:
        """The command-line form passed by the parent."""
        return json.dumps(
            {
                "memory_mb": self.memory_mb,
                "cpu_seconds": self.cpu_seconds,
                "open_files": self.open_files,
                "file_size_mb": self.file_size_mb,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Limits:
        """The inverse of `to_json`."""
        data = json.loads(text or "{}")
        return cls(**{k: data.get(k) for k in ("memory_mb", "cpu_seconds", "open_files", "file_size_mb")})


def apply_limits(limits: Limits) -> None:
    """Set soft and hard rlimits so the flow's code cannot raise them again."""
    mb = 1024 * 1024
    wanted = [
        (resource.RLIMIT_AS, limits.memory_mb * mb if limits.memory_mb else None),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb if limits.file_size_mb else None),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in wanted:
        if value is None:
            continue
        _soft, hard = resource.getrlimit(which)
        value = int(value)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        if which == resource.RLIMIT_CPU:
            # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
            resource.setrlimit(which, (value, value + 1 if hard == resource.RLIM_INFINITY else hard))
        else:
            resource.setrlimit(which, (value, value))


class ProtocolWriter:
    """Writes reply lines to the protocol fd; thread-safe.

    Replies sent on the event loop's thread during one turn of the loop go out in one write at the end of that
    turn (with a hundred lines in flight, several finish in the same turn); replies from other threads, or with no
    loop bound, are written at once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._pending: list[bytes] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batch replies sent on `loop`'s thread (the caller's) per turn of the loop."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def send(self, message: Mapping[str, Any]) -> None:
        """Write one JSON line (at the end of this turn of the loop, when sent on the loop's thread)."""
        data = json_line(message, default=_json_default)
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            if not self._pending:
                self._loop.call_soon(self.flush)
            self._pending.append(data)
            return
        self._write(data)

    def flush(self) -> None:
        """Write the replies batched so far."""
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            self._write(data)

    def _write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    # A forked runner's protocol socket shares its (non-blocking) file status with the
                    # request side that asyncio reads: wait until the parent has read some replies.
                    select.select([], [self._fd], [], 1.0)
                    continue
                view = view[written:]


def json_line(message: Any, *, default: Any) -> bytes:
    """One protocol line: UTF-8 JSON, or escaped ASCII when it holds a lone surrogate (a dataset's "\\udc80",
    text decoded with surrogateescape), which has no UTF-8; either reads back the same."""
    try:
        return (json.dumps(message, default=default, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(message, default=default) + "\n").encode("ascii")


def _json_default(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return repr(value)


class LineStream:
    """A text stream standing in for sys.stdout/sys.stderr that turns writes into LogLine events."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, runner: Runner, name: str, fd: int) -> None:
        self._runner = runner
        self.name = name
        self._fd = fd
        self._partial: dict[str | None, str] = {}
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Buffer `text` and emit one LogLine per complete line."""
        if not text:
            return 0
        current = _CURRENT.get()
        key = current[0] if current else None
        with self._lock:
            buffered = self._partial.pop(key, "") + text
            *complete, rest = buffered.split("\n")
            if rest:
                self._partial[key] = rest
        for line in complete:
            self._runner.log(self.name, line, current)
        return len(text)

    def flush_request(self, request_id: str, line_number: int | None) -> None:
        """Emit what a finished line left without a trailing newline."""
        with self._lock:
            rest = self._partial.pop(request_id, "")
        if rest:
            self._runner.log(self.name, rest, (request_id, line_number))

    def writelines(self, lines: Any) -> None:
        """Write each of `lines`."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Nothing to do: complete lines are sent as they are written."""

    def isatty(self) -> bool:
        """Never a terminal."""
        return False

    def fileno(self) -> int:
        """The capture pipe, for code that writes to the descriptor directly."""
        return self._fd

    def readable(self) -> bool:
        """Write-only."""
        return False

    def writable(self) -> bool:
        """Always writable."""
        return True


class Runner:
    """The state of one runner process: the loaded flow, its executor and the running lines."""

    def __init__(self, writer: ProtocolWriter, *, concurrency: int, memory_mb: int | None) -> None:
        self.writer = writer
        self.executor: Any = None
        self.flow: Any = None
        # The task running each line in flight, and the lines sent ahead that wait for one to end.
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.waiting: dict[str, Mapping[str, Any]] = {}
        self.active: dict[str, int | None] = {}
        self.concurrency = max(1, concurrency)
        self._slots: set[asyncio.Task[None]] = set()
        self._canceled: set[str] = set()
        self.memory_mb = memory_mb
        self.streams: list[LineStream] = []
        # The events held back for the lines that asked for them, sent with each line's end.
        self.held: dict[str, list[dict[str, Any]]] = {}

    # -- output ---------------------------------------------------------------------------------

    def send_event(self, request_id: str | None, event: Any) -> None:
        """Send one event tagged with its request id."""
        payload = event.to_dict() if hasattr(event, "to_dict") else event
        held = self.held.get(request_id) if request_id is not None else None
        if held is not None and payload.get("type") in HELD_EVENTS:
            held.append(payload)
            return
        self.writer.send({"id": request_id, "event": payload})

    def done(self, request_id: str) -> None:
        """Mark the end of a request's events, sending those held back with it."""
        held = self.held.pop(request_id, None)
        if held:
            self.writer.send({"id": request_id, "events": held, "done": True})
        else:
            self.writer.send({"id": request_id, "done": True})

    def log(self, stream: str, text: str, current: tuple[str, int | None] | None) -> None:
        """Send a LogLine for output of user code."""
        from flowengine import events

        if current is None and len(self.active) == 1:
            request_id, line_number = next(iter(self.active.items()))
        elif current is None:
            request_id, line_number = None, None
        else:
            request_id, line_number = current
        ev = events.LogLine(stream=stream, text=text, node=None, line_number=line_number)
        self.send_event(request_id, ev)

    def error_info(self, exc: BaseException, *, code: str = "SystemError", node: str | None = None) -> Any:
        """An ErrorInfo for an exception that escaped the executor."""
        from flowengine import events

        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, MemoryError) and self.memory_mb:
            message = f"the flow exceeded the memory limit of {self.memory_mb} MB ({message})"
            code = "UserError"
        return events.ErrorInfo(
            code=code,
            type=type(exc).__name__,
            message=message,
            node=node,
            traceback="".join(traceback.format_exception(exc)),
        )

    def failed_line(self, line_number: int | None, error: Any, started: float) -> Any:
        """A LineCompleted event for a line that could not finish."""
        from flowengine import events

        return events.LineCompleted(
            line_number=line_number,
            outputs={},
            status="Failed",
            error=error,
            aggregation_inputs={},
            duration_ms=(time.perf_counter() - started) * 1000.0,
            usage={},
        )

    # -- requests -------------------------------------------------------------------------------

    async def handle_init(self, request: Mapping[str, Any]) -> None:
        """Load the flow once and build its executor."""
        request_id = str(request.get("id") or "init")
        from flowengine import events

        try:
            if request.get("concurrency"):
                # No line runs before init, so the bound can still change: a runner spawned ahead of its run
                # (a spare) takes the run's own.
                self.concurrency = max(1, int(request["concurrency"]))
            self.executor = self._build_executor(request)
            # What is loaded by now (engine, LLM SDK, flow) lives as long as the runner: keep it out of the
            # collector's full passes, which otherwise stall every line in flight for a few hundred ms.
            gc.freeze()
        except Exception as exc:
            from flowengine.model import FlowValidationError

            code = (
                "UserError" if isinstance(exc, FlowValidationError | ValueError | KeyError) else "SystemError"
            )
            info = self.error_info(exc, code=code)
            if isinstance(exc, FlowValidationError):
                info = events.ErrorInfo(
                    code="UserError", type="FlowValidationError", message=str(exc), node=None, traceback=None
                )
            self.send_event(request_id, events.ErrorEvent(error=info))
        self.done(request_id)

    def _build_executor(self, request: Mapping[str, Any]) -> Any:
        from flowengine import FlowExecutor, load_flow
        from flowengine.connections import Connection, set_current_connections

        _install_compat()
        connections = {
            name: Connection.from_dict(dict(data, name=data.get("name") or name))
            for name, data in (request.get("connections") or {}).items()
        }
        set_current_connections(connections)
        flow_dir = os.path.abspath(str(request["flow_dir"]))
        self.flow = load_flow(flow_dir)
        # Flow code opens files relative to its folder, as under prompt flow.
        os.chdir(self.flow.path)
        if str(self.flow.path) not in sys.path:
            sys.path.insert(0, str(self.flow.path))
        env = dict(self.flow.environment_variables or {})
        env.update(request.get("environment_variables") or {})
        for key, value in env.items():
            os.environ[str(key)] = _resolve_env_value(value, connections)
        return FlowExecutor(
            self.flow,
            connections=connections,
            variant=request.get("variant") or None,
            init=request.get("init") or None,
            max_concurrency=int(request.get("max_concurrency") or 16),
        )

    def start_line(self, request: Mapping[str, Any]) -> None:
        """Run one line in a free slot, or keep it until a line in flight ends."""
        if len(self._slots) >= self.concurrency:
            request_id = str(request["id"])
            self.waiting[request_id] = request
            # Sent ahead, it waits for a line in flight to end: the caller's timeout starts when it does.
            self.writer.send({"id": request_id, "queued": True})
            return
        slot = asyncio.get_running_loop().create_task(self._slot(request))
        self._slots.add(slot)
        slot.add_done_callback(self._slots.discard)

    async def _slot(self, request: Mapping[str, Any] | None) -> None:
        # A slot runs its lines one after another in one task: a line that ends starts the next waiting one in
        # the same pass of the event loop, up to its first wait (its LLM call), before other lines' next steps.
        while request is not None:
            await self._run_line(request)
            request = None
            if self.waiting:
                request_id = next(iter(self.waiting))
                request = self.waiting.pop(request_id)
                self.writer.send({"id": request_id, "started": True})

    async def _run_line(self, request: Mapping[str, Any]) -> None:
        from flowengine import events

        request_id = str(request["id"])
        line_number = request.get("line_number")
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        self.tasks[request_id] = task
        _CURRENT.set((request_id, line_number))
        finished = False
        wanted = set(request.get("events") or ())
        if request.get("hold"):
            self.held[request_id] = []

        def emit(ev: Any) -> None:
            # Only events of `wanted` come here: the executor drops the others where they are made.
            nonlocal finished
            if finished:
                return  # a sync tool's late event, after the line's end
            if isinstance(ev, events.LineCompleted):
                self._flush_logs(request_id, line_number)
                ev = self._explain_memory_error(ev)
                finished = True
            self.send_event(request_id, ev)

        try:
            self.active[request_id] = line_number
            if self.executor is None:
                raise RuntimeError("the runner has no flow loaded: send an init request first")
            await self.executor.run_line_into(
                emit,
                dict(request.get("inputs") or {}),
                line_number=line_number,
                node=request.get("node"),
                stream=bool(request.get("stream")),
                event_types=wanted or None,
            )
            if not finished:
                raise RuntimeError("the executor ended the line without a LineCompleted event")
        except asyncio.CancelledError:
            if not finished:
                self._send_canceled(request_id, line_number, started)
            if request_id not in self._canceled:
                raise
            # This line was canceled, not its slot: the slot goes on with the next line.
            task.uncancel()
        except BaseException as exc:
            if not finished:
                self._flush_logs(request_id, line_number)
                self.send_event(request_id, self.failed_line(line_number, self.error_info(exc), started))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._canceled.discard(request_id)
            self.tasks.pop(request_id, None)
            self.active.pop(request_id, None)
            self.done(request_id)

    def _send_canceled(self, request_id: str, line_number: int | None, started: float) -> None:
        from flowengine import events

        self._flush_logs(request_id, line_number)
        info = events.ErrorInfo(
            code="UserError",
            type="LineCanceled",
            message=f"line {line_number} was canceled",
            node=None,
            traceback=None,
        )
        self.send_event(request_id, self.failed_line(line_number, info, started))

    def _flush_logs(self, request_id: str, line_number: int | None) -> None:
        for stream in self.streams:
            stream.flush_request(request_id, line_number)

    def _explain_memory_error(self, ev: Any) -> Any:
        error = getattr(ev, "error", None)
        if error is None or getattr(error, "type", "") != "MemoryError" or not self.memory_mb:
            return ev
        import dataclasses

        where = f" in node '{error.node}'" if getattr(error, "node", None) else ""
        message = f"the flow exceeded the memory limit of {self.memory_mb} MB{where} (MemoryError)"
        return dataclasses.replace(ev, error=dataclasses.replace(error, message=message, code="UserError"))

    async def handle_aggregate(self, request: Mapping[str, Any]) -> None:
        """Run the flow's aggregation over the given line results and send its events."""
        from flowengine import events

        request_id = str(request["id"])
        _CURRENT.set((request_id, None))
        self.active[request_id] = None
        try:
            results = [_line_result_from_dict(d) for d in request.get("results") or []]
            outcome = await self.executor.aggregate(results)
            self._flush_logs(request_id, None)
            sent_metrics = False
            for ev in getattr(outcome, "events", None) or []:
                sent_metrics = sent_metrics or isinstance(ev, events.Metrics)
                self.send_event(request_id, ev)
            if not sent_metrics:
                self.send_event(
                    request_id, events.Metrics(metrics=dict(getattr(outcome, "metrics", {}) or {}))
                )
        except Exception as exc:
            self._flush_logs(request_id, None)
            self.send_event(request_id, events.ErrorEvent(error=self.error_info(exc, code="UserError")))
        finally:
            self.active.pop(request_id, None)
            self.done(request_id)

    def cancel(self, request_id: str) -> None:
        """Cancel one line, running or waiting."""
        request = self.waiting.pop(request_id, None)
        if request is not None:
            self._send_canceled(request_id, request.get("line_number"), time.perf_counter())
            self.done(request_id)
            return
        task = self.tasks.get(request_id)
        if task is not None:
            self._canceled.add(request_id)
            task.cancel()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Read requests until `exit` or end of input."""
        background: set[asyncio.Task[None]] = set()
        while True:
            raw = await reader.readline()
            if not raw:
                break
            try:
                request = json.loads(raw)
            except ValueError:
                continue
            op = request.get("op")
            if op == "init":
                await self.handle_init(request)
            elif op == "line":
                self.start_line(request)
            elif op == "aggregate":
                task = asyncio.get_running_loop().create_task(self.handle_aggregate(request))
                background.add(task)
                task.add_done_callback(background.discard)
            elif op == "cancel":
                self.cancel(str(request.get("id")))
            elif op == "prepare":
                # A runner started ahead of its work: do now what its first line would otherwise wait for.
                # Engine modules import each other, so they are imported here, on the loop's thread.
                _prepare_engine()
            elif op == "exit":
                break
        for request_id in list(self.waiting):
            self.cancel(request_id)
        for task in list(self._slots) + list(background):
            task.cancel()
        pending = list(self._slots) + list(background)
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self.executor is not None:
            try:
                self.executor.close()
            except Exception:
                pass
        llm = sys.modules.get("flowengine.llm")
        if llm is not None:
            # Close the LLM clients' connection pools on their own loop, before it goes away.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(llm.close_clients(), 5)
        self.writer.flush()


def _install_compat() -> None:
    """Make `import promptflow` work for user code written for prompt flow."""
    import importlib

    try:
        compat = importlib.import_module("flowengine.compat")
    except ModuleNotFoundError as exc:
        if exc.name != "flowengine.compat":
            raise
        return
    compat.install()


def _line_result_from_dict(data: Mapping[str, Any]) -> Any:
    """A LineResult for the executor's aggregate from the LineCompleted dict the parent kept."""
    from flowengine.executor import LineResult

    return LineResult.from_dict(dict(data))


def _resolve_env_value(value: Any, connections: Mapping[str, Any]) -> str:
    """Resolve `${connection.key}` in a flow's environment_variables as prompt flow does."""
    text = str(value)
    match = _ENV_REF.match(text.strip())
    if not match or match.group(1) not in connections:
        return text
    conn = connections[match.group(1)]
    key = match.group(2)
    for source in (getattr(conn, "secrets", {}) or {}, getattr(conn, "configs", {}) or {}):
        if key in source:
            return str(source[key])
    return text


def _capture_fd(fd: int, name: str, runner_ref: list[Runner]) -> int:
    """Point `fd` at a pipe read by a thread that turns raw writes into LogLine events."""
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if runner_ref:
                        runner_ref[0].log(name, line.decode("utf-8", "replace"), None)

    threading.Thread(target=pump, name=f"runner-{name}", daemon=True).start()
    return fd


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m flowengine.runner`."""
    parser = argparse.ArgumentParser(prog="python -m flowengine.runner")
    parser.add_argument("--limits", default="{}", help="JSON resource limits")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--preload", action="append", default=[], help="module to import in the background")
    parser.add_argument("--zygote", metavar="SOCKET", help="serve as a fork server on this unix socket")
    parser.add_argument(
        "--idle-timeout", type=float, default=600.0, help="fork server: exit after idle seconds"
    )
    args = parser.parse_args(argv)
    if args.zygote:
        return zygote_main(args.zygote, args.preload, args.idle_timeout)
    limits = Limits.from_json(args.limits)
    apply_limits(limits)
    if args.preload:
        threading.Thread(target=_preload, args=(args.preload,), name="runner-preload", daemon=True).start()
    return serve_stdio(limits, args.concurrency)


def serve_stdio(limits: Limits, concurrency: int) -> int:
    """Serve the protocol on fd 0 (requests) and fd 1 (replies) until exit."""
    # The protocol keeps a private copy of the original stdout; fd 1 and 2 then belong to user code.
    protocol_fd = os.dup(1)
    with contextlib.suppress(OSError, AttributeError):
        # One turn's replies (a hundred lines finishing, with their traces) outgrow a pipe's default 64 KB: the
        # runner would wait mid-round for its caller to read. Linux lets a pipe grow to pipe-max-size.
        fcntl.fcntl(protocol_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    crash_fd = os.dup(2)
    faulthandler.enable(file=os.fdopen(crash_fd, "w", closefd=False), all_threads=True)
    runner_ref: list[Runner] = []
    _capture_fd(1, "stdout", runner_ref)
    _capture_fd(2, "stderr", runner_ref)
    writer = ProtocolWriter(protocol_fd)
    # Lines in flight allocate fast; collecting the youngest generation every 700 objects costs more
    # than the few cycles it finds (and with it come the costly older-generation passes).
    gc.set_threshold(GC_THRESHOLD, 10, 10)

    async def amain() -> None:
        runner = Runner(writer, concurrency=concurrency, memory_mb=limits.memory_mb)
        runner_ref.append(runner)
        out = LineStream(runner, "stdout", 1)
        err = LineStream(runner, "stderr", 2)
        runner.streams = [out, err]
        sys.stdout = out  # type: ignore[assignment]
        sys.stderr = err  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        writer.bind(loop)
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))
        # Import the engine while the parent prepares the init request.
        import flowengine.executor  # noqa: F401

        await runner.serve(reader)

    try:
        asyncio.run(amain())
    finally:
        _restore_streams()
    return 0


def zygote_main(socket_path: str, preload: list[str], idle_timeout: float) -> int:
    """A fork server for the local CLI: imports the engine once, then forks a ready runner per connection.

    Each connection sends one JSON header line (env, workdir, limits, concurrency); the zygote forks, the
    child serves the runner protocol on the connection itself, and when the child exits the zygote adds
    `{"id": null, "exit": <returncode>}` so the client learns how it ended. Only the same user may connect
    (the socket is 0600 in a 0700 folder, and the peer's uid is checked).
    """
    import selectors
    import signal
    import socket
    import struct

    import flowengine.executor  # noqa: F401

    # Single-threaded here, so engine modules are safe to import too.
    _preload(list(preload))
    _prepare_engine()
    folder = os.path.dirname(socket_path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(socket_path)
    finally:
        os.umask(old_umask)
    server.listen(64)
    server.setblocking(False)
    inode = os.stat(socket_path).st_ino
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, _exit_on_term)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    children: dict[int, socket.socket] = {}
    last_activity = time.monotonic()
    try:
        while True:
            for key, _ in selector.select(timeout=5.0):
                if key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    _reap(children)
                    last_activity = time.monotonic()
                    continue
                try:
                    conn, _ = server.accept()
                except BlockingIOError:
                    continue
                last_activity = time.monotonic()
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                if uid != os.getuid():
                    conn.close()
                    continue
                header = _read_header(conn)
                if header is None:
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _zygote_child(conn, server, selector, header)
                children[pid] = conn
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            _reap(children)
            try:
                moved = os.stat(socket_path).st_ino != inode
            except FileNotFoundError:
                moved = True
            idle = not children and time.monotonic() - last_activity > idle_timeout
            if moved or idle:
                break
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(socket_path).st_ino == inode:
                os.unlink(socket_path)
    return 0


def _exit_on_term(*_: Any) -> None:
    raise SystemExit(0)


def _read_header(conn: Any) -> dict[str, Any] | None:
    conn.settimeout(5.0)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < 4 * 1024 * 1024:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        header = json.loads(data)
    except (OSError, ValueError):
        return None
    conn.settimeout(None)
    return header if isinstance(header, dict) else None


def _reap(children: dict[int, Any]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps({"id": None, "exit": code}) + "\n").encode())
        conn.close()


def _zygote_child(conn: Any, server: Any, selector: Any, header: Mapping[str, Any]) -> None:
    """In the forked child: become a runner serving the protocol on `conn`; never returns."""
    import signal

    code = 1
    try:
        selector.close()
        server.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        workdir = str(header.get("workdir") or "/")
        stderr_path = os.path.join(workdir, "runner-stderr.log")
        err_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(conn.fileno(), 0)
        os.dup2(conn.fileno(), 1)
        os.dup2(err_fd, 2)
        os.close(err_fd)
        conn.close()
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in (header.get("env") or {}).items()})
        # The fork server computed sys.path at its own start; honour the caller's PYTHONPATH of today.
        for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        os.chdir(workdir)
        limits = Limits.from_json(json.dumps(header.get("limits") or {}))
        apply_limits(limits)
        code = serve_stdio(limits, int(header.get("concurrency") or DEFAULT_CONCURRENCY))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _preload(modules: list[str]) -> None:
    """Import modules the flow will probably need while the parent is still preparing the init request."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # the flow reports a real import problem when it needs the module
            pass


def _prepare_engine() -> None:
    """Import the LLM path and do the one-time set-up that each runner would otherwise repeat on its first line:
    the Jinja sandbox's lexer and the LLM SDK's lazily loaded parts."""
    _preload(["flowengine.llm", "flowengine.tools.llm_tool"])
    with contextlib.suppress(Exception):
        from flowengine.templates import render_template

        render_template("{{ warm_up }}", {"warm_up": ""})
    with contextlib.suppress(Exception):
        from flowengine import llm

        llm.warm_up()


def _restore_streams() -> None:
    sys.stdout = sys.__stdout__  # type: ignore[assignment]
    sys.stderr = sys.__stderr__  # type: ignore[assignment]


if __name__ == "__main__":
    code = main()
    # Threads of user code that never return (a timed-out sync tool) must not keep the process alive.
    os._exit(code)
