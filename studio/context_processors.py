"""Template context shared by every page."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse

# Each app adds its page under one of these URL names when it has one; until then the entry is hidden.
NAVIGATION: tuple[tuple[str, str], ...] = (
    ("Flows", "flows:list"),
    ("Runs", "runs:list"),
    ("Endpoints", "endpoints:list"),
    ("Connections", "connections:list"),
    ("Settings", "accounts:settings"),
)


def _resolved_navigation() -> tuple[tuple[str, str], ...]:
    entries = []
    for label, name in NAVIGATION:
        try:
            entries.append((label, reverse(name)))
        except NoReverseMatch:
            continue
    return tuple(entries)


def navigation(request: HttpRequest) -> dict[str, Any]:
    """`nav_items`: the top navigation entries whose pages exist, each marked active under its path."""
    path = request.path
    return {
        "nav_items": [
            {"label": label, "url": url, "active": path == url or (url != "/" and path.startswith(url))}
            for label, url in _resolved_navigation()
        ]
    }
