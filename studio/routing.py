"""Websocket routes of every app."""

from __future__ import annotations

from flows_app.routing import websocket_urlpatterns as flows_ws
from runs_app.routing import websocket_urlpatterns as runs_ws

websocket_urlpatterns = [*flows_ws, *runs_ws]
