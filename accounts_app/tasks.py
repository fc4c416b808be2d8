"""Celery tasks of the accounts app."""

from __future__ import annotations

import os
from typing import Any

from celery import shared_task


@shared_task(bind=True, name="accounts_app.ping", acks_late=False, ignore_result=False)
def ping(self: Any) -> dict[str, Any]:
    """Answer a health check with the worker's name, proving a worker consumes from the broker."""
    return {"hostname": self.request.hostname, "pid": os.getpid()}
