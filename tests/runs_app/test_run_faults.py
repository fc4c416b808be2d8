"""Crash safety with real workers: kill -9 during a run, a line that kills its runner, a second host."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from django.db.models import Count

from runs_app import services
from runs_app.models import LineResult, Run, RunChunk, RunStatus
from tests.runs_app.conftest import jsonl, square_files, wait_for

PAUSED = {"x": "${data.x}", "pause": "${data.pause}"}

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]


def _finished(run: Run) -> Run | None:
    run.refresh_from_db()
    return run if run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED) else None


def _outputs(run: Run) -> dict[int, dict]:
    return {n: o for n, o in LineResult.objects.filter(run=run).values_list("line_number", "outputs")}


def _busy_child(workers, margin: int = 32) -> int | None:
    """The pid of a pool process whose running chunk still has at least `margin` lines to go.

    A chunk about to finish could be done by the time the kill lands, and the kill would then cost no attempt.
    """
    pids = {pid for w in workers for pid in w.children()}
    running = RunChunk.objects.filter(status="Running").values_list("worker", "run_id", "start", "stop")
    for worker_name, run_id, start, stop in running:
        pid = int(worker_name.rsplit(":", 1)[1])
        done = LineResult.objects.filter(run_id=run_id, line_number__gte=start, line_number__lt=stop).count()
        if pid in pids and stop - start - done >= margin:
            return pid
    return None


def test_kill_9_of_worker_processes_leaves_exactly_one_result_per_line(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    rows = [{"x": i, "pause": 0.0} for i in range(2000)]
    calm = services.dataset_create(owner=owner, name="calm", filename="calm.jsonl", data=jsonl(rows))
    slow = services.dataset_create(
        owner=owner, name="slow", filename="slow.jsonl", data=jsonl([dict(r, pause=0.04) for r in rows])
    )
    workers = [run_workers.start(concurrency=2), run_workers.start(concurrency=2)]
    undisturbed = services.run_create(user=owner, flow_version=flow.head, dataset=calm, concurrency=16)
    wait_for(lambda: _finished(undisturbed), timeout=120, what="the undisturbed run", logs=run_workers.logs)

    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=slow, concurrency=16, column_mapping=PAUSED
    )
    kills = 0
    while kills < 3:
        pid = wait_for(
            lambda: _busy_child(workers), timeout=60, what="a busy pool process", logs=run_workers.logs
        )
        done_before = LineResult.objects.filter(run=run).count()
        os.kill(pid, signal.SIGKILL)
        kills += 1
        # Let the run make progress before the next kill, so each kill hits a different moment.
        wait_for(
            lambda n=done_before: LineResult.objects.filter(run=run).count() > n + 100,
            timeout=60,
            what="progress after a kill",
            logs=run_workers.logs,
        )
    wait_for(
        lambda: _finished(run), timeout=180, what="the run to finish after 3 kills", logs=run_workers.logs
    )

    assert undisturbed.status == run.status == RunStatus.COMPLETED, run_workers.logs()
    lines = LineResult.objects.filter(run=run)
    assert lines.count() == 2000
    assert not lines.values("line_number").annotate(n=Count("id")).filter(n__gt=1).exists()
    assert _outputs(run) == _outputs(undisturbed)
    assert run.metrics == undisturbed.metrics == {"sum": sum(i * i for i in range(2000)), "lines": 2000}
    assert run.failed_lines == 0
    chunks = RunChunk.objects.filter(run=run)
    # Each chunk ran at least once and each kill cost one more attempt.
    assert sum(chunks.values_list("attempts", flat=True)) >= chunks.count() + 3


def test_a_line_that_kills_its_runner_fails_after_three_deaths_and_the_rest_complete(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    rows = [{"x": i} for i in range(40)]
    rows[7] = {"x": -1}
    rows[9] = {"x": -2}
    dataset = services.dataset_create(owner=owner, name="d", filename="d.jsonl", data=jsonl(rows))
    run_workers.start(concurrency=1)

    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, concurrency=8)

    wait_for(lambda: _finished(run), timeout=120, what="the run", logs=run_workers.logs)
    assert run.status == RunStatus.COMPLETED
    assert run.failed_lines == 2 and run.done_lines == 40
    killer = LineResult.objects.get(run=run, line_number=7)
    assert killer.status == "Failed"
    assert "line 7 stopped its runner 3 times" in killer.error["message"]
    assert "signal 9" in killer.error["message"]
    raised = LineResult.objects.get(run=run, line_number=9)
    assert raised.error["code"] == "UserError" and "negative two" in raised.error["message"]
    others = LineResult.objects.filter(run=run, status="Completed")
    assert {line.line_number: line.outputs["y"] for line in others} == {
        i: i * i for i in range(40) if i not in (7, 9)
    }
    assert run.metrics == {"sum": sum(i * i for i in range(40) if i not in (7, 9)), "lines": 38}


def test_a_worker_on_another_host_with_its_own_data_dir_runs_chunks_of_the_same_run(
    owner, run_workers, tmp_path: Path
):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner,
        name="d",
        filename="d.jsonl",
        data=jsonl([{"x": i, "pause": 0.05} for i in range(400)]),
    )
    here = run_workers.start(concurrency=1)
    elsewhere_cwd = tmp_path / "other-host"
    elsewhere_cwd.mkdir()
    elsewhere = run_workers.start(
        concurrency=1,
        data_dir=tmp_path / "other-host-data",
        cwd=elsewhere_cwd,
        extra_env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    # Both must be consuming before the run is sent: a worker that is ready first takes on queued chunks.
    wait_for(
        lambda: all(b" ready." in worker.log.read_bytes() for worker in (here, elsewhere)),
        timeout=60,
        what="both workers to be ready",
        logs=run_workers.logs,
    )

    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, concurrency=8, column_mapping=PAUSED
    )

    wait_for(lambda: _finished(run), timeout=120, what="the run", logs=run_workers.logs)
    assert run.status == RunStatus.COMPLETED
    assert LineResult.objects.filter(run=run).count() == 400
    hosts = set(RunChunk.objects.filter(run=run).values_list("worker", flat=True))
    assert len(hosts) == 2, hosts
    for worker in (here, elsewhere):
        assert (worker.data_dir / "snapshots" / run.snapshot_id / "flow.dag.yaml").exists()
    assert not (here.data_dir / "snapshots").samefile(elsewhere.data_dir / "snapshots")
