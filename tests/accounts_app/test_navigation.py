"""The top navigation shows only the pages that exist."""

from __future__ import annotations

from django.test import RequestFactory
from django.urls import reverse

from studio import context_processors


def test_navigation_lists_settings_and_hides_names_that_do_not_resolve(monkeypatch):
    monkeypatch.setattr(
        context_processors,
        "NAVIGATION",
        (("Settings", "accounts:settings"), ("Nowhere", "nowhere:list")),
    )

    items = context_processors.navigation(RequestFactory().get("/settings/"))["nav_items"]

    assert items == [{"label": "Settings", "url": reverse("accounts:settings"), "active": True}]


def test_navigation_marks_only_the_current_section_active():
    items = context_processors.navigation(RequestFactory().get("/"))["nav_items"]

    assert "Settings" in [item["label"] for item in items]
    assert not any(item["active"] for item in items)
