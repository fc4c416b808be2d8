"""Websocket consumer that pushes one run's live progress and log lines to its run page."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from runs_app import selectors, streaming

# Application close codes (4000-4999): the page stops reconnecting on these and falls back to polling.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


def _snapshot(user: Any, run_id: str) -> dict[str, Any]:
    """The run's progress now, or Http404 when the user may not see it."""
    return selectors.run_progress(selectors.run_get_for(user, run_id))


class RunProgressConsumer(AsyncJsonWebsocketConsumer):
    """Authorises the session user on connect, then forwards the run group's events as JSON.

    Origin checking happens before this consumer, in studio/asgi.py (AllowedHostsOriginValidator).
    Messages sent to the browser: `{"type": "progress", "progress": {...}}` and `{"type": "log", "lines": [...]}`.
    """

    group: str | None = None

    async def connect(self) -> None:
        """Accept only a signed-in user allowed to see the run, then send its current progress."""
        user = self.scope.get("user")
        run_id = str(self.scope["url_route"]["kwargs"]["run_id"])
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            progress = await database_sync_to_async(_snapshot)(user, run_id)
        except Http404:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = streaming.run_group(run_id)
        # Join before accepting and reading, so no event published in between is lost.
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "progress", "progress": progress})

    async def disconnect(self, code: int) -> None:
        """Leave the run's group."""
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The page sends nothing; anything received is ignored."""

    async def run_progress(self, event: dict[str, Any]) -> None:
        """A `run.progress` group message: the run's progress dict."""
        await self.send_json({"type": "progress", "progress": event["progress"]})

    async def run_log(self, event: dict[str, Any]) -> None:
        """A `run.log` group message: new log lines."""
        await self.send_json({"type": "log", "lines": event.get("lines", [])})
