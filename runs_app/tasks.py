"""Celery tasks of the runs app: each takes an id and calls a service.

Workers run the reaper themselves (a daemon thread started when the worker is ready), so the embedded
default needs no `celery beat` process and any number of scale-out workers share the job safely. A worker
that gets its broker connection back sends the queued chunks again: a broker restarted without persistence
lost their messages.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from celery import bootsteps, shared_task
from celery.signals import celeryd_init, worker_process_init, worker_ready
from django.db import connection as db_connection
from django.utils import timezone

from runs_app import services

logger = logging.getLogger(__name__)


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


class ResendAfterReconnect(bootsteps.StartStopStep):
    """Consumer step: after a lost broker connection comes back, send the queued chunks' messages again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.started = False
        self.lost_at: dt.datetime | None = None

    def start(self, parent: Any) -> None:
        """Called on every (re)connection; only a reconnection sends anything."""
        if self.lost_at is not None:
            since, self.lost_at = self.lost_at, None
            threading.Thread(target=_resend, args=(since,), name="runs-resend", daemon=True).start()
        self.started = True

    def stop(self, parent: Any) -> None:
        """Called when the connection is lost (the consumer restarts) and at shutdown."""
        if self.started and self.lost_at is None:
            # Chunks enqueued before this moment may have had their messages in the broker that went away;
            # those another worker sent again after reconnecting carry a later time and are left alone.
            self.lost_at = timezone.now()
        self.started = False


def _resend(since: dt.datetime) -> None:
    try:
        sent = services.run_resend_queued(
            enqueued_before=since,
            reason="the broker connection came back, the broker may have lost their messages",
        )
        if sent:
            logger.warning("sent %s queued chunks again after the broker connection came back", sent)
    except Exception:
        logger.exception("sending queued chunks again after a broker reconnection failed")
    finally:
        db_connection.close()


@celeryd_init.connect
def _add_resend_step(instance: Any = None, **_: Any) -> None:
    if instance is not None:
        instance.app.steps["consumer"].add(ResendAfterReconnect)


@worker_process_init.connect
def _prepare_runner(**_: Any) -> None:
    services.run_runner_prepare()
