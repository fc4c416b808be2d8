"""How a run is cut into chunks, and the spare runner a worker process keeps for the next run's first chunk."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from runs_app import services
from runs_app.models import LineResult, Run, RunChunk, RunStatus
from tests.runs_app.conftest import jsonl, square_files, wait_for


def _rounds(chunks: int, processes: int) -> int:
    return -(-chunks // processes)


def test_a_2000_line_run_at_32_in_flight_splits_evenly_over_two_and_four_pool_processes():
    size = services._chunk_size(2000, 32)
    chunks = -(-2000 // size)

    # 21 chunks of 96 took 11 rounds on 2 processes but 6 on 4: the second worker's share went to one chunk
    # running alone at the end. Whole rounds on both means the second worker halves the time.
    assert size % 32 == 0 and size // 32 >= 3
    assert _rounds(chunks, 2) == 2 * _rounds(chunks, 4)
    assert chunks % 4 == 0


@pytest.mark.parametrize("total", [1, 10, 200, 1000, 2000, 5000, 20000, 100000])
@pytest.mark.parametrize("concurrency", [1, 4, 32, 64, 128])
def test_chunks_are_whole_waves_of_at_least_three_and_at_most_2000_lines(total, concurrency):
    size = services._chunk_size(total, concurrency)

    assert size <= 2000
    if concurrency * 3 <= 2000:
        assert size % concurrency == 0 and size // concurrency >= 3


def test_run_create_stores_the_chunk_size_and_chunks_that_cover_every_line_once(db, owner):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(2000)])
    )

    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, column_mapping={})

    chunks = list(RunChunk.objects.filter(run=run).order_by("index"))
    sizes = [c.stop - c.start for c in chunks]
    assert chunks[0].start == 0 and chunks[-1].stop == 2000
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    assert len(chunks) == -(-2000 // services._chunk_size(2000, run.concurrency))
    assert run.chunk_size == max(sizes) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("total", "concurrency"), [(2000, 64), (2000, 32), (1000, 64), (200, 64), (20000, 32)]
)
def test_pool_processes_taking_turns_at_a_runs_chunks_get_equal_shares_of_its_lines(
    db, owner, total, concurrency
):
    # 2,000 lines at 64 in flight were 7 chunks of 256 and one of 208: the process that took chunks 0, 2,
    # 4 and 6 ran 1,024 lines, 48 more than the other, and the run waited on it.
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(total)])
    )

    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, column_mapping={}, concurrency=concurrency
    )

    sizes = [c.stop - c.start for c in RunChunk.objects.filter(run=run).order_by("index")]
    assert sum(sizes) == total and max(sizes) <= services._chunk_size(total, concurrency)
    assert max(sizes) - min(sizes) <= 1
    for processes in (2, 4):
        if len(sizes) % processes == 0:
            shares = [sum(sizes[i::processes]) for i in range(processes)]
            assert max(shares) - min(shares) <= len(sizes) // processes, shares


def _runners_of(pids: list[int]) -> list[int]:
    """Runner processes whose parent is one of `pids`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if parent in pids and b"flowengine.runner" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.integration
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_an_idle_worker_process_keeps_a_spare_runner_that_the_next_run_starts_on(owner, run_workers):
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    dataset = services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(20)])
    )
    worker = run_workers.start(concurrency=1)
    wait_for(lambda: worker.children(), timeout=60, what="the pool process", logs=run_workers.logs)
    pool = worker.children()

    spare = wait_for(
        lambda: _runners_of(pool),
        timeout=30,
        what="a spare runner in the idle pool process",
        logs=run_workers.logs,
    )
    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, column_mapping={})

    def finished() -> Run | None:
        run.refresh_from_db()
        return run if run.status == RunStatus.COMPLETED else None

    wait_for(finished, timeout=60, what="the run to complete", logs=run_workers.logs)
    assert LineResult.objects.filter(run=run).count() == 20
    # The one pool process ran the run on its spare (closed with the run) and keeps a new spare for the next.
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{pid}") for pid in spare),
        timeout=30,
        what="the run's runner, the former spare, to be closed",
        logs=run_workers.logs,
    )
    wait_for(lambda: _runners_of(pool), timeout=30, what="a new spare runner", logs=run_workers.logs)


def _paused_square_run(owner: object) -> Run:
    from flows_app.services import flow_create

    flow = flow_create(owner=owner, name="square", files=square_files())
    rows = [{"x": i, "pause": 0.1} for i in range(150)]
    dataset = services.dataset_create(owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl(rows))
    return services.run_create(
        user=owner,
        flow_version=flow.head,
        dataset=dataset,
        column_mapping={"pause": "${data.pause}"},
        concurrency=2,
    )


def _assert_chunks_taken_on(run: Run, run_workers: object) -> list[RunChunk]:
    """The run completes on one pool process, each chunk claimed before the one claimed before it finished."""

    def finished() -> Run | None:
        run.refresh_from_db()
        return run if run.status == RunStatus.COMPLETED else None

    wait_for(finished, timeout=90, what="the run to complete", logs=run_workers.logs)
    # In the order they were claimed: a run's messages may come in any order (sent again by the reaper or
    # after a broker restart), and the execution takes on the lowest chunk left.
    chunks = list(RunChunk.objects.filter(run=run).order_by("claimed_at"))
    assert len(chunks) >= 3
    # One pool process: without taking chunks on, each chunk would start after the one before it ended.
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.claimed_at < before.finished_at, (before.index, after.index)
    # Each chunk ran once: the messages of the chunks taken on found them running and left them.
    assert [c.attempts for c in chunks] == [1] * len(chunks)
    assert sorted(LineResult.objects.filter(run=run).values_list("line_number", flat=True)) == list(
        range(150)
    )
    assert run.metrics == {"sum": sum(i * i for i in range(150)), "lines": 150}
    return chunks


@pytest.mark.integration
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_pool_process_takes_on_the_runs_next_chunk_while_its_last_lines_finish(owner, run_workers):
    run_workers.start(concurrency=1)
    run = _paused_square_run(owner)

    _assert_chunks_taken_on(run, run_workers)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_an_execution_started_by_a_later_chunks_message_takes_on_the_earlier_chunks(owner, run_workers):
    from runs_app.tasks import run_chunk_task
    from studio.celery import app

    run = _paused_square_run(owner)
    # No worker yet: the run's messages wait in the broker. Send them again, the last chunk's first.
    app.control.purge()
    ids = list(RunChunk.objects.filter(run=run).order_by("index").values_list("pk", flat=True))
    assert len(ids) == 3
    for chunk_id in [ids[-1], *ids[:-1]]:
        run_chunk_task.delay(chunk_id)
    run_workers.start(concurrency=1)

    chunks = _assert_chunks_taken_on(run, run_workers)

    assert [c.index for c in chunks] == [2, 0, 1]
