"""Websocket routes of this app."""

from __future__ import annotations

from django.urls import URLPattern, path

from runs_app.consumers import RunProgressConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/runs/<uuid:run_id>/", RunProgressConsumer.as_asgi(), name="run-progress"),
]
