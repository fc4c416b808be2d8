"""Flows written for prompt flow (promptflow imports, @tool, @trace, log_metric, connections) run unchanged."""

from __future__ import annotations

import asyncio
import json

from flowengine import FlowExecutor, load_flow
from flowengine.connections import Connection
from flowengine.events import TraceSpan

from .conftest import GOLDEN


def test_custom_connection_and_traced_helper_reach_the_tool():
    conn = Connection(
        name="custom_conn", type="custom", configs={"greeting": "Howdy"}, secrets={"token": "s3cret"}
    )
    executor = FlowExecutor(load_flow(GOLDEN / "dag_compat_imports"), connections={"custom_conn": conn})
    try:
        result = asyncio.run(executor.run_line_result({"name": "Ada"}))
    finally:
        executor.close()
    assert result.status == "Completed", result.error
    greeting = result.outputs
    assert greeting["message"] == "Howdy, Ada!"
    assert greeting["token_length"] == 6
    assert greeting["connection_type"] == "CustomConnection"
    assert greeting["traced"] == "ADA"
    assert greeting["by_attribute"] == "Howdy"
    traced = [e for e in result.events if isinstance(e, TraceSpan) and e.name == "shout"]
    node_span = next(e for e in result.events if isinstance(e, TraceSpan) and e.kind == "node")
    assert traced and traced[0].parent_id == node_span.span_id


def test_log_metric_from_promptflow_core_produces_run_metrics():
    lines = [
        json.loads(text)
        for text in (GOLDEN / "dag_aggregation" / "data.jsonl").read_text().splitlines()
        if text
    ]

    async def scenario():
        executor = FlowExecutor(load_flow(GOLDEN / "dag_aggregation"))
        try:
            results = [await executor.run_line_result(line, line_number=i) for i, line in enumerate(lines)]
            return results, await executor.aggregate(results)
        finally:
            executor.close()

    results, outcome = asyncio.run(scenario())
    completed = [r for r in results if r.status == "Completed"]
    assert completed
    assert outcome.status == "Completed", outcome.error
    assert outcome.metrics["lines"] == len(completed)
    assert 0 <= outcome.metrics["accuracy"] <= 1
