"""Live run progress: group names, event payloads, and publishing to the channel layer.

Consumers (RUNS-UI) join `run_group(run_id)` and receive messages whose `type` is `run.progress` (handler
`run_progress`) or `run.log` (handler `run_log`). Pages without a websocket poll `selectors.run_progress`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

logger = logging.getLogger(__name__)

PROGRESS_EVENT = "run.progress"
LOG_EVENT = "run.log"
# At most this many progress messages per run per second from one process; status changes always go out.
MAX_PER_SECOND = 2.0

_last_sent: dict[str, float] = {}
_lock = threading.Lock()
_warned = False


def run_group(run_id: UUID | str) -> str:
    """The channel-layer group of one run's live events."""
    return f"run-{run_id}"


def progress_event(progress: dict[str, Any]) -> dict[str, Any]:
    """The channel-layer message carrying a `selectors.run_progress` dict."""
    return {"type": PROGRESS_EVENT, "progress": progress}


def log_event(run_id: UUID | str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The channel-layer message carrying new log lines ({seq, time, line_number, stream, text})."""
    return {"type": LOG_EVENT, "run": str(run_id), "lines": lines}


def _due(run_id: str, force: bool) -> bool:
    now = time.monotonic()
    with _lock:
        last = _last_sent.get(run_id, 0.0)
        if not force and now - last < 1.0 / MAX_PER_SECOND:
            return False
        _last_sent[run_id] = now
        if len(_last_sent) > 1000:
            # Old runs' entries would otherwise pile up in a long-lived worker.
            for key in [k for k, v in _last_sent.items() if now - v > 60]:
                _last_sent.pop(key, None)
    return True


def publish(run_id: UUID | str, message: dict[str, Any]) -> None:
    """Send one message to the run's group; progress is best effort, so a failing layer is only logged."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    global _warned
    try:
        async_to_sync(layer.group_send)(run_group(run_id), message)
    except Exception:
        # Once per process: a missing layer must not flood the worker log twice a second.
        if not _warned:
            _warned = True
            logger.warning("could not publish progress of run %s", run_id, exc_info=True)


def publish_progress(run: Any, *, force: bool = False) -> bool:
    """Publish the run's progress, throttled to MAX_PER_SECOND per run; True when a message went out."""
    from runs_app.selectors import run_progress

    run_id = str(run.pk)
    if not _due(run_id, force):
        return False
    publish(run_id, progress_event(run_progress(run)))
    return True
