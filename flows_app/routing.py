"""Websocket routes of this app."""

from __future__ import annotations

from django.urls import URLPattern, path

from flows_app.consumers import FlowTestConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/flows/<int:flow_id>/test/", FlowTestConsumer.as_asgi(), name="flow-test"),
]
