"""Testing the chat template from its authoring page: the answer grows token by token over the websocket.

Runs against a real `manage.py runstudio` (daphne, so websockets work) in Debian's Chromium; the LLM is the
local fake with a per-token delay. The final answers must equal what `flowstudio flow test` prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_first_user import ensure_admin

pytestmark = pytest.mark.e2e

TOKENS = 24
TOKEN_MS = 60
FLOWSTUDIO = Path(sys.executable).with_name("flowstudio")

# Records every distinct text of the answer and every badge state of the `chat` node, as the page changes.
WATCH = """
() => {
  window.__answers = []; window.__badges = [];
  const outputs = document.getElementById("test-outputs");
  const chatLog = document.getElementById("test-chat-log");
  const note = () => {
    const box = outputs.querySelector('[data-output="answer"]');
    const text = box ? box.textContent : "";
    if (text && window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
    const node = document.querySelector('#dag-main .dag-node[data-id="node:chat"]');
    const run = node ? node.getAttribute("data-run") : null;
    if (run && window.__badges[window.__badges.length - 1] !== run) window.__badges.push(run);
  };
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["data-run"]});
}
"""


def _seed(studio, base_url: str) -> int:
    """The chat template and a connection to the fake LLM, created through flows_app services as the admin."""
    code = (
        "from django.contrib.auth import get_user_model\n"
        "from flows_app.models import Connection, Flow\n"
        "from flows_app.services import connection_create, flow_create_from_template\n"
        "owner = get_user_model().objects.get(username='admin')\n"
        "Connection.objects.filter(owner=owner, name='open_ai_connection').delete()\n"
        "connection_create(owner=owner, name='open_ai_connection', type='open_ai',\n"
        "                  configs={'base_url': BASE_URL}, secrets={'api_key': 'sk-e2e'})\n"
        "flow = Flow.objects.filter(owner=owner, name='chat e2e', deleted_at__isnull=True).first()\n"
        "flow = flow or flow_create_from_template(owner=owner, name='chat e2e', template='chat')\n"
        "print('FLOW', flow.pk)\n"
    ).replace("BASE_URL", repr(base_url))
    stdout = studio.shell(code)
    return int(re.search(r"FLOW (\d+)", stdout).group(1))


def _cli_answer(tmp: Path, base_url: str, question: str, history: list) -> str:
    """What `flowstudio flow test` prints for the chat template, with a local connection to the same fake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    env["FLOWSTUDIO_HOME"] = str(tmp / "home")
    flow = tmp / "chat"
    if not flow.exists():
        subprocess.run(
            [FLOWSTUDIO, "flow", "init", "--flow", str(flow), "--type", "chat"], env=env, check=True
        )
        subprocess.run(
            [
                FLOWSTUDIO,
                "connection",
                "create",
                "-f",
                str(flow / "openai.yaml"),
                "--set",
                "api_key=sk-cli",
                f"base_url={base_url}",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    done = subprocess.run(
        [
            FLOWSTUDIO,
            "flow",
            "test",
            "--flow",
            str(flow),
            "--inputs",
            f"question={question}",
            "chat_history=" + json.dumps(history),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stdout)["answer"]


def _send_and_watch(page, message: str) -> tuple[str, list[str], list[str]]:
    page.evaluate(WATCH)
    before = page.locator("#test-status").inner_text()
    box = page.locator("[data-test-message]")
    box.fill(message)
    box.press("Enter")
    page.wait_for_function(
        "before => { const s = document.getElementById('test-status');"
        " return s.dataset.status === 'completed' && s.textContent !== before; }",
        arg=before,
        timeout=60_000,
    )
    final = page.locator('[data-output="answer"]').inner_text()
    return final, page.evaluate("window.__answers"), page.evaluate("window.__badges")


def test_the_chat_answer_grows_token_by_token_and_equals_the_cli(studio, page, fake_llm, tmp_path):
    fake_llm.config(latency_ms=100, token_ms=TOKEN_MS, tokens=TOKENS)
    ensure_admin(studio, page)
    flow_id = _seed(studio, fake_llm.base_url)
    page.goto(f"{studio.url}/flows/{flow_id}/")
    page.wait_for_selector("#dag-main .dag-node[data-id='node:chat']")
    page.wait_for_selector("#test-status[data-status=idle]")
    assert page.locator("[data-test-message]").input_value() == "What is prompt flow?"  # data.jsonl, row 1

    final, answers, badges = _send_and_watch(page, "What is a flow?")
    partial = [text for text in answers if text != final]
    assert len(set(partial)) >= 5, answers
    assert all(final.startswith(text) for text in partial), "the answer must only grow"
    assert badges[:2] == ["running", "completed"], badges
    assert re.fullmatch(r"completed · [\d.]+ m?s", page.locator(".dag-run-badge text").text_content())
    assert final == _cli_answer(tmp_path, fake_llm.base_url, "What is a flow?", [])
    bubbles = page.locator("#test-chat-log .chat-bubble")
    assert bubbles.count() == 2 and bubbles.nth(1).inner_text() == final

    # The second turn carries the first as chat_history, as prompt flow's chat box does.
    second, answers, _ = _send_and_watch(page, "Tell me more.")
    history = [{"inputs": {"question": "What is a flow?"}, "outputs": {"answer": final}}]
    assert second == _cli_answer(tmp_path, fake_llm.base_url, "Tell me more.", history)
    assert len(set(answers)) >= 6 and second != final
    assert page.locator("#test-chat-log .chat-bubble").count() == 4

    # The trace shows flow → node → LLM call with tokens; the history reopens the first test.
    page.locator("[data-test-tab=trace]").click()
    assert page.locator("#test-trace .trace-kind-flow .trace-kind-node .trace-kind-llm").count() == 1
    assert re.fullmatch(
        r"\d+ tokens", page.locator("#test-trace .trace-kind-flow .trace-tokens").first.inner_text()
    )
    page.locator("[data-test-tab=history]").click()
    rows = page.locator("#test-history [data-test-open]")
    rows.first.wait_for()
    assert rows.count() >= 2
    rows.nth(1).click()
    page.wait_for_selector("#test-status[data-status=record]")
    assert page.locator('[data-output="answer"]').inner_text() == final
    if os.environ.get("STUDIO_E2E_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["STUDIO_E2E_SCREENSHOTS"], "single-test.png"))
