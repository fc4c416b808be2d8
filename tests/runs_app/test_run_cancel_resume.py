"""Cancel, resume and rerun with real workers."""

from __future__ import annotations

import time

import pytest

from runs_app import services
from runs_app.models import ChunkStatus, LineResult, Run, RunChunk, RunStatus
from tests.runs_app.conftest import chat_flow_on, jsonl, square_files, wait_for

PAUSED = {"x": "${data.x}", "pause": "${data.pause}"}

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]


def _status(run: Run, *wanted: str) -> Run | None:
    run.refresh_from_db()
    return run if run.status in wanted else None


def test_cancel_stops_running_chunks_within_seconds_and_queued_ones_never_start(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="d", filename="d.jsonl", data=jsonl([{"x": i, "pause": 0.5} for i in range(1000)])
    )
    run_workers.start(concurrency=1)
    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, concurrency=4, column_mapping=PAUSED
    )
    wait_for(
        lambda: LineResult.objects.filter(run=run).count() >= 8,
        timeout=60,
        what="the first lines",
        logs=run_workers.logs,
    )

    asked = time.monotonic()
    services.run_cancel(user=owner, run=run)
    wait_for(lambda: _status(run, RunStatus.CANCELED), timeout=15, what="Canceled", logs=run_workers.logs)

    assert time.monotonic() - asked < 10
    chunks = RunChunk.objects.filter(run=run)
    assert chunks.filter(status=ChunkStatus.RUNNING).count() == 0
    assert chunks.filter(status=ChunkStatus.DONE).count() == 0
    never_started = chunks.filter(attempts=0)
    assert never_started.count() == chunks.count() - 1
    assert set(never_started.values_list("status", flat=True)) == {ChunkStatus.CANCELED}
    done_at_cancel = LineResult.objects.filter(run=run).count()
    time.sleep(1.5)
    assert LineResult.objects.filter(run=run).count() == done_at_cancel
    assert run.finished_at is not None and run.done_lines == done_at_cancel


def test_resume_reuses_completed_lines_and_runs_only_failed_or_missing_ones(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    rows = [{"x": i, "pause": 0.2} for i in range(120)]
    failing = {5, 53, 101}  # one in each chunk, whichever the worker takes first
    for n in failing:
        rows[n] = {"x": -2, "pause": 0.0}
    dataset = services.dataset_create(owner=owner, name="d", filename="d.jsonl", data=jsonl(rows))
    run_workers.start(concurrency=1)
    first = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, concurrency=8, column_mapping=PAUSED
    )
    wait_for(
        lambda: LineResult.objects.filter(run=first).count() >= 20,
        timeout=60,
        what="some lines",
        logs=run_workers.logs,
    )
    services.run_cancel(user=owner, run=first)
    wait_for(lambda: _status(first, RunStatus.CANCELED), timeout=15, what="Canceled", logs=run_workers.logs)
    before = {line.line_number: line for line in LineResult.objects.filter(run=first)}
    completed_before = {n for n, line in before.items() if line.status == "Completed"}
    assert {n for n, line in before.items() if line.status == "Failed"} & failing
    assert len(before) < 120

    resumed = services.run_resume(user=owner, run=first)
    wait_for(
        lambda: _status(resumed, RunStatus.COMPLETED),
        timeout=90,
        what="the resumed run",
        logs=run_workers.logs,
    )

    assert resumed.resumed_from_id == first.pk
    lines = {line.line_number: line for line in LineResult.objects.filter(run=resumed)}
    assert sorted(lines) == list(range(120))
    # Completed lines were copied, not recomputed: the same measured duration as in the first run.
    for number in completed_before:
        assert lines[number].duration_ms == before[number].duration_ms
        assert lines[number].outputs == before[number].outputs
    assert {n for n, line in lines.items() if line.status == "Failed"} == failing
    texts = list(resumed.logs.values_list("text", flat=True))
    assert sum(int(t.split(": ")[1].split(" lines to run")[0]) for t in texts if "lines to run" in t) == (
        120 - len(completed_before)
    )
    assert resumed.failed_lines == 3 and resumed.done_lines == 120
    assert resumed.metrics == {"sum": sum(i * i for i in range(120) if i not in failing), "lines": 117}


def test_rerun_of_selected_lines_computes_only_those(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="d", filename="d.jsonl", data=jsonl([{"x": i} for i in range(50)])
    )
    run_workers.start(concurrency=1)
    first = services.run_create(user=owner, flow_version=flow.head, dataset=dataset)
    wait_for(
        lambda: _status(first, RunStatus.COMPLETED), timeout=60, what="the first run", logs=run_workers.logs
    )
    again = services.run_rerun_lines(user=owner, run=first, line_numbers=[3, 4])
    wait_for(lambda: _status(again, RunStatus.COMPLETED), timeout=60, what="the rerun", logs=run_workers.logs)

    lines = {line.line_number: line for line in LineResult.objects.filter(run=again)}
    assert sorted(lines) == list(range(50))
    texts = list(again.logs.values_list("text", flat=True))
    assert any("2 lines to run, 48 already done" in text for text in texts), texts
    assert again.resumed_from_id == first.pk
    assert again.metrics == first.metrics


def _line_tokens(run: Run) -> dict[str, int]:
    total: dict[str, int] = {}
    for usage in LineResult.objects.filter(run=run).values_list("usage", flat=True):
        for key, value in (usage or {}).items():
            total[key] = total.get(key, 0) + value
    return total


def test_a_rerun_counts_the_tokens_of_the_lines_it_copies(owner, run_workers, fake_llm):
    # A run's token total sums its chunks': a chunk copied whole from the first run brings its lines' tokens.
    flow = chat_flow_on(owner, fake_llm)
    questions = [{"question": f"question {i}?"} for i in range(200)]
    dataset = services.dataset_create(owner=owner, name="q", filename="q.jsonl", data=jsonl(questions))
    run_workers.start(concurrency=2)
    first = services.run_create(
        user=owner,
        flow_version=flow.head,
        dataset=dataset,
        column_mapping={"question": "${data.question}"},
        concurrency=16,
    )
    wait_for(
        lambda: _status(first, RunStatus.COMPLETED), timeout=60, what="the first run", logs=run_workers.logs
    )
    again = services.run_rerun_lines(user=owner, run=first, line_numbers=[3])
    wait_for(lambda: _status(again, RunStatus.COMPLETED), timeout=60, what="the rerun", logs=run_workers.logs)

    assert first.tokens["total_tokens"] > 0 and first.tokens == _line_tokens(first)
    copied = RunChunk.objects.filter(run=again, attempts=0, status=ChunkStatus.DONE)
    assert copied.exists() and all(chunk.tokens for chunk in copied)
    assert again.tokens == _line_tokens(again) == first.tokens
