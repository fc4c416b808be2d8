"""The engine's fast paths give the same results as the full ones: filtered events, lazy imports, lean CLI parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowengine import FlowExecutor, load_flow
from flowengine.connections import Connection
from flowengine.events import LineCompleted, NodeCompleted, TraceSpan
from flowengine.llm import LLMError, RetryPolicy, create

from .conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def connections(fake_llm):
    return {
        "fake_openai": Connection.open_ai("fake_openai", api_key="sk-fake-key-1", base_url=fake_llm.base_url)
    }


async def collect(executor, **kwargs):
    return [ev async for ev in executor.run_line({}, line_number=3, **kwargs)]


async def test_a_line_limited_to_its_result_still_counts_the_tokens_of_its_llm_calls(fake_llm, connections):
    executor = FlowExecutor(load_flow(GOLDEN / "dag_llm_chat"), connections=connections)
    try:
        full = await collect(executor)
        limited = await collect(executor, event_types=["line_completed"])
    finally:
        executor.close()
    assert [type(ev) for ev in limited] == [LineCompleted]
    assert any(isinstance(ev, TraceSpan) for ev in full) and any(isinstance(ev, NodeCompleted) for ev in full)
    assert limited[0].status == "Completed", limited[0].error
    assert limited[0].outputs == full[-1].outputs
    assert limited[0].usage == full[-1].usage
    assert limited[0].usage["total_tokens"] > 0


async def test_a_line_limited_to_some_event_types_gets_exactly_those(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                inputs: {}
                outputs:
                  out: {type: string, reference: "${second.output}"}
                nodes:
                - name: first
                  type: python
                  source: {type: code, path: nodes.py}
                  inputs: {}
                - name: second
                  type: python
                  source: {type: code, path: second.py}
                  inputs: {text: "${first.output}"}
            """,
            "nodes.py": """
                def first() -> str:
                    print("from first")
                    return "a"
            """,
            "second.py": """
                def second(text: str) -> str:
                    return text + "b"
            """,
        }
    )
    executor = FlowExecutor(load_flow(folder))
    try:
        events = await collect(executor, event_types=["node_completed", "log"])
    finally:
        executor.close()
    assert [ev.type for ev in events] == ["log", "node_completed", "node_completed", "line_completed"]
    assert [ev.node for ev in events if isinstance(ev, NodeCompleted)] == ["first", "second"]
    assert events[-1].outputs == {"out": "ab"}


async def test_a_refused_connection_fails_at_once_with_the_reason():
    conn = Connection.open_ai("down", api_key="k", base_url="http://127.0.0.1:9/v1")
    policy = RetryPolicy(max_attempts=5, base_delay=5.0)
    with pytest.raises(LLMError, match="could not connect") as caught:
        await create(
            conn, "chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, policy=policy
        )
    assert caught.value.attempts == 1
    assert not caught.value.retriable


def python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    return done.stdout.strip()


def test_importing_the_package_loads_no_engine_module_until_one_is_used():
    code = (
        "import sys, flowengine\n"
        "print(sorted(m for m in sys.modules if m.startswith('flowengine.')))\n"
        "from flowengine import FlowExecutor, events\n"
        "print(FlowExecutor.__module__, events.__name__)\n"
    )
    before, after = python(code).splitlines()
    assert before == "[]"
    assert after == "flowengine.executor flowengine.events"


def test_parsing_a_plain_command_loads_neither_the_studio_client_nor_serving():
    code = (
        "import sys\n"
        "from flowengine.cli import _parser_parts, build_parser\n"
        "argv = ['flow', 'test', '--flow', 'f', '--inputs', 'q=1']\n"
        "args = build_parser(**_parser_parts(argv)).parse_args(argv)\n"
        "print(args.func.__name__, 'httpx' in sys.modules, 'flowengine.serving' in sys.modules)\n"
    )
    assert python(code) == "cmd_flow_test False False"


def test_help_and_studio_commands_still_see_every_command():
    from flowengine.cli import _parser_parts, build_parser

    assert _parser_parts(["--help"]) == {"serving": True, "server": True}
    assert _parser_parts(["flow", "test", "--help"]) == {"serving": True, "server": True}
    assert _parser_parts(["run", "create", "--flow", "f"]) == {"serving": False, "server": True}
    assert _parser_parts(["flow", "serve", "--flow", "f"])["serving"]
    parser = build_parser(**_parser_parts(["run", "create", "--flow", "f", "--data", "d"]))
    assert parser.parse_args(["run", "create", "--flow", "f", "--data", "d"]).concurrency == 128


INLINE_FLOW = {
    "flow.dag.yaml": """
        inputs:
          delay: {type: double, default: 0}
          nested: {type: bool, default: false}
        outputs:
          thread: {type: string, reference: "${where.output.thread}"}
          nested: {type: string, reference: "${where.output.nested}"}
        nodes:
        - name: where
          type: python
          source: {type: code, path: where.py}
          inputs: {delay: "${inputs.delay}", nested: "${inputs.nested}"}
    """,
    "where.py": """
        import asyncio
        import threading
        import time


        def where(delay: float, nested: bool) -> dict:
            async def inner() -> str:
                await asyncio.sleep(0)
                return "ran its own loop"

            print("called")
            if delay:
                time.sleep(delay)
            return {
                "thread": threading.current_thread().name,
                "nested": asyncio.run(inner()) if nested else "",
            }
    """,
}


async def _threads(executor, inputs_list):
    """The thread each line's sync tool ran in, and the line's log texts."""
    seen = []
    for n, inputs in enumerate(inputs_list):
        events = [ev async for ev in executor.run_line(inputs, line_number=n, event_types=["log"])]
        assert events[-1].status == "Completed", events[-1].error
        seen.append((events[-1].outputs, [ev.text for ev in events if ev.type == "log"]))
    return seen


async def test_a_quick_sync_tool_moves_onto_the_loop_and_behaves_the_same(write_flow):
    from flowengine.executor import INLINE_AFTER_CALLS

    executor = FlowExecutor(load_flow(write_flow(INLINE_FLOW)))
    try:
        seen = await _threads(executor, [{}] * (INLINE_AFTER_CALLS + 4) + [{"nested": True}])
    finally:
        executor.close()
    threads = [outputs["thread"] for outputs, _ in seen]
    assert all(t.startswith("flowengine-node") for t in threads[:INLINE_AFTER_CALLS])
    assert threads[INLINE_AFTER_CALLS:] == ["MainThread"] * 5
    # Output is still captured per line, and code that runs its own event loop still can.
    assert [logs for _, logs in seen] == [["called"]] * len(seen)
    assert seen[-1][0]["nested"] == "ran its own loop"


async def test_a_sync_tool_that_turns_slow_on_the_loop_goes_back_to_the_pool_for_good(write_flow):
    from flowengine.executor import INLINE_AFTER_CALLS, INLINE_DEMOTE_SECONDS

    executor = FlowExecutor(load_flow(write_flow(INLINE_FLOW)))
    slow = {"delay": INLINE_DEMOTE_SECONDS * 4}
    try:
        seen = await _threads(executor, [{}] * INLINE_AFTER_CALLS + [slow] + [{}] * (INLINE_AFTER_CALLS + 2))
    finally:
        executor.close()
    threads = [outputs["thread"] for outputs, _ in seen]
    assert threads[INLINE_AFTER_CALLS] == "MainThread"  # the slow call ran on the loop, once
    assert all(t.startswith("flowengine-node") for t in threads[INLINE_AFTER_CALLS + 1 :])


async def test_a_sync_tool_slower_than_the_bound_stays_in_the_pool(write_flow):
    from flowengine.executor import INLINE_AFTER_CALLS, INLINE_MAX_SECONDS

    executor = FlowExecutor(load_flow(write_flow(INLINE_FLOW)))
    try:
        seen = await _threads(executor, [{"delay": INLINE_MAX_SECONDS * 2}] * (INLINE_AFTER_CALLS + 4))
    finally:
        executor.close()
    assert all(outputs["thread"].startswith("flowengine-node") for outputs, _ in seen)
