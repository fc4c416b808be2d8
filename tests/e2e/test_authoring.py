"""The authoring workspace in Chromium: templates, raw-mode saves, the DAG, zip round trips, diffs, conflicts."""

from __future__ import annotations

import io
import os
import re
import zipfile

import pytest
from django.conf import settings
from django.test import Client

from flows_app.models import Flow
from flows_app.services import flow_create, flow_create_from_template, flow_share, snapshot_file_read

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("STUDIO_E2E_SCREENSHOTS")


def sign_in(page, live_server, user) -> None:
    """Give the browser context a session of `user` (the sign-in page has its own tests)."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    page.context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": cookie.value, "url": live_server.url}]
    )


def shot(page, name: str) -> None:
    """Save a screenshot when STUDIO_E2E_SCREENSHOTS names a folder (for looking at the pages by eye)."""
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)


def head_text(flow: Flow, path: str) -> str:
    """The text of one file at the flow's head."""
    flow.refresh_from_db()
    return snapshot_file_read(snapshot=flow.head.snapshot, path=path).decode()


def open_workspace(page, live_server, flow: Flow, query: str = "") -> None:
    """Open the authoring page and wait until the editor and the graph are drawn."""
    page.goto(f"{live_server.url}/flows/{flow.pk}/{query}")
    page.wait_for_selector(".CodeMirror, .structure")
    page.wait_for_selector("#dag-main svg, #dag-main .dag-empty")


def type_in_editor(page, text: str) -> None:
    """Replace the open file's contents in CodeMirror, as a user would with select-all and typing."""
    page.locator(".CodeMirror").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def test_create_from_a_template_opens_the_workspace_with_its_graph(live_server, page, owner):
    sign_in(page, live_server, owner)
    page.goto(f"{live_server.url}/flows/")
    shot(page, "list-empty")
    page.get_by_role("link", name="New flow").click()
    page.locator("#new-flow-form [name=name]").fill("chat helper")
    page.get_by_label(re.compile(r"^Chat")).check()
    page.get_by_role("button", name="Create flow").click()
    page.wait_for_url(re.compile(r".*/flows/\d+/$"))
    page.wait_for_selector("#dag-main svg")
    assert page.locator(".tree-file[data-path='chat.jinja2']").count() == 1
    assert page.locator(".dag-node[data-id='node:chat']").count() == 1
    assert page.locator(".dag-node[data-id='node:chat'] .dag-sub").text_content().startswith("LLM")
    assert page.locator("#problem-count").inner_text() == "0"
    shot(page, "workspace-chat")


def test_edit_a_prompt_in_raw_mode_save_with_ctrl_s_and_the_dag_updates(live_server, page, owner):
    flow = flow_create_from_template(owner=owner, name="greeter", template="standard")
    sign_in(page, live_server, owner)
    open_workspace(page, live_server, flow, "?file=hello.jinja2")
    assert page.locator(".CodeMirror .cm-jinja2, .CodeMirror-code").count() >= 1
    type_in_editor(page, "Write {{text}} in {{language}}.\n")
    assert page.locator(".dirty-dot").is_visible()
    page.keyboard.press("Control+S")
    page.wait_for_selector("#ws-status .status-ok")
    assert "v2" in page.locator("#ws-version").inner_text()
    assert head_text(flow, "hello.jinja2") == "Write {{text}} in {{language}}.\n"
    assert not page.locator(".dirty-dot").is_visible()

    # Now the flow definition: wire a new input into the prompt node; the graph redraws from the saved head.
    page.locator(".tree-file[data-path='flow.dag.yaml'] .tree-link").click()
    page.wait_for_selector("#editor[data-path='flow.dag.yaml'] .CodeMirror")
    dag = head_text(flow, "flow.dag.yaml")
    dag = dag.replace(
        "inputs:\n  text:", "inputs:\n  language:\n    type: string\n    default: Python\n  text:", 1
    )
    dag = dag.replace("text: ${inputs.text}", "text: ${inputs.text}\n    language: ${inputs.language}")
    type_in_editor(page, dag)
    page.keyboard.press("Control+S")
    page.wait_for_selector(".dag-node[data-id='input:language']")
    assert "v3" in page.locator("#ws-version").inner_text()
    shot(page, "workspace-after-save")

    # A click on a node opens its source file.
    page.locator(".dag-node[data-id='node:echo_my_prompt']").click()
    page.wait_for_selector("#editor[data-path='hello.py'] .CodeMirror")

    # The structured view shows the same saved head.
    page.get_by_role("tab", name="Structured").click()
    page.wait_for_selector("#structure [data-input='language']")
    shot(page, "structured")


def test_structured_view_adds_a_node_and_raw_mode_and_graph_show_it(live_server, page, owner):
    flow = flow_create_from_template(owner=owner, name="greeter", template="standard")
    sign_in(page, live_server, owner)
    open_workspace(page, live_server, flow, "?mode=structured")
    page.get_by_text("Add a node…").click()
    form = page.locator("#add-node-form")
    form.locator("[name=name]").fill("shout")
    form.locator("[name=type]").select_option("python")
    form.locator("[name=inputs]").fill("text=${echo_my_prompt.output}")
    form.get_by_role("button", name="Add node").click()
    page.wait_for_selector("#structure [data-node='shout']")
    page.wait_for_selector(".dag-node[data-id='node:shout']")
    page.get_by_role("tab", name="Raw file").click()
    page.wait_for_selector("#editor[data-path='flow.dag.yaml'] .CodeMirror")
    assert "name: shout" in page.locator(".CodeMirror").inner_text()


def test_upload_a_zip_download_it_and_the_bytes_match(live_server, page, owner, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "uploaded/flow.dag.yaml",
            "inputs:\n  q:\n    type: string\noutputs:\n  a:\n    type: string\n    reference: ${echo.output}\nnodes:\n- name: echo\n  type: python\n  source:\n    type: code\n    path: echo.py\n  inputs:\n    q: ${inputs.q}\n",
        )
        archive.writestr(
            "uploaded/echo.py",
            "from promptflow.core import tool\n\n\n@tool\ndef echo(q: str) -> str:\n    return q\n",
        )
    archive_path = tmp_path / "uploaded.zip"
    archive_path.write_bytes(buffer.getvalue())
    sign_in(page, live_server, owner)
    page.goto(f"{live_server.url}/flows/new")
    page.locator("#import-flow-form [name=archive]").set_input_files(str(archive_path))
    page.locator("#import-flow-form").get_by_role("button", name="Import").click()
    page.wait_for_url(re.compile(r".*/flows/\d+/$"))
    page.wait_for_selector(".dag-node[data-id='node:echo']")
    with page.expect_download() as first:
        page.locator("#download-zip").click()
    downloaded = first.value.path()
    exported = open(downloaded, "rb").read()
    names = zipfile.ZipFile(io.BytesIO(exported)).namelist()
    assert names == ["echo.py", "flow.dag.yaml"]

    # The downloaded zip imports as a new flow whose export is byte-identical.
    page.goto(f"{live_server.url}/flows/new")
    page.locator("#import-flow-form [name=archive]").set_input_files(downloaded)
    page.locator("#import-flow-form [name=name]").fill("round trip")
    page.locator("#import-flow-form").get_by_role("button", name="Import").click()
    page.wait_for_url(re.compile(r".*/flows/\d+/$"))
    with page.expect_download() as second:
        page.locator("#download-zip").click()
    assert open(second.value.path(), "rb").read() == exported


def test_diff_between_two_versions_shows_file_and_dag_changes(live_server, page, owner):
    flow = flow_create_from_template(owner=owner, name="greeter", template="standard")
    sign_in(page, live_server, owner)
    open_workspace(page, live_server, flow, "?file=hello.jinja2")
    type_in_editor(page, "A different prompt for {{text}}.\n")
    page.keyboard.press("Control+S")
    page.wait_for_selector("#ws-status .status-ok")
    page.locator("#ws-version").click()
    page.wait_for_url(re.compile(r".*/history$"))
    assert page.locator("tr[data-version='2']").inner_text().count("owner") == 1
    page.get_by_role("button", name="Compare A → B").click()
    page.wait_for_url(re.compile(r".*/diff\?(a=1&b=2|b=2&a=1)$"))
    page.wait_for_selector("#dag-diff svg")
    changed = page.locator(".diff-file[data-path='hello.jinja2']")
    assert "A different prompt for {{text}}." in changed.locator(".diff-add").inner_text()
    assert "Write a simple {{text}} program" in changed.locator(".diff-del").all_inner_texts()[-1]
    assert page.locator(".dag-node.dag-diff-changed[data-id='node:hello_prompt']").count() == 1
    assert page.locator(".dag-node.dag-diff-same[data-id='node:echo_my_prompt']").count() == 1
    shot(page, "diff")


def test_a_conflict_between_two_sessions_is_resolved_without_losing_either_change(
    live_server, browser, page, owner, django_user_model
):
    flow = flow_create_from_template(owner=owner, name="greeter", template="standard")
    editor = django_user_model.objects.create_user(username="editor", password="editor-pass-123!")
    flow_share(flow=flow, by=owner, user=editor, role="editor")
    sign_in(page, live_server, owner)
    other = browser.new_context(viewport={"width": 1366, "height": 820}).new_page()
    sign_in(other, live_server, editor)
    original = head_text(flow, "hello.py")
    open_workspace(page, live_server, flow, "?file=hello.py")
    open_workspace(other, live_server, flow, "?file=hello.py")

    # The editor changes the first line and saves first.
    theirs = original.replace(
        "from promptflow.core import tool", "from promptflow.core import tool  # theirs"
    )
    type_in_editor(other, theirs)
    other.keyboard.press("Control+S")
    other.wait_for_selector("#ws-status .status-ok")

    # The owner, still on v1, changes the last line: the save is refused and the conflict view shows both.
    mine = original.replace('return "Prompt: " + input1', 'return "Mine: " + input1')
    type_in_editor(page, mine)
    page.keyboard.press("Control+S")
    page.wait_for_selector("#editor[data-conflict='true']")
    assert "# theirs" in page.locator("#conflict-theirs").inner_text()
    assert "Mine: " in page.locator("#conflict-yours").inner_text()
    assert "Both changes merged" in page.locator("#merge-state").inner_text()
    assert head_text(flow, "hello.py") == theirs
    shot(page, "conflict")

    page.get_by_role("button", name=re.compile(r"Save merge as v3")).click()
    page.wait_for_selector("#editor[data-path='hello.py']:not([data-conflict]) .CodeMirror")
    merged = head_text(flow, "hello.py")
    assert "# theirs" in merged and '"Mine: "' in merged
    assert flow.head.number == 3
    other.context.close()


def test_a_hundred_node_dag_lays_out_without_overlaps(live_server, page, owner):
    nodes = []
    for index in range(100):
        source = "${inputs.q}" if index < 5 else f"${{n{index // 2}.output}}"
        nodes.append(
            f"- name: n{index}\n  type: python\n  source:\n    type: code\n    path: tool.py\n  inputs:\n    x: {source}\n"
        )
    dag = (
        "inputs:\n  q:\n    type: string\noutputs:\n  out:\n    type: string\n    reference: ${n99.output}\nnodes:\n"
        + "".join(nodes)
    )
    tool = "from promptflow.core import tool\n\n\n@tool\ndef run(x: str) -> str:\n    return x\n"
    flow = flow_create(
        owner=owner, name="big", files={"flow.dag.yaml": dag.encode(), "tool.py": tool.encode()}
    )
    sign_in(page, live_server, owner)
    open_workspace(page, live_server, flow, "?mode=structured")
    assert page.locator("#dag-main .dag-node").count() == 102
    boxes = page.eval_on_selector_all(
        "#dag-main .dag-node .dag-box",
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })",
    )
    for i, a in enumerate(boxes):
        assert a[2] > a[0] and a[3] > a[1]
        for b in boxes[i + 1 :]:
            overlap = min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5
            assert not overlap, (a, b)
    shot(page, "dag-100")


def test_a_viewer_gets_a_read_only_workspace(live_server, page, owner, django_user_model):
    flow = flow_create_from_template(owner=owner, name="greeter", template="standard")
    viewer = django_user_model.objects.create_user(username="viewer", password="viewer-pass-123!")
    flow_share(flow=flow, by=owner, user=viewer, role="viewer")
    sign_in(page, live_server, viewer)
    open_workspace(page, live_server, flow, "?file=hello.jinja2")
    assert page.locator("[data-save]").count() == 0
    assert page.locator(".tree-actions [data-rename]").count() == 0
    assert page.locator(".CodeMirror-code[contenteditable='true']").count() == 0
    page.locator(".CodeMirror").first.click()
    page.keyboard.press("Control+S")
    assert flow.versions.count() == 1
