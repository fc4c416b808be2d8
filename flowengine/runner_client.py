"""`RunnerProcess`: start a runner process, send it lines, and read its events back.

Used by the local CLI, local batch runs and the studio. The child gets a new session (so the whole process
group can be killed), either a scrubbed environment (studio: only PATH, LANG, HOME and TMPDIR pointing at a
private working directory, PYTHONPATH) or the caller's own environment (local CLI, as prompt flow does),
resource limits, a wall-clock timeout per line and overall, and is restarted after it dies or after a line
that ignored its timeout, so the caller carries on with the next line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from flowengine.runner import STREAM_LIMIT, Limits, json_line

EnvMode = Literal["scrubbed", "inherit"]
LogHandler = Callable[[str | None, Any], None]

# Variables a scrubbed child keeps from the parent; everything else (the studio's secrets) stays behind.
SCRUBBED_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
DEFAULT_LIMITS = Limits(memory_mb=4096, cpu_seconds=None, open_files=1024, file_size_mb=1024)
KILL_GRACE_S = 2.0
STDERR_TAIL = 16 * 1024
# Imported by a fresh runner in a background thread while it waits for its flow: the LLM SDK takes longest.
# Only third-party modules: importing engine modules from two threads at once can meet a circular import.
DEFAULT_PRELOAD = ("openai",)
# How many lines callers keep sent to a runner, as a multiple of its concurrency: the extra ones wait in the
# runner, so a slot freed by a finished line is taken at once rather than after a round trip to the caller.
QUEUE_AHEAD = 2

__all__ = ["DEFAULT_LIMITS", "Limits", "RunnerError", "RunnerProcess", "build_env", "run_line_sync"]


def _payloads(msg: Mapping[str, Any]) -> Sequence[dict[str, Any]]:
    """The events of one reply: one, those a held line sent with its end, or none (a done or started mark)."""
    if "events" in msg:
        return msg["events"]
    return (msg["event"],) if "event" in msg else ()


class RunnerError(Exception):
    """The runner could not start or load the flow; `.error` is the ErrorInfo when the runner sent one."""

    def __init__(self, message: str, error: Any = None) -> None:
        super().__init__(message)
        self.error = error


_TIMED_OUT = object()  # put into a line's queue when its time is up


class _Death:
    """Put into a waiting line's queue when the runner process is gone."""

    def __init__(self, info: Any) -> None:
        self.info = info


class _ForkedRunner:
    """A runner forked by the fork server: the protocol runs over a unix socket, the exit status arrives on it."""

    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.stdout = reader
        self.stdin = writer
        self.stderr = None
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    def set_exit(self, code: int) -> None:
        """Record how the runner ended (first report wins)."""
        if self.returncode is None:
            self.returncode = int(code)
        self._exited.set()

    async def wait(self) -> int:
        """Wait until the runner has ended; its return code."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


def _code_fingerprint(python: str) -> str:
    import hashlib

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(f"{python}|{root}|{os.getuid()}".encode())
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            digest.update(f"{path}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def zygote_socket_path(python: str | None = None) -> Path:
    """Where the local fork server of this interpreter and engine code listens (FLOWSTUDIO_RUNNER_SOCKET overrides)."""
    override = os.environ.get("FLOWSTUDIO_RUNNER_SOCKET")
    if override:
        return Path(override)
    # Short and per user: unix socket paths are limited to about 100 bytes.
    folder = Path(tempfile.gettempdir()) / f"flowstudio-{os.getuid()}"
    return folder / f"runner-{_code_fingerprint(python or sys.executable)}.sock"


def start_zygote(path: Path, preload: Sequence[str] = DEFAULT_PRELOAD, *, python: str | None = None) -> None:
    """Start the local fork server in the background; the current caller does not wait for it."""
    import subprocess

    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private_folder(folder):
        return  # someone else's or a shared folder: never serve runners from it
    cmd = [python or sys.executable, "-m", "flowengine.runner", "--zygote", str(path)]
    for module in preload:
        cmd += ["--preload", module]
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _package_root() + (os.pathsep + existing if existing else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd="/",
        start_new_session=True,
    )


def _private_folder(folder: Path) -> bool:
    """Whether `folder` exists, belongs to this user and is closed to everyone else."""
    try:
        info = folder.stat()
    except OSError:
        return True  # not there yet: start_zygote creates it 0700
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def _peer_is_me(writer: asyncio.StreamWriter) -> bool:
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return False
    return struct.unpack("3i", creds)[1] == os.getuid()


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def build_env(
    mode: EnvMode,
    workdir: Path,
    extra: Mapping[str, str] | None = None,
    *,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's environment: the parent's (`inherit`) or an allow-listed minimum (`scrubbed`)."""
    parent = dict(os.environ if source is None else source)
    if mode == "inherit":
        env = dict(parent)
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _package_root() + (os.pathsep + existing if existing else "")
    elif mode == "scrubbed":
        env = {k: parent[k] for k in SCRUBBED_KEEP if k in parent}
        env.setdefault("PATH", os.defpath)
        env.setdefault("LANG", "C.UTF-8")
        env["HOME"] = str(workdir)
        tmp = workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
        env["PYTHONPATH"] = _package_root()
    else:
        raise ValueError(f"env_mode must be 'scrubbed' or 'inherit', not {mode!r}")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    # Keep flow folders and run snapshots as they were: no __pycache__ written into them.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # Fewer malloc arenas keep the address space (what RLIMIT_AS counts) close to real use with many threads.
    env.setdefault("MALLOC_ARENA_MAX", "4")
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


def _connection_dict(conn: Any) -> dict[str, Any]:
    if isinstance(conn, Mapping):
        return dict(conn)
    return conn.to_dict(reveal=True)


class RunnerProcess:
    """One runner child process serving one flow; an async context manager."""

    def __init__(
        self,
        *,
        env_mode: EnvMode = "scrubbed",
        workdir: str | Path | None = None,
        limits: Limits | None = DEFAULT_LIMITS,
        line_timeout: float | None = 600.0,
        total_timeout: float | None = None,
        concurrency: int = 128,
        max_concurrency: int = 16,
        python: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        on_log: LogHandler | None = None,
        kill_grace: float = KILL_GRACE_S,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        use_zygote: bool = False,
    ) -> None:
        self.env_mode = env_mode
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.limits = limits or Limits()
        self.line_timeout = line_timeout
        self.total_timeout = total_timeout
        self.concurrency = concurrency
        self.max_concurrency = max_concurrency
        self.python = python or sys.executable
        self.extra_env = dict(extra_env or {})
        self.on_log = on_log
        self.kill_grace = kill_grace
        self.preload = tuple(preload)
        self.use_zygote = use_zygote
        self.proc: Any = None
        self._init_request: dict[str, Any] | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._abandoned: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None
        self._watchdogs: set[asyncio.Task[None]] = set()
        self._stderr_tail = b""
        self._kill_reason: str | None = None
        self._dead = True
        self._tainted = False
        self._expired = False
        self._closed = False
        self._restart_lock = asyncio.Lock()
        self._deadline: float | None = None
        self.restarts = 0

    async def __aenter__(self) -> RunnerProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(
        self,
        flow_dir: str | Path,
        connections: Mapping[str, Any] | None = None,
        variant: str | None = None,
        init: Mapping[str, Any] | None = None,
        *,
        environment_variables: Mapping[str, str] | None = None,
    ) -> None:
        """Spawn the runner and load the flow; raises RunnerError when the flow cannot be loaded."""
        self._init_request = {
            "op": "init",
            "id": "init",
            "flow_dir": str(Path(flow_dir).resolve()),
            "connections": {name: _connection_dict(c) for name, c in (connections or {}).items()},
            "variant": variant,
            "init": dict(init or {}),
            "environment_variables": dict(environment_variables or {}),
            "concurrency": self.concurrency,
            "max_concurrency": self.max_concurrency,
        }
        if self.total_timeout is not None:
            self._deadline = time.monotonic() + self.total_timeout
            self._watch(self._overall_watchdog())
        await self._spawn_and_init()

    async def spawn(self, *, prepare: bool = False) -> None:
        """Start the runner process ahead of `start`, so its start-up overlaps the caller's preparation.

        With `prepare`, the runner also imports the LLM path and does its one-time set-up while it waits for
        `start`, instead of on its first line: for a runner started well ahead of its work.
        """
        if self.proc is not None and self.proc.returncode is None and not self._dead:
            return
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="flowstudio-runner-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        env = build_env(self.env_mode, self.workdir, self.extra_env)
        cmd = [
            self.python,
            "-m",
            "flowengine.runner",
            "--limits",
            self.limits.to_json(),
            "--concurrency",
            str(self.concurrency),
        ]
        for module in self.preload:
            cmd += ["--preload", module]
        self._kill_reason = None
        self._stderr_tail = b""
        self._tainted = False
        forked = None
        if self.use_zygote and self.env_mode == "inherit":
            forked = await self._fork_from_zygote(env)
        if forked is not None:
            self.proc = forked
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,
                limit=STREAM_LIMIT,
            )
        self._dead = False
        self._reader = asyncio.get_running_loop().create_task(self._read_events(self.proc))
        if self.proc.stderr is not None:
            self._stderr_reader = asyncio.get_running_loop().create_task(self._read_stderr(self.proc))
        if prepare and forked is None:  # a forked runner comes prepared from the fork server
            with contextlib.suppress(ConnectionError, OSError):
                await self._send({"op": "prepare"})

    async def _fork_from_zygote(self, env: Mapping[str, str]) -> _ForkedRunner | None:
        """A runner forked by the local fork server, or None (then starting one for next time)."""
        path = zygote_socket_path()
        if not _private_folder(path.parent):
            return None
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT)
        except OSError:
            start_zygote(path, self.preload, python=self.python)
            return None
        if not _peer_is_me(writer):
            # The environment (the user's secrets) goes only to a fork server of this same user.
            writer.close()
            return None
        header = {
            "env": dict(env),
            "workdir": str(self.workdir),
            "limits": json.loads(self.limits.to_json()),
            "concurrency": self.concurrency,
        }
        try:
            writer.write((json.dumps(header) + "\n").encode("utf-8"))
            await writer.drain()
            reply = json.loads(await asyncio.wait_for(reader.readline(), 5.0))
            return _ForkedRunner(int(reply["pid"]), reader, writer)
        except (OSError, ValueError, KeyError, TypeError, TimeoutError):
            writer.close()
            return None

    async def _spawn_and_init(self) -> None:
        assert self._init_request is not None
        await self.spawn()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues["init"] = queue
        try:
            await self._send(self._init_request)
            error = None
            while True:
                msg = await queue.get()
                if isinstance(msg, _Death):
                    raise RunnerError(f"the runner failed to start: {msg.info.message}", msg.info)
                if msg.get("done"):
                    break
                event = msg.get("event") or {}
                if "error" in event and error is None:
                    error = event["error"]
        finally:
            self._queues.pop("init", None)
        if error is not None:
            from flowengine import events

            info = events.ErrorInfo.from_dict(error)
            await self._kill("the flow could not be loaded")
            raise RunnerError(str(error.get("message")), info)

    async def close(self) -> None:
        """Ask the runner to exit, then kill its whole process group; removes a private workdir."""
        self._closed = True
        for task in list(self._watchdogs):
            task.cancel()
        await self._stop_process()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    async def _stop_process(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._send({"op": "exit"})
                assert proc.stdin is not None
                if isinstance(proc, _ForkedRunner):
                    proc.stdin.write_eof()
                else:
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self.kill_grace)
            except TimeoutError:
                pass
        self._kill_reason = self._kill_reason or "the runner was closed"
        self._killpg(proc)
        with contextlib.suppress(Exception):
            await proc.wait()
        if isinstance(proc, _ForkedRunner):
            proc.stdin.close()
        for task in (self._reader, self._stderr_reader):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)

    def _killpg(self, proc: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _kill(self, reason: str) -> None:
        """Kill the runner's process group; waiting lines get `reason` as their error."""
        proc = self.proc
        if proc is None:
            return
        self._kill_reason = self._kill_reason or reason
        self._killpg(proc)
        with contextlib.suppress(Exception):
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)

    def _watch(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watchdogs.add(task)
        task.add_done_callback(self._watchdogs.discard)

    async def _overall_watchdog(self) -> None:
        assert self._deadline is not None
        await asyncio.sleep(max(0.0, self._deadline - time.monotonic()))
        self._expired = True
        await self._kill(f"the run exceeded its overall timeout of {self.total_timeout:g} seconds")

    async def _ensure_running(self) -> None:
        if self._dead or (self._tainted and not self._busy()):
            async with self._restart_lock:
                if self._closed or self._expired:
                    return
                if self._dead or (self._tainted and not self._busy()):
                    if not self._dead:
                        await self._kill("the runner was recycled after a line ignored its timeout")
                    self.restarts += 1
                    await self._spawn_and_init()

    def _busy(self) -> bool:
        return any(rid not in self._abandoned for rid in self._queues)

    # -- wire -----------------------------------------------------------------------------------

    async def _send(self, message: Mapping[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise ConnectionError("the runner is not running")
        proc.stdin.write(json_line(message, default=str))
        await proc.stdin.drain()

    async def _read_events(self, proc: Any) -> None:
        assert proc.stdout is not None
        try:
            while True:
                try:
                    raw = await proc.stdout.readline()
                except ValueError:
                    continue
                if not raw:
                    break
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if "exit" in msg and isinstance(proc, _ForkedRunner):
                    proc.set_exit(msg["exit"])
                    continue
                self._route(msg)
        finally:
            if isinstance(proc, _ForkedRunner):
                # No exit status means the fork server itself went away.
                proc.set_exit(255)
            with contextlib.suppress(Exception):
                await proc.wait()
            if self.proc is proc:
                self._on_death(proc)

    def _route(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        queue = self._queues.get(rid) if rid is not None else None
        if rid in self._abandoned:
            if msg.get("done"):
                self._abandoned.discard(rid)
                self._queues.pop(rid, None)
            elif (msg.get("event") or {}).get("type") and self.on_log is not None:
                self._maybe_log(rid, msg)
            return
        if queue is None:
            self._maybe_log(rid, msg)
            return
        queue.put_nowait(msg)

    def _maybe_log(self, rid: str | None, msg: Mapping[str, Any]) -> None:
        if self.on_log is None or "event" not in msg:
            return
        from flowengine import events

        try:
            ev = events.from_dict(msg["event"])
        except Exception:
            return
        if isinstance(ev, events.LogLine):
            self.on_log(rid, ev)

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            chunk = await proc.stderr.read(65536)
            if not chunk:
                return
            self._stderr_tail = (self._stderr_tail + chunk)[-STDERR_TAIL:]

    def _on_death(self, proc: Any) -> None:
        self._dead = True
        info = self._death_info(proc.returncode)
        for rid, queue in list(self._queues.items()):
            if rid in self._abandoned:
                self._queues.pop(rid, None)
                self._abandoned.discard(rid)
                continue
            queue.put_nowait(_Death(info))

    def _death_info(self, returncode: int | None) -> Any:
        from flowengine import events

        if isinstance(self.proc, _ForkedRunner) and self.workdir is not None:
            with contextlib.suppress(OSError):
                self._stderr_tail = (self.workdir / "runner-stderr.log").read_bytes()[-STDERR_TAIL:]
        tail = self._stderr_tail.decode("utf-8", "replace").strip()
        mem = self.limits.memory_mb
        if self._kill_reason and (returncode is None or returncode == -signal.SIGKILL):
            message = self._kill_reason
            error_type = "RunnerStopped"
        elif returncode is not None and returncode < 0:
            signum = -returncode
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = f"signal {signum}"
            message = f"runner exited with signal {signum} ({name})"
            if signum == signal.SIGXCPU and self.limits.cpu_seconds:
                message += f": it exceeded the CPU time limit of {self.limits.cpu_seconds} seconds"
            elif (
                signum in (signal.SIGKILL, signal.SIGABRT) and mem and ("MemoryError" in tail or signum == 9)
            ):
                message += f": it was killed, most likely for exceeding the memory limit of {mem} MB"
            elif signum == signal.SIGSEGV:
                message += ": the flow's code crashed the interpreter"
            error_type = "RunnerDied"
        else:
            message = f"runner exited with code {returncode}"
            if mem and "MemoryError" in tail:
                message += f": it exceeded the memory limit of {mem} MB"
            error_type = "RunnerDied"
        if tail and error_type == "RunnerDied":
            message += "\n" + "\n".join(tail.splitlines()[-15:])
        return events.ErrorInfo(
            code="SystemError", type=error_type, message=message, node=None, traceback=None
        )

    # -- lines ----------------------------------------------------------------------------------

    async def run_line(
        self,
        inputs: Mapping[str, Any],
        *,
        line_number: int | None = None,
        stream: bool = False,
        node: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        event_types: Iterable[str] | None = None,
        raw_types: Collection[str] = (),
        hold: bool = False,
    ) -> AsyncIterator[Any]:
        """Run one line; yields its events, the last being a LineCompleted (failed on timeout or death).

        Events of `raw_types` come as the JSON-safe dicts the runner sent (`Event.to_dict()` form), for callers
        that only store them. With `hold`, the runner sends the line's trace spans and its LineCompleted with
        its end, in one reply, instead of one reply each as they come (for callers that only store them).

        `event_types` limits what the runner sends to these event types (LineCompleted always comes). Up to
        QUEUE_AHEAD times the runner's concurrency may be sent at once: the runner starts a waiting line the
        moment one in flight ends, and the line's timeout counts from then.
        """
        from flowengine import events

        started = time.perf_counter()
        rid = request_id or uuid.uuid4().hex
        if self._init_request is None:
            raise RunnerError("start() the runner before running lines")
        try:
            await self._ensure_running()
        except RunnerError as exc:
            yield self._failed(line_number, exc.error or self._info("RunnerDied", str(exc)), started)
            return
        if self._expired or self._dead:
            reason = self._kill_reason or "the runner is not running"
            yield self._failed(line_number, self._info("RunnerStopped", reason), started)
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        request = {
            "op": "line",
            "id": rid,
            "inputs": dict(inputs),
            "line_number": line_number,
            "stream": stream,
            "node": node,
        }
        if event_types is not None:
            request["events"] = sorted(set(event_types))
        if hold:
            request["hold"] = True
        limit = timeout if timeout is not None else self.line_timeout
        # One timer per line puts a marker in its queue (cheaper than a wait_for per message).
        timer = (
            None
            if limit is None
            else asyncio.get_running_loop().call_later(max(0.0, limit), queue.put_nowait, _TIMED_OUT)
        )
        completed = False
        try:
            try:
                await self._send(request)
            except (ConnectionError, OSError):
                pass  # the reader reports the death to this line's queue
            while True:
                msg = await queue.get()
                if msg is _TIMED_OUT:
                    completed = True
                    await self._line_timed_out(rid, line_number)
                    msg_text = f"Line {line_number} execution timeout for exceeding {limit:g} seconds"
                    yield self._failed(
                        line_number, self._info("LineExecutionTimeoutError", msg_text), started
                    )
                    return
                if isinstance(msg, _Death):
                    completed = True
                    yield events.ErrorEvent(error=msg.info)
                    yield self._failed(line_number, msg.info, started)
                    return
                if msg.get("queued") or msg.get("started"):
                    # The line waits in the runner behind the lines in flight: its time starts when it does.
                    if timer is not None:
                        timer.cancel()
                        timer = None
                    if msg.get("started") and limit is not None:
                        timer = asyncio.get_running_loop().call_later(limit, queue.put_nowait, _TIMED_OUT)
                    continue
                for payload in _payloads(msg):
                    if raw_types and payload.get("type") in raw_types:
                        yield payload
                        continue
                    ev = events.from_dict(payload)
                    if isinstance(ev, events.LineCompleted):
                        completed = True
                    yield ev
                if msg.get("done"):
                    if not completed:
                        completed = True
                        info = self._info("RunnerProtocolError", "the runner ended the line without a result")
                        yield self._failed(line_number, info, started)
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if not completed:
                # The caller stopped listening early: stop the line in the runner too.
                self._abandoned.add(rid)
                with contextlib.suppress(Exception):
                    await self._send({"op": "cancel", "id": rid})
            elif rid not in self._abandoned:
                self._queues.pop(rid, None)

    async def run_line_result(self, inputs: Mapping[str, Any], **kw: Any) -> tuple[Any, list[Any]]:
        """Run one line and return (its LineCompleted event, all its events)."""
        collected = [ev async for ev in self.run_line(inputs, **kw)]
        return collected[-1], collected

    async def _line_timed_out(self, rid: str, line_number: int | None) -> None:
        """Cancel a line that ran out of time; kill the runner if it does not let go within the grace."""
        self._abandoned.add(rid)
        with contextlib.suppress(Exception):
            await self._send({"op": "cancel", "id": rid})
        self._watch(self._enforce_cancel(rid, line_number))

    async def _enforce_cancel(self, rid: str, line_number: int | None) -> None:
        proc = self.proc
        await asyncio.sleep(self.kill_grace)
        if self.proc is not proc or proc is None or proc.returncode is not None:
            return
        if rid in self._abandoned:
            # The runner never answered the cancel: its loop is blocked by the line's code.
            await self._kill(f"the runner was stopped because line {line_number} ignored its timeout")
        else:
            # Cancelled, but a thread running sync code may still spin: replace the runner when idle.
            self._tainted = True

    async def cancel(self, request_id: str) -> None:
        """Cancel one running line; its run_line ends with a failed LineCompleted."""
        with contextlib.suppress(Exception):
            await self._send({"op": "cancel", "id": request_id})

    async def aggregate(self, results: Sequence[Any]) -> list[Any]:
        """Run the flow's aggregation over line results (LineCompleted events or their dicts)."""
        from flowengine import events

        await self._ensure_running()
        rid = uuid.uuid4().hex
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        payload = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]
        collected: list[Any] = []
        try:
            await self._send({"op": "aggregate", "id": rid, "results": payload})
            while True:
                msg = await queue.get()
                if isinstance(msg, _Death):
                    collected.append(events.ErrorEvent(error=msg.info))
                    break
                if msg.get("done"):
                    break
                collected.append(events.from_dict(msg["event"]))
        finally:
            self._queues.pop(rid, None)
        return collected

    # -- helpers --------------------------------------------------------------------------------

    def _info(self, error_type: str, message: str, code: str = "SystemError") -> Any:
        from flowengine import events

        if error_type == "LineExecutionTimeoutError":
            code = "UserError"
        return events.ErrorInfo(code=code, type=error_type, message=message, node=None, traceback=None)

    def _failed(self, line_number: int | None, info: Any, started: float) -> Any:
        from flowengine import events

        return events.LineCompleted(
            line_number=line_number,
            outputs={},
            status="Failed",
            error=info,
            aggregation_inputs={},
            duration_ms=(time.perf_counter() - started) * 1000.0,
            usage={},
        )


def run_line_sync(
    flow_dir: str | Path,
    inputs: Mapping[str, Any],
    *,
    connections: Mapping[str, Any] | None = None,
    variant: str | None = None,
    init: Mapping[str, Any] | None = None,
    node: str | None = None,
    env_mode: EnvMode = "inherit",
    **runner_kw: Any,
) -> list[Any]:
    """Run one line in a fresh runner from synchronous code; returns all its events."""

    async def go() -> list[Any]:
        async with RunnerProcess(env_mode=env_mode, **runner_kw) as rp:
            await rp.start(flow_dir, connections, variant, init)
            return [ev async for ev in rp.run_line(inputs, line_number=0, node=node)]

    return asyncio.run(go())


def iter_completed(events_: Iterable[Any]) -> Any:
    """The LineCompleted event among `events_`, or None."""
    from flowengine import events

    return next((ev for ev in events_ if isinstance(ev, events.LineCompleted)), None)
