"""First run in a browser: the setup link from `manage.py runstudio`, a connection, and a healthy worker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import RUNNING_LINE, free_port, start_studio, stop_studio

pytestmark = pytest.mark.e2e

PASSWORD = "First-admin-pass-2024"


def ensure_admin(studio, page) -> None:
    """Create the first administrator through the setup link unless an earlier test already did."""
    page.goto(studio.setup_url)
    if "no longer works" in page.content():
        page.goto(studio.url + "/login/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
    else:
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Email").fill("admin@example.com")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        page.get_by_label("Password (again)").fill(PASSWORD)
        page.get_by_role("button", name="Create administrator").click()
    page.wait_for_url(studio.url + "/")


def test_first_admin_creates_a_connection_and_sees_a_healthy_worker(studio, page):
    ensure_admin(studio, page)
    assert "Welcome, admin" in page.content()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Connections").click()
    page.wait_for_url(re.compile(r".*/connections/$"))
    page.get_by_role("link", name="New connection").click()
    page.wait_for_url(re.compile(r".*/connections/new$"))
    page.locator("[name=name]").fill("local_llm")
    page.locator("select[name=type]").select_option("openai_compatible")
    page.locator("[name=api_key]").fill("sk-e2e-not-a-real-key")
    page.locator("[name=base_url]").fill("http://127.0.0.1:9/v1")
    page.get_by_role("button", name=re.compile(r"^(Create|Save)$")).click()
    # The form may post through htmx and redirect with HX-Redirect: wait for the page it lands on.
    page.wait_for_url(lambda url: not url.endswith("/connections/new"))
    page.wait_for_load_state()
    assert "local_llm" in page.content()
    assert "sk-e2e-not-a-real-key" not in page.content()
    page.goto(studio.url + "/connections/")
    assert "local_llm" in page.content()

    response = page.goto(studio.url + "/healthz?wait=10")
    report = json.loads(page.locator("body").inner_text())
    assert response.status == 200, report
    assert report["checks"]["workers"]["hostname"].startswith("celery@")

    page.goto(studio.setup_url)
    assert "no longer works" in page.content()


def test_theme_toggle_is_remembered(studio, page):
    page.goto(studio.url + "/login/")
    before = page.evaluate("window.flowStudioTheme.effective()")

    page.get_by_role("button", name="Switch between light and dark theme").click()
    page.reload()

    after = page.evaluate("document.documentElement.getAttribute('data-theme')")
    assert after == ("light" if before == "dark" else "dark")


def test_runstudio_restarts_quickly_without_a_new_setup_link_and_stops_cleanly(studio, page):
    ensure_admin(studio, page)
    started = time.monotonic()

    again = start_studio(studio.data_dir, free_port())
    try:
        again.wait_for(RUNNING_LINE, timeout=60)
        assert time.monotonic() - started < 30
        assert "/setup/" not in again.output()
    finally:
        code = stop_studio(again)

    assert code == 0, again.output()[-3000:]
    assert "Flow Studio stopped." in again.output()


def test_runstudio_stops_everything_when_a_child_dies(studio):
    running = start_studio(studio.data_dir, free_port())
    try:
        running.wait_for(RUNNING_LINE, timeout=60)
        children = (
            Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children").read_text().split()
        )
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)

        running.process.wait(timeout=30)
        time.sleep(0.5)
    finally:
        stop_studio(running)

    assert running.process.returncode == 1
    assert "stopping the others" in running.output()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
