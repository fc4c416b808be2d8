"""Batch runs executed by real Celery workers: chunks, line results written once, aggregation once."""

from __future__ import annotations

import json

import pytest
from django.db.models import Count
from django.urls import reverse

from runs_app import services
from runs_app.models import ChunkStatus, LineResult, Run, RunChunk, RunStatus
from tests.runs_app.conftest import jsonl, square_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]


def _finished(run: Run) -> Run | None:
    run.refresh_from_db()
    return run if run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED) else None


def test_batch_run_computes_every_line_once_and_aggregates(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(300)])
    )
    run_workers.start(concurrency=2)

    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, column_mapping={})

    wait_for(lambda: _finished(run), timeout=90, what="the run to finish", logs=run_workers.logs)
    assert run.status == RunStatus.COMPLETED, (run.error, run_workers.logs())
    lines = LineResult.objects.filter(run=run)
    assert lines.count() == 300
    assert not lines.values("line_number").annotate(n=Count("id")).filter(n__gt=1).exists()
    assert {line.line_number: line.outputs["y"] for line in lines} == {i: i * i for i in range(300)}
    assert run.metrics == {"sum": sum(i * i for i in range(300)), "lines": 300}
    assert run.done_lines == 300 and run.failed_lines == 0
    assert RunChunk.objects.filter(run=run).exclude(status=ChunkStatus.DONE).count() == 0
    # Each line keeps its trace: the flow's span and its node's.
    assert all({"square"} <= {span["name"] for span in line.trace} for line in lines)
    assert run.started_at is not None and run.finished_at >= run.started_at


def test_submit_with_an_evaluation_starts_it_when_the_batch_run_completes(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    evaluator = flow_create(owner=owner, name="square-again", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(20)])
    )
    run_workers.start(concurrency=1)

    (run,) = services.run_submit(
        user=owner,
        flow_version=flow.head,
        dataset=dataset,
        column_mapping={"x": "${data.x}"},
        evaluations=[{"flow_version": evaluator.head, "column_mapping": {"x": "${run.outputs.y}"}}],
    )

    evaluation = wait_for(
        lambda: Run.objects.filter(base_run=run, status=RunStatus.COMPLETED).first(),
        timeout=90,
        what="the evaluation run",
        logs=run_workers.logs,
    )
    assert {line.line_number: line.outputs["y"] for line in LineResult.objects.filter(run=evaluation)} == {
        i: i**4 for i in range(20)
    }
    assert evaluation.metrics == {"sum": sum(i**4 for i in range(20)), "lines": 20}
    run.refresh_from_db()
    assert run.pending_evaluations == []


ECHO_DAG = """\
inputs:
  text: {type: string}
outputs:
  said: {type: string, reference: "${echo.output}"}
nodes:
- name: echo
  type: python
  source: {type: code, path: echo.py}
  inputs: {text: "${inputs.text}"}
"""

ECHO_PY = """\
from promptflow.core import tool


@tool
def echo(text: str) -> str:
    print("got", text)
    return text
"""


def test_values_the_database_cannot_store_are_kept_as_replacement_characters_not_lost(
    owner, run_workers, client
):
    """A lone surrogate cannot be stored as text, nor NUL on PostgreSQL: the run still finishes, every line
    kept, those characters as U+FFFD and a log line naming each line they were in."""
    from django.db import connection

    from flows_app.services import flow_create
    from runs_app.models import RunLog

    flow = flow_create(
        owner=owner, name="echo", files={"flow.dag.yaml": ECHO_DAG.encode(), "echo.py": ECHO_PY.encode()}
    )
    texts = ["a\u0000b", "plain", "x\udc80"]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    dataset = services.dataset_create(owner=owner, name="odd", filename="odd.jsonl", data=data)
    run_workers.start(concurrency=1)

    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, column_mapping={})

    wait_for(lambda: _finished(run), timeout=90, what="the run to finish", logs=run_workers.logs)
    assert run.status == RunStatus.COMPLETED, (run.error, run_workers.logs())
    said = {line.line_number: line.outputs["said"] for line in LineResult.objects.filter(run=run)}
    notes = {log.line_number for log in RunLog.objects.filter(run=run, text__contains="cannot store")}
    printed = sorted(log.text for log in RunLog.objects.filter(run=run, stream="stdout"))
    if connection.vendor == "postgresql":  # its text and jsonb refuse NUL as well
        assert said == {0: "a\ufffdb", 1: "plain", 2: "x\ufffd"}
        assert notes == {0, 2}
        assert not any("\u0000" in text for text in printed)
    else:
        assert said == {0: "a\u0000b", 1: "plain", 2: "x\ufffd"}
        assert notes == {2}
    assert len(printed) == 3 and all(text.startswith("[echo] got") for text in printed), printed
    # The run's pages show what was kept.
    client.force_login(owner)
    for tab in ("outputs", "logs", "trace"):
        response = client.get(reverse(f"runs:{tab}", args=[run.id]))
        assert response.status_code == 200, tab
    assert "plain" in client.get(reverse("runs:outputs", args=[run.id])).content.decode()


TALLY_DAG = (
    ECHO_DAG
    + """\
- name: tally
  type: python
  source: {type: code, path: tally.py}
  inputs: {texts: "${echo.output}"}
  aggregation: true
"""
)

TALLY_PY = """\
from promptflow.core import log_metric, tool


@tool
def tally(texts: list) -> None:
    # Text the database may not store, made here rather than read from the lines (those were stored already).
    odd = chr(0) + chr(0xDC80)
    print("tallied", len(texts), odd)
    log_metric("seen" + odd, len(texts))
    raise ValueError("cannot tally" + odd)
"""


def test_an_aggregation_that_fails_with_text_the_database_cannot_store_still_completes_the_run(
    owner, run_workers
):
    """The aggregation node's metric, printed line and error hold NUL and a lone surrogate: the run completes,
    its error the node's, those characters kept as U+FFFD where the database cannot store them, rather than
    failing to store its end and staying Running."""
    from django.db import connection

    from flows_app.services import flow_create
    from runs_app.models import RunLog

    files = {"flow.dag.yaml": TALLY_DAG.encode(), "echo.py": ECHO_PY.encode(), "tally.py": TALLY_PY.encode()}
    flow = flow_create(owner=owner, name="tally", files=files)
    data = "".join(json.dumps({"text": t}) + "\n" for t in ["one", "two"]).encode()
    dataset = services.dataset_create(owner=owner, name="two", filename="two.jsonl", data=data)
    run_workers.start(concurrency=1)

    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, column_mapping={})

    wait_for(lambda: _finished(run), timeout=90, what="the run to finish", logs=run_workers.logs)
    assert run.status == RunStatus.COMPLETED, (run.error, run_workers.logs())
    kept = ("\ufffd" if connection.vendor == "postgresql" else "\u0000") + "\ufffd"
    assert run.metrics == {"seen" + kept: 2}
    assert run.error is not None and run.error["message"].endswith("cannot tally" + kept), run.error
    assert run.error["node"] == "tally"
    texts = list(RunLog.objects.filter(run=run).values_list("text", flat=True))
    assert "tallied 2 " + kept in texts, texts
    assert "aggregation failed: " + run.error["message"] in texts, texts
    assert run.done_lines == 2 and run.failed_lines == 0
