"""Aggregation over a run's lines: DAG aggregation nodes with log_metric, and flex __aggregate__."""

from __future__ import annotations

import asyncio

from flowengine import FlowExecutor, load_flow
from flowengine.events import Metrics, NodeFailed

from .test_executor import FLEX

EVAL = {
    "flow.dag.yaml": """
        inputs:
          answer: {type: string}
          truth: {type: string}
          weight: {type: int, default: 1}
        outputs:
          grade: {type: string, reference: "${grade.output}"}
        nodes:
        - name: grade
          type: python
          source: {type: code, path: grade.py}
          inputs: {answer: "${inputs.answer}", truth: "${inputs.truth}"}
        - name: accuracy
          type: python
          source: {type: code, path: accuracy.py}
          inputs: {grades: "${grade.output}", weights: "${inputs.weight}"}
          aggregation: true
        - name: report
          type: python
          source: {type: code, path: report.py}
          inputs: {acc: "${accuracy.output}"}
          aggregation: true
    """,
    "grade.py": """
        def grade(answer: str, truth: str) -> str:
            if answer == "boom":
                raise ValueError("cannot grade")
            return "Correct" if answer == truth else "Incorrect"
    """,
    "accuracy.py": """
        from flowengine.hooks import log_metric

        def accuracy(grades: list, weights: list) -> float:
            value = round(grades.count("Correct") / len(grades), 2)
            log_metric("accuracy", value)
            log_metric("weight_sum", sum(weights))
            return value
    """,
    "report.py": "def report(acc: float) -> str:\n    return f'{acc:.0%}'\n",
}

LINES = [
    {"answer": "a", "truth": "a"},
    {"answer": "b", "truth": "c"},
    {"answer": "boom", "truth": "x"},
    {"answer": "d", "truth": "d", "weight": 3},
]


def run_batch(folder, lines, **kwargs):
    async def scenario():
        executor = FlowExecutor(load_flow(folder), **kwargs)
        try:
            results = [await executor.run_line_result(line, line_number=i) for i, line in enumerate(lines)]
            return results, await executor.aggregate(results)
        finally:
            executor.close()

    return asyncio.run(scenario())


def test_aggregation_nodes_see_lists_of_completed_lines_and_log_metrics(write_flow):
    results, outcome = run_batch(write_flow(EVAL), LINES)
    assert [r.status for r in results] == ["Completed", "Completed", "Failed", "Completed"]
    assert results[0].aggregation_inputs == {"${grade.output}": "Correct"}
    assert outcome.metrics == {"accuracy": 0.67, "weight_sum": 5}
    assert outcome.outputs == {"accuracy": 0.67, "report": "67%"}
    assert isinstance(outcome.events[-1], Metrics)


def test_line_outputs_leave_out_aggregation_nodes(write_flow):
    results, _ = run_batch(write_flow(EVAL), LINES[:1])
    assert results[0].outputs == {"grade": "Correct"}


def test_log_metric_outside_aggregation_is_ignored(write_flow):
    files = dict(EVAL)
    files["grade.py"] = (
        "from flowengine.hooks import log_metric\n\n"
        "def grade(answer: str, truth: str) -> str:\n"
        "    log_metric('per_line', 1)\n"
        "    return 'Correct'\n"
    )
    _, outcome = run_batch(write_flow(files), LINES[:2])
    assert "per_line" not in outcome.metrics


def test_a_failing_aggregation_node_is_reported_and_keeps_earlier_metrics(write_flow):
    files = dict(EVAL)
    files["report.py"] = "def report(acc: float) -> str:\n    raise RuntimeError('no report')\n"
    _, outcome = run_batch(write_flow(files), LINES)
    assert outcome.status == "Failed"
    assert outcome.error.node == "report"
    assert outcome.metrics["accuracy"] == 0.67
    assert any(isinstance(e, NodeFailed) for e in outcome.events)


def test_aggregation_can_be_fed_from_line_result_dicts(write_flow):
    from flowengine import LineResult

    results, _ = run_batch(write_flow(EVAL), LINES[:2])
    rebuilt = [LineResult.from_dict(r.to_dict()) for r in results]

    async def scenario():
        executor = FlowExecutor(load_flow(write_flow(EVAL)))
        try:
            return await executor.aggregate(rebuilt)
        finally:
            executor.close()

    assert asyncio.run(scenario()).metrics == {"accuracy": 0.5, "weight_sum": 2}


def test_flex_aggregate_returns_metrics_over_completed_lines(write_flow):
    lines = [{"answer": "a", "truth": "a"}, {"answer": "a", "truth": "b"}, {"truth": "missing answer"}]
    results, outcome = run_batch(write_flow(FLEX), lines, init={"label": "x"})
    assert [r.status for r in results] == ["Completed", "Completed", "Failed"]
    assert outcome.metrics == {"mean": 0.5}
