"""Celery tasks of the runs app: each takes an id and calls a service.

Workers run the reaper themselves (a daemon thread started when the worker is ready), so the embedded
default needs no `celery beat` process and any number of scale-out workers share the job safely.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from runs_app import services


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk_task(self: Any, chunk_id: int) -> None:
    """Execute one chunk of a run (the message id lets a re-delivered message take its chunk back)."""
    services.run_execute_chunk(chunk_id=chunk_id, task_id=self.request.id or "")


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_aggregate_task(run_id: str) -> None:
    """Aggregate a run whose chunks are all done and complete it."""
    services.run_aggregate(run_id=run_id)


@shared_task(ignore_result=True)
def run_reap_task() -> int:
    """Requeue chunks of dead workers (also callable from `celery beat` or by hand)."""
    return services.run_reap_stale()


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    services.run_reaper_start()
