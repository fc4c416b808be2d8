"""The authoring pages: flow list, create, workspace, save and conflict, file operations, history, diff, sharing."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from django.urls import reverse

from flows_app.models import Flow
from flows_app.services import flow_create_from_template, flow_file_save, flow_share, snapshot_file_read

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def flow(owner):
    """A standard-template flow owned by `owner`, at version 1."""
    return flow_create_from_template(owner=owner, name="greeter", template="standard")


@pytest.fixture
def viewer(django_user_model, flow, owner):
    """A user the flow is shared with read-only."""
    user = django_user_model.objects.create_user(username="viewer", password="viewer-pass-123!")
    flow_share(flow=flow, by=owner, user=user, role="viewer")
    return user


@pytest.fixture
def editor(django_user_model, flow, owner):
    """A user the flow is shared with as editor."""
    user = django_user_model.objects.create_user(username="editor", password="editor-pass-123!")
    flow_share(flow=flow, by=owner, user=user, role="editor")
    return user


def url(name, flow=None, **kw):
    """The URL of a flows page, for a flow when given."""
    if flow is not None:
        kw["pk"] = flow.pk
    return reverse(f"flows:{name}", kwargs=kw)


def head_text(flow, path):
    """The text of one file at the flow's head."""
    flow.refresh_from_db()
    return snapshot_file_read(snapshot=flow.head.snapshot, path=path).decode()


# --- list, create, trash ------------------------------------------------------------------------------


def test_anonymous_is_sent_to_login_from_the_flow_list(client):
    response = client.get(url("list"))
    assert response.status_code == 302
    assert "/login" in response["Location"]


def test_flow_list_shows_own_and_shared_flows_and_filters_in_the_url(client, owner, flow, viewer):
    other = flow_create_from_template(owner=viewer, name="viewer's own", template="chat")
    client.force_login(viewer)
    page = client.get(url("list")).content.decode()
    assert "greeter" in page and "viewer&#x27;s own" in page
    shared = client.get(url("list"), {"scope": "shared"}).content.decode()
    assert "greeter" in shared and "viewer&#x27;s own" not in shared
    mine = client.get(url("list"), {"scope": "mine", "q": "own"}, **HTMX)
    assert mine.status_code == 200
    assert "<html" not in mine.content.decode()
    assert other.name.replace("'", "&#x27;") in mine.content.decode()


def test_outsider_sees_no_flows_of_others(client, outsider, flow):
    client.force_login(outsider)
    assert "greeter" not in client.get(url("list")).content.decode()


@pytest.mark.parametrize("template", ["standard", "chat", "evaluation", "flex", "prompty"])
def test_create_from_each_template_opens_the_workspace(client, owner, template):
    client.force_login(owner)
    response = client.post(url("new"), {"name": f"my {template}", "template": template})
    assert response.status_code == 302
    created = Flow.objects.get(name=f"my {template}")
    assert response["Location"] == url("detail", created)
    page = client.get(response["Location"])
    assert page.status_code == 200
    assert 'id="graph-main"' in page.content.decode()


def test_create_with_a_taken_name_shows_the_error(client, owner, flow):
    client.force_login(owner)
    response = client.post(url("new"), {"name": "greeter", "template": "standard"})
    assert response.status_code == 422
    assert "already have a flow named" in response.content.decode()


def test_delete_moves_to_trash_and_restore_brings_back(client, owner, flow):
    client.force_login(owner)
    row = f'data-flow="{flow.pk}"'
    assert client.post(url("delete", flow)).status_code == 302
    assert row not in client.get(url("list")).content.decode()
    assert "greeter" in client.get(url("trash")).content.decode()
    assert client.post(url("restore", flow)).status_code == 302
    assert row in client.get(url("list")).content.decode()


def test_viewer_cannot_delete_but_can_clone(client, flow, viewer):
    client.force_login(viewer)
    assert client.post(url("delete", flow)).status_code == 403
    response = client.post(url("clone", flow))
    assert response.status_code == 302
    assert Flow.objects.filter(owner=viewer, name="greeter (copy)").exists()


def test_zip_import_creates_a_flow_and_export_gives_the_same_bytes(client, owner, flow):
    client.force_login(owner)
    exported = client.get(url("download", flow))
    data = b"".join(exported.streaming_content)
    assert exported["Content-Type"] == "application/zip"
    upload = io.BytesIO(data)
    upload.name = "imported.zip"
    response = client.post(url("import"), {"archive": upload, "name": "imported"})
    assert response.status_code == 302
    imported = Flow.objects.get(name="imported")
    again = b"".join(client.get(url("download", imported)).streaming_content)
    assert again == data


def test_a_hostile_zip_is_refused_with_its_reason(client, owner):
    client.force_login(owner)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../evil.py", "x")
    buffer.seek(0)
    buffer.name = "evil.zip"
    response = client.post(url("import"), {"archive": buffer})
    assert response.status_code == 422
    assert ".." in response.content.decode()
    assert not Flow.objects.filter(owner=owner).exists()


# --- workspace -----------------------------------------------------------------------------------------


def test_outsider_gets_404_for_every_flow_page(client, outsider, flow):
    client.force_login(outsider)
    for name in ("detail", "file", "history", "diff", "share", "download", "graph"):
        assert client.get(url(name, flow)).status_code == 404, name
    save = {"path": "hello.jinja2", "content": "x", "based_on": 1}
    assert client.post(url("save", flow), save, **HTMX).status_code == 404


def test_anonymous_is_redirected_from_the_workspace(client, flow):
    response = client.get(url("detail", flow))
    assert response.status_code == 302 and "/login" in response["Location"]


def test_workspace_shows_tree_editor_graph_and_no_problems(client, owner, flow):
    client.force_login(owner)
    page = client.get(url("detail", flow)).content.decode()
    assert 'data-path="hello.jinja2"' in page
    assert 'data-path="flow.dag.yaml"' in page
    graph = json.loads(page.split('id="graph-main" type="application/json">')[1].split("</script>")[0])
    ids = {n["id"] for n in graph["nodes"]}
    assert {"input:text", "node:hello_prompt", "node:echo_my_prompt", "output:output_prompt"} <= ids
    assert "No problems found." in page
    assert 'hx-post="' + url("save", flow) in page


def test_file_fragment_for_htmx_returns_only_the_editor(client, owner, flow):
    client.force_login(owner)
    response = client.get(url("file", flow), {"file": "hello.py"}, **HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in body
    assert 'data-path="hello.py"' in body and "my_python_tool" in body


def test_save_makes_a_version_and_returns_the_refreshed_panes(client, owner, flow):
    client.force_login(owner)
    response = client.post(
        url("save", flow),
        {"path": "hello.jinja2", "content": "Say {{text}} twice.\r\n", "based_on": 1},
        **HTMX,
    )
    assert response.status_code == 200
    assert head_text(flow, "hello.jinja2") == "Say {{text}} twice.\n"
    assert flow.head.number == 2
    body = response.content.decode()
    assert 'hx-swap-oob="innerHTML"' in body and 'id="ws-version"' in body
    assert json.loads(response["HX-Trigger"])["flow-changed"]["version"] == 2


def test_stale_save_of_a_changed_file_shows_the_conflict_and_writes_nothing(client, owner, editor, flow):
    flow_file_save(flow=flow, user=editor, path="hello.jinja2", content=b"Theirs {{text}}\n", based_on=1)
    client.force_login(owner)
    response = client.post(
        url("save", flow), {"path": "hello.jinja2", "content": "Mine {{text}}\n", "based_on": 1}, **HTMX
    )
    assert response.status_code == 409
    assert response["HX-Retarget"] == "#ws-editor"
    body = response.content.decode()
    assert "Theirs {{text}}" in body and "Mine {{text}}" in body and "editor" in body
    assert head_text(flow, "hello.jinja2") == "Theirs {{text}}\n"
    assert flow.head.number == 2


def test_merge_with_conflict_markers_is_refused(client, owner, flow):
    client.force_login(owner)
    content = "<<<<<<< yours\na\n=======\nb\n>>>>>>> v2\n"
    response = client.post(
        url("save", flow), {"path": "hello.jinja2", "content": content, "based_on": 1, "merged": "on"}, **HTMX
    )
    assert response.status_code == 422
    assert "conflict markers" in response.content.decode()
    assert head_text(flow, "hello.jinja2") != content


def test_stale_save_of_an_unchanged_file_goes_on_top_of_the_head(client, owner, editor, flow):
    flow_file_save(flow=flow, user=editor, path="hello.py", content=b"# theirs\n", based_on=1)
    client.force_login(owner)
    response = client.post(
        url("save", flow), {"path": "hello.jinja2", "content": "mine\n", "based_on": 1}, **HTMX
    )
    assert response.status_code == 200
    assert head_text(flow, "hello.py") == "# theirs\n"
    assert head_text(flow, "hello.jinja2") == "mine\n"


def test_viewer_sees_read_only_workspace_and_the_server_refuses_writes(client, viewer, flow):
    client.force_login(viewer)
    page = client.get(url("detail", flow)).content.decode()
    assert url("save", flow) not in page
    assert url("file_add", flow) not in page
    assert url("upload", flow) not in page
    assert "data-readonly" in page
    posts = [
        ("save", {"path": "hello.jinja2", "content": "x", "based_on": 1}),
        ("file_add", {"path": "new.txt", "based_on": 1}),
        ("file_rename", {"path": "hello.py", "new_path": "x.py", "based_on": 1}),
        ("file_delete", {"path": "hello.py", "based_on": 1}),
    ]
    for name, data in posts:
        assert client.post(url(name, flow), data, **HTMX).status_code == 403, name
    upload = io.BytesIO(b"x")
    upload.name = "x.txt"
    assert client.post(url("upload", flow), {"files": upload, "based_on": 1}, **HTMX).status_code == 403
    archive = io.BytesIO(b"PK")
    archive.name = "a.zip"
    assert client.post(url("import_version", flow), {"archive": archive, "based_on": 1}).status_code == 403
    assert (
        client.post(
            url("structure_add", flow, what="input"), {"name": "q", "type": "string", "based_on": 1}
        ).status_code
        == 403
    )
    assert flow.versions.count() == 1


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("save", {}),
        ("file_add", {}),
        ("file_rename", {}),
        ("file_delete", {}),
        ("upload", {}),
        ("import_version", {}),
        ("structure_add", {"what": "input"}),
        ("structure_add", {"what": "node"}),
    ],
)
@pytest.mark.parametrize("htmx", [False, True])
def test_outsider_posting_an_empty_form_gets_404_not_the_form_refusal(
    client, outsider, flow, name, kwargs, htmx
):
    client.force_login(outsider)
    response = client.post(url(name, flow, **kwargs), {}, **(HTMX if htmx else {}))
    assert response.status_code == 404
    assert flow.versions.count() == 1


def test_add_rename_delete_and_upload_files(client, owner, flow):
    client.force_login(owner)
    assert (
        client.post(
            url("file_add", flow), {"based_on": 1}, HTTP_HX_PROMPT="notes/todo.md", **HTMX
        ).status_code
        == 200
    )
    response = client.post(
        url("file_rename", flow), {"path": "notes", "new_path": "docs", "based_on": 2}, **HTMX
    )
    assert response.status_code == 200
    assert head_text(flow, "docs/todo.md") == ""
    upload = io.BytesIO(b"print('hi')\n")
    upload.name = "tool.py"
    response = client.post(
        url("upload", flow),
        {"files": upload, "based_on": 3, "paths": json.dumps(["pkg/sub/tool.py"])},
        **HTMX,
    )
    assert response.status_code == 200
    assert head_text(flow, "pkg/sub/tool.py") == "print('hi')\n"
    assert client.post(url("file_delete", flow), {"path": "docs", "based_on": 4}, **HTMX).status_code == 200
    flow.refresh_from_db()
    assert not any(p.startswith("docs/") for p in flow.head.snapshot.manifest)


def test_a_traversal_path_is_refused_with_a_reason(client, owner, flow):
    client.force_login(owner)
    response = client.post(url("file_add", flow), {"based_on": 1}, HTTP_HX_PROMPT="../escape.py", **HTMX)
    assert response.status_code == 422
    assert response["HX-Retarget"] == "#ws-status"
    assert "leave its folder" in response.content.decode()


def test_file_and_folder_download(client, owner, flow):
    client.force_login(owner)
    response = client.get(url("file_download", flow), {"path": "hello.py"})
    assert b"my_python_tool" in b"".join(response.streaming_content)
    assert "attachment" in response["Content-Disposition"]
    flow_file_save(flow=flow, user=owner, path="lib/a.txt", content=b"A", based_on=1)
    data = b"".join(client.get(url("download", flow), {"folder": "lib"}).streaming_content)
    assert zipfile.ZipFile(io.BytesIO(data)).read("a.txt") == b"A"


# --- structured view ------------------------------------------------------------------------------------


def test_structured_view_adds_input_node_and_output_and_raw_mode_shows_them(client, owner, flow):
    client.force_login(owner)
    page = client.get(url("file", flow), {"mode": "structured"}, **HTMX).content.decode()
    assert "hello_prompt" in page and "Write a simple {{text}} program" in page
    response = client.post(
        url("structure_add", flow, what="input"),
        {"name": "lang", "type": "string", "default": "en", "based_on": 1},
        **HTMX,
    )
    assert response.status_code == 200
    node = {"name": "shout", "type": "python", "inputs": "text=${echo_my_prompt.output}", "based_on": 2}
    assert client.post(url("structure_add", flow, what="node"), node, **HTMX).status_code == 200
    output = {"name": "loud", "reference": "${shout.output}", "based_on": 3}
    response = client.post(url("structure_add", flow, what="output"), output, **HTMX)
    assert response.status_code == 200
    assert 'data-node="shout"' in response.content.decode()
    dag = head_text(flow, "flow.dag.yaml")
    assert "lang:" in dag and "name: shout" in dag and "reference: ${shout.output}" in dag
    assert "def shout" in head_text(flow, "shout.py")
    raw = client.get(url("file", flow), {"file": "flow.dag.yaml"}, **HTMX).content.decode()
    assert "name: shout" in raw
    graph = client.get(url("graph", flow)).json()
    assert {
        "source": "node:echo_my_prompt",
        "target": "node:shout",
        "kind": "data",
        "label": "text",
    } in graph["edges"]


def test_structured_edit_with_a_bad_name_is_refused(client, owner, flow):
    client.force_login(owner)
    response = client.post(
        url("structure_add", flow, what="input"), {"name": "text", "type": "string", "based_on": 1}, **HTMX
    )
    assert response.status_code == 422
    assert "already exists" in response.content.decode()


def test_problems_are_listed_with_their_file_and_line(client, owner, flow):
    dag = head_text(flow, "flow.dag.yaml").replace("${inputs.text}", "${inputs.missing}")
    flow_file_save(flow=flow, user=owner, path="flow.dag.yaml", content=dag.encode(), based_on=1)
    client.force_login(owner)
    page = client.get(url("detail", flow)).content.decode()
    assert 'data-open-file="flow.dag.yaml"' in page
    assert "missing" in page
    graph = client.get(url("graph", flow)).json()
    hello = next(n for n in graph["nodes"] if n["id"] == "node:hello_prompt")
    assert hello["problems"]


# --- history, diff, restore, sharing --------------------------------------------------------------------


def test_history_diff_and_restore(client, owner, flow):
    flow_file_save(flow=flow, user=owner, path="hello.jinja2", content=b"Changed {{text}}\n", based_on=1)
    client.force_login(owner)
    history = client.get(url("history", flow)).content.decode()
    assert "v2" in history and "owner" in history
    diff = client.get(url("diff", flow), {"a": 1, "b": 2}).content.decode()
    assert "hello.jinja2" in diff and "Changed {{text}}" in diff
    graph = json.loads(diff.split('id="graph-diff" type="application/json">')[1].split("</script>")[0])
    assert next(n for n in graph["nodes"] if n["id"] == "node:hello_prompt")["diff"] == "changed"
    assert client.post(url("restore_version", flow, number=1)).status_code == 302
    assert head_text(flow, "hello.jinja2").startswith("{# Replace")
    assert flow.head.number == 3


def test_an_old_version_opens_read_only(client, owner, flow):
    flow_file_save(flow=flow, user=owner, path="hello.jinja2", content=b"new\n", based_on=1)
    client.force_login(owner)
    page = client.get(url("detail", flow), {"version": 1, "file": "hello.jinja2"}).content.decode()
    assert "not the newest version" in page
    assert url("save", flow) not in page


def test_owner_shares_with_a_user_and_a_team_member_cannot_share(client, owner, teammate, flow):
    client.force_login(owner)
    response = client.post(url("share", flow), {"username": "teammate", "role": "editor"}, **HTMX)
    assert response.status_code == 200
    assert "teammate" in response.content.decode()
    client.force_login(teammate)
    assert client.get(url("detail", flow)).status_code == 200
    assert client.post(url("share", flow), {"username": "owner", "role": "editor"}).status_code == 403


def test_sharing_with_an_unknown_user_is_refused(client, owner, flow):
    client.force_login(owner)
    response = client.post(url("share", flow), {"username": "nobody", "role": "viewer"})
    assert response.status_code == 422
    assert "no user named" in response.content.decode()
