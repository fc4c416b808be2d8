"""Crash safety of the embedded default: every worker dies mid-run and new ones finish the run.

The filesystem broker keeps queued messages in files, so "restarting the broker" there means restarting the
workers: the messages of the chunks they were running die with them, and the new workers' reaper requeues
those chunks once their heartbeats are stale. The reaper timings are shortened so this takes seconds.
"""

from __future__ import annotations

import pytest
from django.db.models import Count

from runs_app import services
from runs_app.models import LineResult, Run, RunChunk, RunLog, RunStatus
from tests.runs_app.conftest import jsonl, square_files, wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

LINES = 400
PAUSED = {"x": "${data.x}", "pause": "${data.pause}"}
# Heartbeats every second, a chunk is a dead worker's after 3 s, and each worker's reaper looks every second.
FAST_REAPER = {
    "STUDIO_RUN_HEARTBEAT_SECONDS": "1",
    "STUDIO_RUN_STALE_SECONDS": "3",
    "STUDIO_RUN_REAPER_SECONDS": "1",
}


def _finished(run: Run) -> Run | None:
    run.refresh_from_db()
    return run if run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED) else None


def test_a_run_survives_all_its_workers_dying_and_new_ones_starting(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    rows = [{"x": i, "pause": 0.03} for i in range(LINES)]
    dataset = services.dataset_create(owner=owner, name="d", filename="d.jsonl", data=jsonl(rows))
    logs = run_workers.logs
    run_workers.start(concurrency=2, extra_env=FAST_REAPER)

    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, concurrency=4, column_mapping=PAUSED
    )
    wait_for(
        lambda: LineResult.objects.filter(run=run).count() >= 40, timeout=60, what="first lines", logs=logs
    )
    run_workers.stop_all()
    chunks = RunChunk.objects.filter(run=run)
    running_at_stop = chunks.filter(status="Running").count()
    queued_at_stop = chunks.filter(status="Queued").count()
    run_workers.start(concurrency=2, extra_env=FAST_REAPER)
    wait_for(lambda: _finished(run), timeout=60, what="the run to finish on new workers", logs=logs)

    assert running_at_stop >= 1 and queued_at_stop >= 1, (running_at_stop, queued_at_stop)
    assert run.status == RunStatus.COMPLETED, (run.error, logs())
    lines = LineResult.objects.filter(run=run)
    assert lines.count() == LINES
    assert not lines.values("line_number").annotate(n=Count("id")).filter(n__gt=1).exists()
    assert dict(lines.values_list("line_number", "outputs")) == {i: {"y": i * i} for i in range(LINES)}
    assert run.metrics == {"sum": sum(i * i for i in range(LINES)), "lines": LINES}
    assert run.done_lines == LINES and run.failed_lines == 0
    assert RunLog.objects.filter(run=run, text__contains="stopped heartbeating; requeued").exists()
