"""RunnerProcess isolates flow code: scrubbed environment, resource limits, timeouts, survival of a dead runner."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path

import pytest

from flowengine import events
from flowengine.runner_client import Limits, RunnerError, RunnerProcess, run_line_sync

FLOW_YAML = """
inputs:
  action: {type: string}
  size_mb: {type: int, default: 0}
outputs:
  result: {type: object, reference: "${act.output}"}
nodes:
- name: act
  type: python
  source: {type: code, path: act.py}
  inputs: {action: "${inputs.action}", size_mb: "${inputs.size_mb}"}
"""

ACT_PY = """
import os
import signal
import time


def act(action: str, size_mb: int = 0):
    if action == "env":
        return dict(os.environ)
    if action == "allocate":
        block = bytearray(size_mb * 1024 * 1024)
        return len(block)
    if action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "segfault":
        import ctypes
        ctypes.string_at(0)
    if action == "spin":
        while True:
            pass
    if action == "sleep":
        time.sleep(60)
    return action
"""

BLOCKING_ASYNC_PY = """
async def act(action: str, size_mb: int = 0):
    if action == "spin":
        while True:
            pass
    return action
"""


def make_flow(tmp_path: Path, code: str = ACT_PY) -> Path:
    flow = tmp_path / "flow"
    flow.mkdir(exist_ok=True)
    (flow / "flow.dag.yaml").write_text(textwrap.dedent(FLOW_YAML))
    (flow / "act.py").write_text(textwrap.dedent(code))
    return flow


async def last_event(rp: RunnerProcess, **inputs):
    collected = [ev async for ev in rp.run_line(inputs, line_number=0)]
    assert isinstance(collected[-1], events.LineCompleted)
    return collected[-1], collected


async def test_scrubbed_environment_hides_the_parents_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_SECRET_KEY", "do-not-leak-1234")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:pw@db/studio")
    workdir = tmp_path / "work"
    async with RunnerProcess(env_mode="scrubbed", workdir=workdir) as rp:
        await rp.start(make_flow(tmp_path))
        done, _ = await last_event(rp, action="env")
    assert done.status == "Completed", done.error
    env = done.outputs["result"]
    assert "STUDIO_SECRET_KEY" not in env
    assert "DATABASE_URL" not in env
    assert "do-not-leak-1234" not in repr(env)
    assert env["HOME"] == str(workdir)
    assert env["TMPDIR"].startswith(str(workdir))
    allowed = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "PYTHONPATH"}
    allowed |= {"PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", "MALLOC_ARENA_MAX"}
    assert set(env) - allowed == set()


async def test_inherit_mode_passes_the_users_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_LOCAL_SETTING", "kept")
    async with RunnerProcess(env_mode="inherit") as rp:
        await rp.start(make_flow(tmp_path))
        done, _ = await last_event(rp, action="env")
    assert done.outputs["result"]["MY_LOCAL_SETTING"] == "kept"
    assert done.outputs["result"]["HOME"] == os.environ["HOME"]


async def test_memory_limit_stops_the_flow_with_a_clear_error_and_the_caller_carries_on(tmp_path):
    async with RunnerProcess(limits=Limits(memory_mb=768)) as rp:
        await rp.start(make_flow(tmp_path))
        done, _ = await last_event(rp, action="allocate", size_mb=2048)
        assert done.status == "Failed"
        assert "memory limit of 768 MB" in done.error.message
        after, _ = await last_event(rp, action="allocate", size_mb=8)
    assert after.status == "Completed"
    assert after.outputs["result"] == 8 * 1024 * 1024


async def test_a_killed_runner_becomes_an_error_event_and_the_next_line_runs(tmp_path):
    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path))
        done, collected = await last_event(rp, action="die")
        assert done.status == "Failed"
        assert "runner exited with signal 9 (SIGKILL)" in done.error.message
        assert any(isinstance(ev, events.ErrorEvent) for ev in collected)
        after, _ = await last_event(rp, action="hello")
        assert after.outputs["result"] == "hello"
        assert rp.restarts == 1


async def test_a_segfault_is_reported_with_its_signal(tmp_path):
    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path))
        done, _ = await last_event(rp, action="segfault")
    assert done.status == "Failed"
    assert "signal 11 (SIGSEGV)" in done.error.message


async def test_an_infinite_loop_in_sync_code_is_stopped_by_the_line_timeout(tmp_path):
    async with RunnerProcess(line_timeout=1.0, kill_grace=0.5) as rp:
        await rp.start(make_flow(tmp_path))
        started = time.monotonic()
        done, _ = await last_event(rp, action="spin")
        assert time.monotonic() - started < 3
        assert done.status == "Failed"
        assert done.error.type == "LineExecutionTimeoutError"
        assert "exceeding 1 seconds" in done.error.message
        await asyncio.sleep(0.8)
        # The spinning thread cannot be stopped in place, so the runner is replaced before the next line.
        after, _ = await last_event(rp, action="ok")
        assert after.outputs["result"] == "ok"
        assert rp.restarts == 1


async def test_an_infinite_loop_blocking_the_event_loop_kills_the_runner(tmp_path):
    async with RunnerProcess(line_timeout=1.0, kill_grace=0.5) as rp:
        await rp.start(make_flow(tmp_path, BLOCKING_ASYNC_PY))
        started = time.monotonic()
        done, _ = await last_event(rp, action="spin")
        assert done.error.type == "LineExecutionTimeoutError"
        await asyncio.sleep(1.0)
        assert rp.proc is not None and rp.proc.returncode is not None
        after, _ = await last_event(rp, action="ok")
        assert after.outputs["result"] == "ok"
        assert time.monotonic() - started < 8


async def test_overall_timeout_fails_the_remaining_lines(tmp_path):
    # The budget covers the runner's start-up too, so it leaves room for a busy machine.
    async with RunnerProcess(total_timeout=5.0, line_timeout=None) as rp:
        await rp.start(make_flow(tmp_path))
        done, _ = await last_event(rp, action="sleep")
        assert done.status == "Failed"
        assert "overall timeout of 5 seconds" in done.error.message
        later, _ = await last_event(rp, action="ok")
        assert later.status == "Failed"


async def test_cancel_ends_a_running_line(tmp_path):
    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path))

        async def run() -> events.LineCompleted:
            done, _ = await last_event(rp, action="sleep")
            return done

        task = asyncio.create_task(run())
        await asyncio.sleep(0.5)
        rid = next(iter(rp._queues))
        await rp.cancel(rid)
        done = await asyncio.wait_for(task, 10)
    assert done.status == "Failed"
    assert done.error.type == "LineCanceled"


async def test_start_raises_a_runner_error_naming_the_flow_file(tmp_path):
    flow = tmp_path / "bad"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text("inputs: [not, a, mapping\n")
    async with RunnerProcess() as rp:
        with pytest.raises(RunnerError) as info:
            await rp.start(flow)
    assert "flow.dag.yaml" in str(info.value)


async def test_closing_kills_the_whole_process_group(tmp_path):
    code = textwrap.dedent(
        """
        import subprocess


        def act(action: str, size_mb: int = 0):
            return subprocess.Popen(["sleep", "60"]).pid
        """
    )
    rp = RunnerProcess()
    await rp.start(make_flow(tmp_path, code))
    done, _ = await last_event(rp, action="spawn")
    child = done.outputs["result"]
    await rp.close()
    await asyncio.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    # A killed child whose parent is gone may linger as a zombie until init reaps it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_sync_helper_runs_one_line(tmp_path):
    collected = run_line_sync(make_flow(tmp_path), {"action": "hi"})
    assert collected[-1].outputs == {"result": "hi"}


async def test_streamed_chunks_reach_the_parent_within_milliseconds(tmp_path):
    flow = tmp_path / "stream"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text(
        "inputs: {}\noutputs:\n  text: {type: string, reference: '${gen.output}'}\n"
        "nodes:\n- name: gen\n  type: python\n  source: {type: code, path: gen.py}\n  inputs: {}\n"
    )
    (flow / "gen.py").write_text(
        "import time\n\ndef gen():\n    for _ in range(30):\n        time.sleep(0.01)\n"
        "        yield f'{time.time():.6f} '\n"
    )
    async with RunnerProcess() as rp:
        await rp.start(flow)
        delays = []
        async for ev in rp.run_line({}, line_number=0, stream=True):
            if isinstance(ev, events.OutputChunk):
                delays.append((time.time() - float(ev.delta)) * 1000.0)
    assert len(delays) == 30
    delays.sort()
    assert delays[len(delays) // 2] < 5.0, delays


NAPPING_PY = """
import asyncio


async def act(action: str, size_mb: int = 0):
    await asyncio.sleep(0.5)
    return action
"""


async def test_a_runner_spawned_ahead_takes_the_lines_in_flight_its_flow_is_started_with(tmp_path):
    async with RunnerProcess(concurrency=1) as rp:
        await rp.spawn()
        rp.concurrency = 4
        await rp.start(make_flow(tmp_path, NAPPING_PY))
        started = time.monotonic()
        done = await asyncio.gather(*(last_event(rp, action=f"a{i}") for i in range(4)))
        took = time.monotonic() - started
    assert [d.status for d, _ in done] == ["Completed"] * 4
    # One at a time would take 2 s.
    assert took < 1.5


async def test_a_line_sent_ahead_gets_its_whole_timeout_from_when_it_starts(tmp_path):
    # One line at a time, 0.5 s each, 0.8 s allowed: the third line waits 1 s behind the first two, then runs.
    async with RunnerProcess(concurrency=1, line_timeout=0.8) as rp:
        await rp.start(make_flow(tmp_path, NAPPING_PY))
        started = time.monotonic()
        done = await asyncio.gather(*(last_event(rp, action=f"a{i}") for i in range(3)))
        took = time.monotonic() - started
    assert [(d.status, d.error) for d, _ in done] == [("Completed", None)] * 3
    assert took >= 1.5


ODD_VALUES_PY = """
def act(action: str, size_mb: int = 0):
    if action == "odd":
        return {"big": 2 ** 70, "text": "naïve ✓", "lone_surrogate": "\\udc80", "nested": [[1.5, None, True]]}
    return action
"""


async def test_values_with_big_integers_and_lone_surrogates_cross_the_protocol_exactly(tmp_path):
    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path, ODD_VALUES_PY))
        completed, _ = await last_event(rp, action="odd")
        # A dataset's JSON can hold "\\udc80": the line's inputs go to the runner with it.
        echoed, _ = await last_event(rp, action="\udc80 read from a dataset")

    result = completed.outputs["result"]
    assert result == {
        "big": 2**70,
        "text": "naïve ✓",
        "lone_surrogate": "\udc80",
        "nested": [[1.5, None, True]],
    }
    assert type(result["big"]) is int
    assert echoed.status == "Completed" and echoed.outputs == {"result": "\udc80 read from a dataset"}


async def test_raw_events_are_the_dicts_their_parsed_form_gives_back(tmp_path):
    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path))
        raw = [ev async for ev in rp.run_line({"action": "ok"}, line_number=0, raw_types=("trace_span",))]
    spans = [ev for ev in raw if isinstance(ev, dict)]
    assert {span["name"] for span in spans} >= {"act"}
    assert all(span["type"] == "trace_span" for span in spans)
    # What a caller stores from the raw dict is what it stored from the parsed event.
    assert [events.from_dict(span).to_dict() for span in spans] == spans
    assert isinstance(raw[-1], events.LineCompleted) and raw[-1].status == "Completed"


async def test_a_held_line_yields_the_events_an_unheld_line_yields(tmp_path):
    def shape(items):
        return [
            (item["type"], item["name"]) if isinstance(item, dict) else (type(item).__name__, item.status)
            for item in items
        ]

    async with RunnerProcess() as rp:
        await rp.start(make_flow(tmp_path))
        kinds = ("line_completed", "trace_span", "log")
        run = [
            rp.run_line(
                {"action": "ok"}, line_number=0, event_types=kinds, raw_types=("trace_span",), hold=hold
            )
            for hold in (False, True)
        ]
        unheld = [ev async for ev in run[0]]
        held = [ev async for ev in run[1]]
    assert sorted(shape(held)) == sorted(shape(unheld))
    assert isinstance(held[-1], events.LineCompleted) and held[-1].outputs == {"result": "ok"}
