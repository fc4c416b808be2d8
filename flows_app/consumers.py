"""The single-test websocket: runs a flow's saved head in a runner process and relays its events live."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from flows_app import streaming
from flows_app.services import FlowTestSession

logger = logging.getLogger(__name__)

# Application close codes (4000-4999): the page does not reconnect after these.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
# How long closing the socket waits for the test's runner to be gone before leaving it to the kill.
STOP_WAIT_SECONDS = 2.0


class FlowTestConsumer(AsyncJsonWebsocketConsumer):
    """Authorises on connect (anyone who may view the flow may test it), then forwards test events.

    Origin checking happens before this consumer, in studio/asgi.py (AllowedHostsOriginValidator). The page
    sends actions (flows_app.streaming.ACTION_*); one test runs at a time per socket, and the messages of a
    running test go straight from its runner to this socket, never through the channel layer.
    """

    flow_id: int = 0
    session: FlowTestSession | None = None
    task: asyncio.Task[None] | None = None
    gone = False

    async def connect(self) -> None:
        """Accept a signed-in user who may view the flow, then send the form and the history."""
        user = self.scope.get("user")
        self.flow_id = int(self.scope["url_route"]["kwargs"]["flow_id"])
        if user is None or not user.is_authenticated:
            logger.info("test socket of flow %s refused: not signed in", self.flow_id)
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            ready = await database_sync_to_async(streaming.ready_message)(user, self.flow_id)
        except Http404:
            logger.info("test socket of flow %s refused for user %s: not visible", self.flow_id, user.pk)
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.session = FlowTestSession()
        await self.accept()
        await self.send_json(ready)
        # The runner's start-up (Python, the LLM SDK) overlaps the user typing the first inputs.
        await self.session.prewarm()

    async def disconnect(self, code: int) -> None:
        """Closing the tab stops a running test: its runner is killed and the test recorded as canceled."""
        self.gone = True
        if self.session is None:
            return
        await self.session.cancel()
        if self.task is not None and not self.task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), STOP_WAIT_SECONDS)
            self.task.cancel()
        await self.session.close()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Dispatch one action of the page."""
        if not isinstance(content, dict) or self.session is None:
            return
        action = content.get("action")
        user = self.scope["user"]
        if action == streaming.ACTION_RUN:
            if self.task is not None and not self.task.done():
                await self.send_json(
                    {
                        "type": streaming.MESSAGE_REFUSED,
                        "message": "A test is already running here: wait for it to finish or cancel it first.",
                    }
                )
                return
            self.task = asyncio.get_running_loop().create_task(self._relay(content))
        elif action == streaming.ACTION_CANCEL:
            if self.task is not None and not self.task.done():
                await self.session.cancel()
        elif action == streaming.ACTION_OPEN:
            await self._reply(streaming.record_message, user, self.flow_id, content.get("id"))
        elif action == streaming.ACTION_FORM:
            await self._reply(streaming.form_message, user, self.flow_id)
        elif action == streaming.ACTION_HISTORY:
            await self._reply(streaming.history_message, user, self.flow_id)

    async def _reply(self, build: Any, *args: Any) -> None:
        try:
            message = await database_sync_to_async(build)(*args)
        except Http404 as error:
            message = {"type": streaming.MESSAGE_REFUSED, "message": str(error)}
        await self.send_json(message)

    async def _relay(self, request: dict[str, Any]) -> None:
        assert self.session is not None
        messages = streaming.test_messages(
            session=self.session, user=self.scope["user"], flow_id=self.flow_id, request=request
        )
        async with contextlib.aclosing(messages) as stream:
            async for message in stream:
                if not self.gone:
                    await self.send_json(message)
