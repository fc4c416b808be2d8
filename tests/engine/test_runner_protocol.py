"""The runner process speaks JSON lines: events in order, lines concurrently, user output never on the wire."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

FLOW_YAML = """
inputs:
  text: {type: string}
  delay: {type: double, default: 0}
outputs:
  result: {type: string, reference: "${shout.output}"}
  length: {type: int, reference: "${measure.output}"}
nodes:
- name: shout
  type: python
  source: {type: code, path: shout.py}
  inputs: {text: "${inputs.text}", delay: "${inputs.delay}"}
- name: measure
  type: python
  source: {type: code, path: measure.py}
  inputs: {text: "${shout.output}"}
"""

SHOUT_PY = """
import asyncio
import os
import sys


async def shout(text: str, delay: float = 0) -> str:
    print('{"id": "init", "done": true}')
    print("not json at all", file=sys.stderr)
    os.write(1, b'{"id": "forged", "event": {"type": "metrics"}}\\n')
    os.write(2, b"raw stderr bytes\\n")
    await asyncio.sleep(delay)
    return text.upper()
"""

MEASURE_PY = """
def measure(text: str) -> int:
    return len(text)
"""


def make_flow(tmp_path: Path) -> Path:
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(textwrap.dedent(FLOW_YAML))
    (flow / "shout.py").write_text(textwrap.dedent(SHOUT_PY))
    (flow / "measure.py").write_text(textwrap.dedent(MEASURE_PY))
    return flow


class RawRunner:
    """A runner process driven over its raw protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.raw_lines: list[bytes] = []

    @classmethod
    async def spawn(cls) -> RawRunner:
        """A runner process that has not been sent anything yet."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flowengine.runner",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        return cls(proc)

    @classmethod
    async def start(cls, flow: Path, *, prepare: bool = False) -> RawRunner:
        runner = await cls.spawn()
        if prepare:
            await runner.send({"op": "prepare"})
        await runner.send({"op": "init", "id": "init", "flow_dir": str(flow), "connections": {}})
        replies = await runner.until_done("init")
        assert replies == [], replies
        return runner

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert raw, "runner closed its output"
        self.raw_lines.append(raw)
        return json.loads(raw)

    async def until_done(self, request_id: str) -> list[dict[str, Any]]:
        events = []
        while True:
            msg = await self.read()
            if msg["id"] == request_id and msg.get("done"):
                return events
            if msg["id"] == request_id:
                events.append(msg["event"])

    async def collect(self, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        events: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        open_ids = set(ids)
        while open_ids:
            msg = await self.read()
            if msg.get("done"):
                open_ids.discard(msg["id"])
            elif msg["id"] in events:
                events[msg["id"]].append(msg["event"])
        return events

    async def stop(self) -> int:
        await self.send({"op": "exit"})
        return await asyncio.wait_for(self.proc.wait(), 10)


async def test_line_events_arrive_in_order_and_end_with_line_completed(tmp_path):
    runner = await RawRunner.start(make_flow(tmp_path))
    await runner.send({"op": "line", "id": "a", "inputs": {"text": "hi"}, "line_number": 7})
    events = (await runner.collect({"a"}))["a"]
    kinds = [e["type"] for e in events if e["type"] not in ("log", "trace_span")]
    assert kinds[0] == "node_started"
    assert kinds.index("node_completed") < kinds.index("line_completed")
    assert kinds[-1] == "line_completed"
    order = [e["node"] for e in events if e["type"] == "node_completed"]
    assert order == ["shout", "measure"]
    last = events[-1]
    assert last["status"] == "Completed"
    assert last["outputs"] == {"result": "HI", "length": 2}
    assert last["line_number"] == 7
    assert await runner.stop() == 0


async def test_user_output_becomes_log_events_and_never_corrupts_the_protocol(tmp_path):
    runner = await RawRunner.start(make_flow(tmp_path))
    await runner.send({"op": "line", "id": "a", "inputs": {"text": "hi"}, "line_number": 0})
    events = (await runner.collect({"a"}))["a"]
    assert events[-1]["status"] == "Completed"
    await runner.stop()
    # Every byte the runner wrote on its protocol channel is a well-formed reply; nothing forged got through.
    for raw in runner.raw_lines:
        msg = json.loads(raw)
        assert set(msg) in ({"id", "event"}, {"id", "done"})
        assert msg["id"] != "forged"
    texts = [e["text"] for e in events if e["type"] == "log"]
    assert '{"id": "init", "done": true}' in texts
    assert "not json at all" in texts
    assert "raw stderr bytes" in texts
    assert '{"id": "forged", "event": {"type": "metrics"}}' in texts
    streams = {e["text"]: e["stream"] for e in events if e["type"] == "log"}
    assert streams["not json at all"] == "stderr"
    assert streams["raw stderr bytes"] == "stderr"


async def test_a_held_line_sends_its_spans_and_result_with_its_end_in_one_reply(tmp_path):
    runner = await RawRunner.start(make_flow(tmp_path))
    wanted = ["line_completed", "log", "trace_span"]
    await runner.send({"op": "line", "id": "a", "inputs": {"text": "hi"}, "line_number": 0, "events": wanted})
    (unheld,) = (await runner.collect({"a"})).values()
    first = len(runner.raw_lines)
    await runner.send(
        {"op": "line", "id": "b", "inputs": {"text": "hi"}, "line_number": 0, "events": wanted, "hold": True}
    )
    while not (msg := await runner.read()).get("done"):
        assert msg["event"]["type"] == "log"  # output of user code still comes as it is made
    expected_logs = len([e for e in unheld if e["type"] == "log"])

    def logs_of_b() -> int:
        return sum(1 for raw in runner.raw_lines[first:] if "event" in json.loads(raw))

    # Output written to the file descriptors comes through a reader thread: it may follow the end.
    while logs_of_b() < expected_logs:
        late = await asyncio.wait_for(runner.read(), 10)
        assert late["id"] == "b" and late["event"]["type"] == "log"
    await runner.stop()

    assert set(msg) == {"id", "events", "done"} and msg["id"] == "b"
    held = msg["events"]
    assert [e["type"] for e in held] == ["trace_span"] * (len(held) - 1) + ["line_completed"]
    assert held[-1]["outputs"] == {"result": "HI", "length": 2}
    spans = sorted(e["name"] for e in unheld if e["type"] == "trace_span")
    assert sorted(e["name"] for e in held[:-1]) == spans and len(spans) >= 3
    replies_b = [json.loads(raw) for raw in runner.raw_lines[first:]]
    logs = [m for m in replies_b if m["id"] == "b" and "event" in m]
    assert len(logs) == len([e for e in unheld if e["type"] == "log"])


async def test_lines_run_concurrently_in_one_runner(tmp_path):
    runner = await RawRunner.start(make_flow(tmp_path))
    started = time.monotonic()
    ids = {f"line{i}" for i in range(40)}
    for i in range(40):
        await runner.send(
            {"op": "line", "id": f"line{i}", "inputs": {"text": f"t{i}", "delay": 0.5}, "line_number": i}
        )
    events = await runner.collect(ids)
    elapsed = time.monotonic() - started
    # 40 lines of 0.5 s each finish in about the time of one when they overlap.
    assert elapsed < 3.0
    for i in range(40):
        last = events[f"line{i}"][-1]
        assert last["type"] == "line_completed"
        assert last["outputs"]["result"] == f"T{i}"
        assert last["line_number"] == i
    await runner.stop()


async def test_cancel_stops_one_line_and_leaves_the_others_running(tmp_path):
    runner = await RawRunner.start(make_flow(tmp_path))
    await runner.send({"op": "line", "id": "slow", "inputs": {"text": "s", "delay": 30}, "line_number": 0})
    await runner.send({"op": "line", "id": "fast", "inputs": {"text": "f", "delay": 0.2}, "line_number": 1})
    await asyncio.sleep(0.1)
    await runner.send({"op": "cancel", "id": "slow"})
    events = await runner.collect({"slow", "fast"})
    slow = events["slow"][-1]
    assert slow["type"] == "line_completed"
    assert slow["status"] == "Failed"
    assert slow["error"]["type"] == "LineCanceled"
    assert events["fast"][-1]["outputs"]["result"] == "F"
    await runner.stop()


async def test_a_flow_that_cannot_load_is_reported_on_init(tmp_path):
    flow = tmp_path / "broken"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text("inputs:\n  x: {type: string}\nnodes:\n- name: a\n  type: python\n")
    runner = await RawRunner.spawn()
    await runner.send({"op": "init", "id": "init", "flow_dir": str(flow)})
    events = await runner.until_done("init")
    assert events[0]["type"] == "error"
    assert events[0]["error"]["code"] == "UserError"
    assert "flow.dag.yaml" in events[0]["error"]["message"]
    assert await runner.stop() == 0


LOADED_YAML = """
outputs:
  loaded: {type: list, reference: "${loaded.output}"}
nodes:
- name: loaded
  type: python
  source: {type: code, path: loaded.py}
  inputs: {}
"""

LOADED_PY = """
import sys


def loaded() -> list:
    return [name for name in ("flowengine.llm", "flowengine.tools.llm_tool", "aiohttp") if name in sys.modules]
"""


async def _loaded_modules(tmp_path: Path, *, prepare: bool) -> list[str]:
    flow = tmp_path / ("prepared" if prepare else "plain")
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(textwrap.dedent(LOADED_YAML))
    (flow / "loaded.py").write_text(textwrap.dedent(LOADED_PY))
    runner = await RawRunner.start(flow, prepare=prepare)
    await runner.send({"op": "line", "id": "a", "inputs": {}, "line_number": 0})
    events = (await runner.collect({"a"}))["a"]
    assert await runner.stop() == 0
    return events[-1]["outputs"]["loaded"]


async def test_a_runner_told_to_prepare_loads_the_llm_path_before_its_first_line(tmp_path):
    # A spare runner started ahead of its run gets "prepare": its first line then finds the LLM path loaded.
    assert await _loaded_modules(tmp_path, prepare=False) == []
    assert await _loaded_modules(tmp_path, prepare=True) == [
        "flowengine.llm",
        "flowengine.tools.llm_tool",
        "aiohttp",
    ]


def test_the_runner_widens_its_reply_pipe_to_hold_a_round_of_replies():
    # A hundred lines finishing in one turn, with their traces, outgrow a pipe's default 64 KB: with a wider pipe
    # the runner does not stop mid-round until its caller reads.
    from flowengine.runner import PIPE_SIZE

    read_end, write_end = os.pipe()
    assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) < PIPE_SIZE
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowengine.runner"],
        stdin=subprocess.PIPE,
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    os.close(write_end)
    try:
        proc.communicate(json.dumps({"op": "exit"}).encode() + b"\n", timeout=30)
        assert proc.returncode == 0
        assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) == PIPE_SIZE
    finally:
        os.close(read_end)


GATE_FLOW_YAML = """
inputs:
  role: {type: string}
outputs:
  role: {type: string, reference: "${gate.output}"}
nodes:
- name: gate
  type: python
  source: {type: code, path: gate.py}
  inputs: {role: "${inputs.role}"}
"""

GATE_PY = """
import asyncio

OPEN = None


async def gate(role: str) -> str:
    global OPEN
    OPEN = OPEN or asyncio.Event()
    if role == "wait":
        await OPEN.wait()
    elif role == "open":
        await asyncio.sleep(0.2)
        OPEN.set()
    elif role == "slow":
        await asyncio.sleep(30)
    return role
"""


async def _gate_runner(tmp_path: Path, concurrency: int) -> RawRunner:
    flow = tmp_path / "gate"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(textwrap.dedent(GATE_FLOW_YAML))
    (flow / "gate.py").write_text(textwrap.dedent(GATE_PY))
    runner = await RawRunner.spawn()
    init = {"op": "init", "id": "init", "flow_dir": str(flow), "connections": {}, "concurrency": concurrency}
    await runner.send(init)
    assert await runner.until_done("init") == []
    return runner


async def _line(runner: RawRunner, request_id: str, role: str, number: int) -> None:
    await runner.send({"op": "line", "id": request_id, "inputs": {"role": role}, "line_number": number})


async def _wire_until_done(runner: RawRunner, ids: set[str]) -> list[dict[str, Any]]:
    """Every message until each of `ids` is done, in the order the runner wrote them."""
    messages, open_ids = [], set(ids)
    while open_ids:
        msg = await runner.read()
        messages.append(msg)
        if msg.get("done"):
            open_ids.discard(msg["id"])
    return messages


async def _events(runner: RawRunner, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    events: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for msg in await _wire_until_done(runner, ids):
        if "event" in msg and msg["id"] in events:
            events[msg["id"]].append(msg["event"])
    return events


async def test_a_line_that_ends_starts_the_next_waiting_line_before_other_lines_go_on(tmp_path):
    # "open" wakes "wait" and then ends: the line waiting for a slot starts at once, in the same pass of the
    # runner's loop, before the line it woke goes on. With many lines in flight, answers that arrive together
    # then each send their next line's request in turn, instead of all waiting for every other's steps.
    runner = await _gate_runner(tmp_path, concurrency=2)
    await _line(runner, "wait", "wait", 0)
    await _line(runner, "open", "open", 1)
    await _line(runner, "next", "none", 2)
    wire = await _wire_until_done(runner, {"wait", "open", "next"})
    order = [(m["id"], m.get("event", {}).get("type") or next(k for k in m if k != "id")) for m in wire]
    assert ("next", "queued") in order
    assert order.index(("next", "started")) < order.index(("wait", "line_completed"))
    assert order.index(("open", "line_completed")) < order.index(("next", "started"))
    for msg in wire:
        if msg.get("event", {}).get("type") == "line_completed":
            assert msg["event"]["status"] == "Completed"
            assert msg["event"]["outputs"] == {"role": msg["id"] if msg["id"] != "next" else "none"}
    await runner.stop()


async def test_a_canceled_line_leaves_its_slot_to_the_line_waiting_for_it(tmp_path):
    runner = await _gate_runner(tmp_path, concurrency=1)
    await _line(runner, "slow", "slow", 0)
    await _line(runner, "after", "none", 1)
    await asyncio.sleep(0.2)
    await runner.send({"op": "cancel", "id": "slow"})
    events = await _events(runner, {"slow", "after"})
    assert events["slow"][-1]["status"] == "Failed"
    assert events["slow"][-1]["error"]["type"] == "LineCanceled"
    assert events["after"][-1]["status"] == "Completed"
    assert events["after"][-1]["outputs"] == {"role": "none"}
    await runner.stop()


async def test_a_line_waiting_for_a_slot_can_be_canceled_before_it_starts(tmp_path):
    runner = await _gate_runner(tmp_path, concurrency=1)
    await _line(runner, "slow", "slow", 0)
    await _line(runner, "waiting", "none", 1)
    await runner.send({"op": "cancel", "id": "waiting"})
    started = time.monotonic()
    events = await _events(runner, {"waiting"})
    assert time.monotonic() - started < 5
    assert events["waiting"] == [events["waiting"][-1]]
    assert events["waiting"][-1]["type"] == "line_completed"
    assert events["waiting"][-1]["error"]["type"] == "LineCanceled"
    # The running line is untouched: it is canceled only when asked.
    await runner.send({"op": "cancel", "id": "slow"})
    events = await _events(runner, {"slow"})
    assert events["slow"][-1]["error"]["type"] == "LineCanceled"
    await runner.stop()
