"""A batch run from the browser: upload a dataset, submit through the wizard, watch the progress bar move.

Runs against a real `manage.py runstudio` (daphne + a Celery worker) in Debian's Chromium. The progress bar
must move without a reload, once over the websocket and once with websockets unavailable (htmx polling).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e.test_first_user import ensure_admin

pytestmark = pytest.mark.e2e

LINES = 16
FLOW_FILES = {
    "flow.dag.yaml": """\
inputs:
  question:
    type: string
  pause:
    type: double
    default: 0.5
outputs:
  answer:
    type: string
    reference: ${shout.output}
nodes:
- name: shout
  type: python
  source:
    type: code
    path: shout.py
  inputs:
    question: ${inputs.question}
    pause: ${inputs.pause}
""",
    "shout.py": """\
import asyncio

from promptflow.core import tool


@tool
async def shout(question: str, pause: float) -> str:
    await asyncio.sleep(pause)
    return question.upper()
""",
}


def _seed_flow(studio) -> None:
    """Put a slow flow into the studio's database through its own services, as the admin."""
    code = (
        "import json, os\n"
        "from django.contrib.auth import get_user_model\n"
        "from flows_app.models import Flow\n"
        "from flows_app.services import flow_create\n"
        "owner = get_user_model().objects.get(username='admin')\n"
        "if not Flow.objects.filter(owner=owner, name='slow_shout').exists():\n"
        "    files = {k: v.encode() for k, v in json.loads(os.environ['SEED_FILES']).items()}\n"
        "    flow_create(owner=owner, name='slow_shout', files=files)\n"
    )
    studio.shell(code, SEED_FILES=json.dumps(FLOW_FILES))


def _watch_progress(page, timeout: float = 120) -> tuple[list[str], bool]:
    """Percentages shown until the run completes, and whether the websocket was live at some point."""
    seen: list[str] = []
    live = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        percent = page.locator("[data-progress-percent]").inner_text()
        if not seen or seen[-1] != percent:
            seen.append(percent)
        live = live or bool(page.evaluate("window.flowStudioRunLive === true"))
        status = page.locator("#run-status").get_attribute("data-status")
        if status in {"Failed", "Canceled"}:
            raise AssertionError(f"the run ended {status}: {page.locator('#run-status').inner_text()}")
        if status == "Completed" and percent == "100%":
            return seen, live
        time.sleep(0.1)
    raise AssertionError(f"the run never completed; percentages seen: {seen}")


def _assert_moved_without_reload(page, seen: list[str]) -> None:
    assert page.evaluate("window.__sameDocument") == "yes", "the page was reloaded"
    middle = [p for p in seen if p not in {"0%", "100%"}]
    assert middle, f"the bar never showed an intermediate value: {seen}"
    assert seen[-1] == "100%"
    # The pill is its own fragment: it may land a moment after the bar's last update.
    expect(page.locator(".status-pill[data-progress-status]")).to_have_text("Completed", timeout=10_000)


def _submit_through_wizard(studio, page, folder: Path, name: str) -> None:
    """Upload a dataset on the datasets page, then submit a run of the slow flow through the wizard."""
    ensure_admin(studio, page)
    _seed_flow(studio)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}"}) + "\n" for i in range(LINES)))
    page.goto(studio.url + "/runs/datasets/")
    page.locator("input[name=file]").set_input_files(str(data))
    # The browser previews the file before it is uploaded.
    expect(page.locator("[data-local-preview]")).to_contain_text(f"{LINES} rows · 1 column")
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r".*/runs/datasets/\d+/$"))
    assert "question 0" in page.content()

    page.goto(studio.url + "/runs/new")
    page.locator("select[name=flow]").select_option(label="slow_shout")
    # The flow's steps arrive by htmx; pick the dataset once they are in.
    page.locator("input[name=map__question]").wait_for(state="attached")
    page.get_by_role("button", name="Next").click()
    page.locator("select[name=dataset]").select_option(label=name)
    page.wait_for_function(
        "document.querySelector('input[name=map__question]')?.value === '${data.question}'"
    )
    page.get_by_role("button", name="Next").click()
    page.get_by_label("Concurrency").fill("2")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Review + submit").click()
    expect(page.locator("[data-review]")).to_contain_text("${data.question}")
    page.get_by_role("button", name="Submit", exact=True).click()
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}/$"))
    page.evaluate("window.__sameDocument = 'yes'")


def test_wizard_submits_a_run_and_the_progress_bar_moves_live_until_completed(studio, page, tmp_path: Path):
    _submit_through_wizard(studio, page, tmp_path, "live_run")
    seen, live = _watch_progress(page)

    _assert_moved_without_reload(page, seen)
    assert live, "the websocket never pushed progress"
    page.get_by_role("tab", name="Outputs").click()
    assert "QUESTION 0" in page.content()


def test_without_websockets_the_status_fragment_polls_and_the_bar_still_moves(studio, page, tmp_path: Path):
    page.add_init_script("delete window.WebSocket;")
    _submit_through_wizard(studio, page, tmp_path, "polled_run")
    seen, live = _watch_progress(page)

    _assert_moved_without_reload(page, seen)
    assert not live
