"""From a finished run through the deploy wizard to the endpoint's Test tab, where a streamed answer arrives.

Runs against a real `manage.py runstudio` (daphne + a Celery worker) in Debian's Chromium. The run executes the
chat template on the worker; the endpoint then serves the run's snapshot from its own warm runner, and the
Test tab calls `/endpoints/<name>/score` with `fetch`, reading the SSE stream chunk by chunk. The LLM is the
local fake with a per-token delay, so the answer visibly grows.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import expect

from tests.e2e.test_first_user import ensure_admin

pytestmark = pytest.mark.e2e

TOKENS = 12
TOKEN_MS = 40

# Records every distinct text the answer bubble shows while it streams.
WATCH = """
() => {
  window.__texts = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll("[data-chat-answer]");
    const text = answers.length ? answers[answers.length - 1].textContent : "";
    if (text && window.__texts[window.__texts.length - 1] !== text) window.__texts.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def _seed_finished_run(studio, base_url: str) -> str:
    """The chat template, a connection to the fake LLM and a run of its data file, submitted as the admin."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        "from flows_app.models import Connection, Flow\n"
        "from flows_app.services import connection_create, flow_create_from_template\n"
        "from runs_app.services import run_create\n"
        "owner = get_user_model().objects.get(username='admin')\n"
        "Connection.objects.filter(owner=owner, name='open_ai_connection').delete()\n"
        "connection_create(owner=owner, name='open_ai_connection', type='open_ai',\n"
        "                  configs={'base_url': BASE_URL}, secrets={'api_key': 'sk-e2e'})\n"
        "flow = Flow.objects.filter(owner=owner, name='deploy e2e', deleted_at__isnull=True).first()\n"
        "flow = flow or flow_create_from_template(owner=owner, name='deploy e2e', template='chat')\n"
        "run = run_create(user=owner, flow_version=flow.head, data_path='data.jsonl',\n"
        "                 column_mapping={'question': '${data.question}', 'chat_history': '${data.chat_history}'})\n"
        "print('RUN', run.pk)\n"
    ).replace("BASE_URL", repr(base_url))
    stdout = studio.shell(code)
    return re.search(r"RUN ([0-9a-f-]{36})", stdout).group(1)


def _wait_completed(page, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page.goto(url)
        status = page.locator("#run-status").get_attribute("data-status")
        if status == "Completed":
            return
        assert status not in {"Failed", "Canceled"}, page.locator("#run-status").inner_text()
        time.sleep(0.5)
    raise AssertionError("the run never completed")


def test_a_finished_run_deploys_through_the_wizard_and_the_test_tab_streams_an_answer(studio, page, fake_llm):
    fake_llm.config(latency_ms=0, token_ms=TOKEN_MS, tokens=TOKENS)
    ensure_admin(studio, page)
    run_id = _seed_finished_run(studio, fake_llm.base_url)
    _wait_completed(page, f"{studio.url}/runs/{run_id}/")

    page.get_by_role("toolbar", name="Run actions").get_by_role("link", name="Deploy").click()
    page.wait_for_url(re.compile(rf".*/deploy/run/{run_id}/$"))
    # Basic settings
    page.get_by_label("Endpoint name").fill("e2e-chat")
    expect(page.get_by_label("Deployment name")).to_have_value("blue")
    page.get_by_role("button", name="Next").click()
    # Endpoint auth
    expect(page.get_by_role("heading", name="Endpoint auth")).to_be_visible()
    page.get_by_role("button", name="Next").click()
    # Outputs & connections
    expect(page.locator('input[name="outputs"][value="answer"]')).to_be_checked()
    expect(page.locator('select[name="conn__open_ai_connection"]')).to_have_value("open_ai_connection")
    page.get_by_role("button", name="Next").click()
    # Review + create
    review = page.locator("[data-deploy-review]")
    expect(review).to_contain_text("e2e-chat (new)")
    expect(review).to_contain_text("open_ai_connection")
    page.get_by_role("button", name="Create").click()

    keys = page.locator("[data-key-value]")
    expect(keys).to_have_count(2)
    assert all(k.startswith("fse_") for k in keys.all_inner_texts())
    expect(page.locator("[data-consume-url]")).to_have_text(f"{studio.url}/endpoints/e2e-chat/score")

    page.get_by_role("tab", name="Test").click()
    page.wait_for_url(re.compile(r".*/endpoints-admin/e2e-chat/test$"))
    page.evaluate(WATCH)
    page.get_by_label("Message").fill("What is prompt flow?")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("[data-chat-answer][data-done]")
    expect(answer).to_have_count(1, timeout=30_000)

    first = fake_llm.last_body()["messages"]
    expected = fake_llm.expected_chat(first)
    assert answer.inner_text() == expected
    texts = page.evaluate("window.__texts")
    assert len(texts) >= TOKENS // 2, f"the answer did not grow chunk by chunk: {texts}"
    assert all(expected.startswith(t) for t in texts)
    status = page.locator("[data-test-status]").inner_text()
    assert "HTTP 200" in status and "deployment blue" in status
    events = [json.loads(line) for line in page.locator("[data-test-output]").inner_text().splitlines()]
    # One event per chunk, closed by the stream's empty last chunk, exactly as prompt flow's endpoints send it.
    assert events == [{"answer": t} for t in re.findall(r"^\S+|\s\S+", expected)] + [{"answer": ""}]

    # A second turn carries the first in chat_history.
    page.get_by_label("Message").fill("Tell me more.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("[data-chat-answer][data-done]")).to_have_count(2, timeout=30_000)
    second = fake_llm.last_body()["messages"]
    assert expected in json.dumps(second)
    assert page.locator("[data-chat-answer]").nth(1).inner_text() == fake_llm.expected_chat(second)
