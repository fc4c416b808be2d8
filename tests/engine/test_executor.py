"""Running lines of DAG and flex flows: outputs, events, concurrency, bypass, errors, streaming."""

from __future__ import annotations

import asyncio
import time

import pytest

from flowengine import FlowExecutor, FlowValidationError, LineResult, load_flow
from flowengine.events import (
    LineCompleted,
    LogLine,
    NodeBypassed,
    NodeCompleted,
    NodeFailed,
    NodeStarted,
    OutputChunk,
    StreamStarted,
    TraceSpan,
)


def run(folder, inputs=None, **kwargs) -> LineResult:
    init = kwargs.pop("init", None)
    variant = kwargs.pop("variant", None)
    executor = FlowExecutor(load_flow(folder), init=init, variant=variant)
    try:
        return asyncio.run(executor.run_line_result(inputs or {}, **kwargs))
    finally:
        executor.close()


def kinds(result: LineResult, cls) -> list:
    return [e for e in result.events if isinstance(e, cls)]


PIPELINE = {
    "flow.dag.yaml": """
        inputs:
          text: {type: string, default: "a b c"}
          times: {type: int, default: 2}
        outputs:
          shout: {type: string, reference: "${upper.output}"}
          words: {type: int, reference: "${stats.output.counts.words}"}
          echo: {type: string, reference: "${inputs.text}"}
          fixed: {type: string, reference: constant}
        nodes:
        - name: upper
          type: python
          source: {type: code, path: upper.py}
          inputs: {text: "${inputs.text}", times: "${inputs.times}", sep: "-"}
        - name: stats
          type: python
          source: {type: code, path: stats.py}
          inputs: {text: "${upper.output}"}
    """,
    "upper.py": """
        def upper(text: str, times: int, sep: str) -> str:
            print("upper saw", text)
            return sep.join([text.upper()] * times)
    """,
    "stats.py": """
        async def stats(text: str) -> dict:
            return {"counts": {"words": len(text.split())}}
    """,
}


def test_dag_line_resolves_references_literals_and_defaults(write_flow):
    result = run(write_flow(PIPELINE))
    assert result.status == "Completed", result.error
    assert result.outputs == {"shout": "A B C-A B C", "words": 5, "echo": "a b c", "fixed": "constant"}
    assert result.inputs == {"text": "a b c", "times": 2}


def test_events_come_in_order_and_end_with_line_completed(write_flow):
    result = run(write_flow(PIPELINE), line_number=7)
    names = [
        (type(e).__name__, getattr(e, "node", None)) for e in result.events if not isinstance(e, TraceSpan)
    ]
    assert names.index(("NodeStarted", "upper")) < names.index(("NodeCompleted", "upper"))
    assert names.index(("NodeCompleted", "upper")) < names.index(("NodeStarted", "stats"))
    assert isinstance(result.events[-1], LineCompleted)
    assert all(getattr(e, "line_number", 7) == 7 for e in result.events)


def test_printed_text_becomes_log_lines_of_its_node(write_flow):
    result = run(write_flow(PIPELINE))
    (log,) = kinds(result, LogLine)
    assert (log.node, log.stream, log.text) == ("upper", "stdout", "upper saw a b c")


def test_spans_nest_nodes_under_the_flow(write_flow):
    result = run(write_flow(PIPELINE))
    spans = kinds(result, TraceSpan)
    flow_span = next(s for s in spans if s.kind == "flow")
    node_spans = [s for s in spans if s.kind == "node"]
    assert {s.name for s in node_spans} == {"upper", "stats"}
    assert all(s.parent_id == flow_span.span_id for s in node_spans)


def test_independent_sync_nodes_run_concurrently(write_flow):
    sleeper = "import time\n\ndef nap(s: float) -> float:\n    time.sleep(s)\n    return s\n"
    folder = write_flow(
        {
            "flow.dag.yaml": """
                outputs:
                  a: {type: double, reference: "${a.output}"}
                  b: {type: double, reference: "${b.output}"}
                  c: {type: double, reference: "${c.output}"}
                nodes:
                - {name: a, type: python, source: {type: code, path: nap.py}, inputs: {s: 0.4}}
                - {name: b, type: python, source: {type: code, path: nap.py}, inputs: {s: 0.4}}
                - {name: c, type: python, source: {type: code, path: nap.py}, inputs: {s: 0.4}}
            """,
            "nap.py": sleeper,
        }
    )
    executor = FlowExecutor(load_flow(folder))
    asyncio.run(executor.run_line_result({}))  # load the module once
    started = time.perf_counter()
    result = asyncio.run(executor.run_line_result({}))
    elapsed = time.perf_counter() - started
    executor.close()
    assert result.outputs == {"a": 0.4, "b": 0.4, "c": 0.4}
    assert elapsed < 1.0


ACTIVATE = {
    "flow.dag.yaml": """
        inputs:
          kind: {type: string}
        outputs:
          math: {type: string, reference: "${math.output}"}
          after_math: {type: string, reference: "${after_math.output}"}
          merged: {type: string, reference: "${merge.output}"}
        nodes:
        - name: math
          type: python
          source: {type: code, path: echo.py}
          inputs: {value: math-ran}
          activate: {when: "${inputs.kind}", is: math}
        - name: text
          type: python
          source: {type: code, path: echo.py}
          inputs: {value: text-ran}
          activate: {when: "${inputs.kind}", is: text}
        - name: after_math
          type: python
          source: {type: code, path: echo.py}
          inputs: {value: "${math.output}"}
        - name: merge
          type: python
          source: {type: code, path: merge.py}
          inputs: {a: "${math.output}", b: "${text.output}"}
    """,
    "echo.py": "def echo(value):\n    return value\n",
    "merge.py": "def merge(a, b='default-b'):\n    return f'{a}|{b}'\n",
}


def test_activate_bypasses_nodes_and_their_only_dependants(write_flow):
    result = run(write_flow(ACTIVATE), {"kind": "math"})
    assert [e.node for e in kinds(result, NodeBypassed)] == ["text"]
    assert result.outputs == {"math": "math-ran", "after_math": "math-ran", "merged": "math-ran|default-b"}


def test_bypass_propagates_and_bypassed_outputs_are_none(write_flow):
    result = run(write_flow(ACTIVATE), {"kind": "other"})
    assert sorted(e.node for e in kinds(result, NodeBypassed)) == ["after_math", "math", "merge", "text"]
    assert result.outputs == {"math": None, "after_math": None, "merged": None}


FAILING = {
    "flow.dag.yaml": """
        inputs:
          n: {type: int}
        outputs:
          out: {type: double, reference: "${divide.output}"}
        nodes:
        - name: divide
          type: python
          source: {type: code, path: divide.py}
          inputs: {n: "${inputs.n}"}
    """,
    "divide.py": "def divide(n: int) -> float:\n    return 10 / n\n",
}


def test_a_failing_node_fails_the_line_with_the_users_traceback(write_flow):
    result = run(write_flow(FAILING), {"n": 0})
    assert result.status == "Failed" and result.outputs == {}
    (failed,) = kinds(result, NodeFailed)
    assert failed.node == "divide"
    assert result.error.code == "UserError"
    assert result.error.type == "ZeroDivisionError"
    assert "node 'divide' failed: ZeroDivisionError" in result.error.message
    assert "divide.py" in result.error.traceback and "executor.py" not in result.error.traceback


def test_inputs_are_converted_to_their_declared_types(write_flow):
    assert run(write_flow(FAILING), {"n": "5"}).outputs == {"out": 2.0}
    bad = run(write_flow(FAILING), {"n": "five"}, line_number=3)
    assert bad.status == "Failed"
    assert "flow input 'n' in line 3" in bad.error.message and "'int'" in bad.error.message


def test_a_missing_input_without_default_is_a_user_error(write_flow):
    result = run(write_flow(FAILING), {})
    assert result.status == "Failed" and result.error.code == "UserError"
    assert "'n'" in result.error.message


def test_running_a_single_node_takes_its_dependencies_outputs_as_inputs(write_flow):
    result = run(write_flow(PIPELINE), {"upper.output": "x y"}, node="stats")
    assert result.outputs == {"output": {"counts": {"words": 2}}}


STREAMING = {
    "flow.dag.yaml": """
        inputs:
          word: {type: string, default: abc}
        outputs:
          letters: {type: string, reference: "${spell.output}"}
          length: {type: int, reference: "${length.output}"}
        nodes:
        - name: spell
          type: python
          source: {type: code, path: spell.py}
          inputs: {word: "${inputs.word}"}
        - name: length
          type: python
          source: {type: code, path: length.py}
          inputs: {word: "${inputs.word}"}
    """,
    "spell.py": "def spell(word: str):\n    for ch in word:\n        yield ch + ' '\n",
    "length.py": "def length(word: str) -> int:\n    return len(word)\n",
}


def test_streamed_outputs_arrive_as_chunks_after_the_other_outputs(write_flow):
    result = run(write_flow(STREAMING), stream=True)
    started = kinds(result, StreamStarted)
    assert started[0].outputs == {"length": 3} and started[0].streams == ["letters"]
    chunks = kinds(result, OutputChunk)
    assert [c.delta for c in chunks] == ["a ", "b ", "c "]
    assert result.events.index(started[0]) < result.events.index(chunks[0])
    assert result.outputs == {"letters": "a b c ", "length": 3}
    spell_done = next(e for e in kinds(result, NodeCompleted) if e.node == "spell")
    assert spell_done.output == "a b c "


def test_without_streaming_generators_are_joined(write_flow):
    result = run(write_flow(STREAMING))
    assert not kinds(result, OutputChunk)
    assert result.outputs == {"letters": "a b c ", "length": 3}


def test_closing_the_event_stream_cancels_the_line(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                outputs:
                  out: {type: string, reference: "${slow.output}"}
                nodes:
                - {name: slow, type: python, source: {type: code, path: slow.py}, inputs: {}}
            """,
            "slow.py": "import asyncio\n\nasync def slow():\n    await asyncio.sleep(30)\n    return 'late'\n",
        }
    )

    async def scenario() -> list:
        executor = FlowExecutor(load_flow(folder))
        seen = []
        stream = executor.run_line({})
        async for event in stream:
            seen.append(event)
            if isinstance(event, NodeStarted):
                break
        await stream.aclose()
        executor.close()
        return seen

    started = time.perf_counter()
    seen = asyncio.run(scenario())
    assert isinstance(seen[-1], NodeStarted)
    assert time.perf_counter() - started < 5


def test_an_invalid_flow_is_refused_before_running(write_flow):
    folder = write_flow({"flow.dag.yaml": "outputs:\n  x: {type: string, reference: '${nope.output}'}\n"})
    with pytest.raises(FlowValidationError, match="nope"):
        FlowExecutor(load_flow(folder))


FLEX = {
    "flow.flex.yaml": """
        entry: grader:Grader
        init:
          threshold: {type: double, default: 0.5}
        inputs:
          answer: {type: string}
          truth: {type: string}
    """,
    "grader.py": """
        class Grader:
            def __init__(self, label: str, threshold: float = 0.5):
                self.label = label
                self.threshold = threshold

            def __call__(self, answer: str, truth: str) -> dict:
                score = 1.0 if answer == truth else 0.0
                return {"score": score, "passed": score >= self.threshold, "label": self.label}

            def __aggregate__(self, line_results: list) -> dict:
                return {"mean": sum(r["score"] for r in line_results) / len(line_results)}
    """,
}


def test_flex_class_entry_is_initialised_once_and_called_per_line(write_flow):
    result = run(write_flow(FLEX), {"answer": "a", "truth": "a"}, init={"label": "t"})
    assert result.outputs == {"score": 1.0, "passed": True, "label": "t"}


def test_flex_function_returning_a_value_outputs_it_as_output(write_flow):
    folder = write_flow(
        {
            "flow.flex.yaml": "entry: app:shout\n",
            "app.py": "def shout(text: str) -> str:\n    return text.upper()\n",
        }
    )
    assert run(folder, {"text": "hi"}).outputs == {"output": "HI"}


def test_flex_generator_streams_when_asked(write_flow):
    folder = write_flow(
        {
            "flow.flex.yaml": "entry: app:count\n",
            "app.py": "async def count(n: int = 3):\n    for i in range(n):\n        yield str(i)\n",
        }
    )
    result = run(folder, stream=True)
    assert [c.delta for c in kinds(result, OutputChunk)] == ["0", "1", "2"]
    assert result.outputs == {"output": "012"}


def test_variants_change_which_body_runs(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                outputs:
                  out: {type: string, reference: "${greet.output}"}
                nodes:
                - name: greet
                  use_variants: true
                node_variants:
                  greet:
                    default_variant_id: formal
                    variants:
                      formal:
                        node: {type: python, source: {type: code, path: echo.py}, inputs: {value: Good day}}
                      casual:
                        node: {type: python, source: {type: code, path: echo.py}, inputs: {value: Hey}}
            """,
            "echo.py": "def echo(value):\n    return value\n",
        }
    )
    assert run(folder).outputs == {"out": "Good day"}
    assert run(folder, variant="${greet.casual}").outputs == {"out": "Hey"}


def test_line_result_round_trips_through_its_dict(write_flow):
    result = run(write_flow(PIPELINE), line_number=2)
    again = LineResult.from_dict(result.to_dict())
    assert (again.outputs, again.status, again.line_number, again.inputs) == (
        result.outputs,
        result.status,
        2,
        result.inputs,
    )
