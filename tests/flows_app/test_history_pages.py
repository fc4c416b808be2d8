"""The history page in pages of versions and the diff page of a long history: a fixed number of queries per
request, whatever the number of rows, and large diffs collapsed behind a "show full diff" link."""

from __future__ import annotations

import pytest
from django.template.loader import render_to_string
from django.urls import reverse

from flows_app import authoring, selectors
from flows_app.diffing import DiffRow, diff_table_html, rows_from_unified
from flows_app.services import flow_create, flow_file_save, flow_files_upload, flow_share

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
# Small pages keep the flow quick to build: three pages of versions, the last one short.
PER_PAGE = 3
VERSIONS = 8
DAG = b"""inputs:
  q: {type: string}
outputs:
  a: {type: string, reference: '${step.output}'}
nodes:
- name: step
  type: python
  source: {type: code, path: step.py}
  inputs: {x: '${inputs.q}'}
"""
STEP = b"from promptflow import tool\n\n\n@tool\ndef step(x: str) -> str:\n    return x\n"


@pytest.fixture(autouse=True)
def _data_dir(settings, tmp_path):
    """Diffs materialise snapshots under DATA_DIR: keep them out of the developer's data folder."""
    settings.DATA_DIR = tmp_path


@pytest.fixture(autouse=True)
def _small_pages(monkeypatch):
    """History pages of PER_PAGE rows instead of 50."""
    monkeypatch.setattr(selectors, "HISTORY_PER_PAGE", PER_PAGE)


@pytest.fixture
def long_flow(owner):
    """A DAG flow of VERSIONS versions: each save after the first appends a line to notes.md."""
    files = {"flow.dag.yaml": DAG, "step.py": STEP, "notes.md": b"# notes\n"}
    flow = flow_create(owner=owner, name="long", files=files)
    for number in range(1, VERSIONS):
        files["notes.md"] += f"line {number}\n".encode()
        flow_file_save(
            flow=flow,
            user=owner,
            path="notes.md",
            content=files["notes.md"],
            based_on=number,
            message=f"edit {number}",
        )
    flow.refresh_from_db()
    return flow


@pytest.fixture
def viewer(django_user_model, long_flow, owner):
    """A user the flow is shared with read-only."""
    user = django_user_model.objects.create_user(username="viewer", password="viewer-pass-123!")
    flow_share(flow=long_flow, by=owner, user=user, role="viewer")
    return user


def history(flow):
    """The URL of the flow's history page."""
    return reverse("flows:history", kwargs={"pk": flow.pk})


def diff(flow):
    """The URL of the flow's diff page."""
    return reverse("flows:diff", kwargs={"pk": flow.pk})


def shown(page: str) -> list[int]:
    """The version numbers of the history rows in a page, top to bottom."""
    return [int(part.split('"', 1)[0]) for part in page.split('<tr data-version="')[1:]]


# --- history: pages --------------------------------------------------------------------------------------


def test_history_first_page_holds_the_newest_versions_and_links_to_older(client, owner, long_flow):
    client.force_login(owner)
    page = client.get(history(long_flow)).content.decode()
    assert shown(page) == [8, 7, 6]
    assert f'href="{history(long_flow)}?page=2"' in page and "Older" in page
    assert "Newer" not in page
    assert "1–3 of 8 versions" in page and "Page 1 of 3" in page
    # The newest two are preselected for "Compare A → B"; the head is marked and cannot be restored.
    assert 'name="b" value="8" aria-label="Compare to v8" checked' in page
    assert 'name="a" value="7" aria-label="Compare from v7" checked' in page
    assert 'v8</a> <span class="badge badge-accent">head</span>' in page
    restore = reverse("flows:restore_version", kwargs={"pk": long_flow.pk, "number": 7})
    assert f'form="restore-form" formaction="{restore}" data-version="v7"' in page
    assert "/versions/8/restore" not in page
    assert 'id="restore-form" method="post"' in page and "csrfmiddlewaretoken" in page


def test_history_middle_page_links_to_newer_and_older_versions(client, owner, long_flow):
    client.force_login(owner)
    page = client.get(history(long_flow), {"page": 2}).content.decode()
    assert shown(page) == [5, 4, 3]
    assert f'href="{history(long_flow)}?page=1"' in page and f'href="{history(long_flow)}?page=3"' in page
    assert "4–6 of 8 versions" in page
    assert "owner" in page and "edit 4" in page


def test_history_last_page_holds_the_first_version_and_no_older_link(client, owner, long_flow):
    client.force_login(owner)
    page = client.get(history(long_flow), {"page": 3}).content.decode()
    assert shown(page) == [2, 1]
    assert "Newer" in page and "Older" not in page
    # Version 1 has nothing before it to compare with; the others link to their own changes.
    assert "?a=1&amp;b=2" in page and "?a=0&amp;b=1" not in page


def test_history_page_out_of_range_or_not_a_number_falls_back_to_a_real_page(client, owner, long_flow):
    client.force_login(owner)
    assert shown(client.get(history(long_flow), {"page": 99}).content.decode()) == [2, 1]
    assert shown(client.get(history(long_flow), {"page": "x"}).content.decode()) == [8, 7, 6]


def test_a_history_of_one_page_has_no_pager(client, owner):
    flow = flow_create(owner=owner, name="short", files={"flow.dag.yaml": DAG, "step.py": STEP})
    client.force_login(owner)
    page = client.get(history(flow)).content.decode()
    assert shown(page) == [1]
    assert 'name="a" value="1" aria-label="Compare from v1" checked' in page
    assert "Pages of the history" not in page


def test_history_pager_swaps_just_the_table_for_htmx_and_keeps_the_page_in_the_url(client, owner, long_flow):
    client.force_login(owner)
    page = client.get(history(long_flow)).content.decode()
    assert f'hx-get="{history(long_flow)}?page=2" hx-target="#history-versions"' in page
    assert 'hx-push-url="true"' in page
    fragment = client.get(history(long_flow), {"page": 3}, **HTMX)
    assert fragment.status_code == 200
    text = fragment.content.decode()
    assert "<html" not in text
    assert text.lstrip().startswith('<section class="card card-dense" id="history-versions"')
    assert shown(text) == [2, 1]
    assert f'hx-get="{history(long_flow)}?page=2"' in text


def test_viewer_pages_the_history_without_restore_buttons(client, viewer, long_flow):
    client.force_login(viewer)
    page = client.get(history(long_flow), {"page": 3}).content.decode()
    assert shown(page) == [2, 1]
    assert "Restore" not in page and "restore-form" not in page
    fragment = client.get(history(long_flow), {"page": 1}, **HTMX).content.decode()
    assert shown(fragment) == [8, 7, 6] and "restore-form" not in fragment


def test_outsider_gets_404_for_every_page_of_the_history(client, outsider, long_flow):
    client.force_login(outsider)
    assert client.get(history(long_flow)).status_code == 404
    assert client.get(history(long_flow), {"page": 2}, **HTMX).status_code == 404


def test_anonymous_is_sent_to_login_from_the_history_pages(client, long_flow):
    response = client.get(history(long_flow), {"page": 2})
    assert response.status_code == 302 and "/login" in response["Location"]
    fragment = client.get(history(long_flow), {"page": 2}, **HTMX)
    assert "/login" in fragment["HX-Redirect"]
    assert 'id="history-versions"' not in fragment.content.decode()


# --- queries do not grow with the rows -------------------------------------------------------------------


def test_a_full_history_page_takes_as_many_queries_as_a_page_of_one(
    client, owner, long_flow, django_assert_max_num_queries
):
    client.force_login(owner)
    single = flow_create(owner=owner, name="single", files={"flow.dag.yaml": DAG, "step.py": STEP})
    client.get(history(single))
    with django_assert_max_num_queries(7) as one:
        client.get(history(single))
    # A query per row (author, snapshot, based-on version) would add PER_PAGE - 1 queries or more.
    with django_assert_max_num_queries(len(one.captured_queries)):
        assert len(shown(client.get(history(long_flow), {"page": 2}).content.decode())) == PER_PAGE


def test_diff_page_takes_the_same_queries_whatever_the_number_of_changed_files(
    client, owner, long_flow, django_assert_max_num_queries
):
    files = {f"prompts/p{n}.jinja2": f"prompt {n}\n".encode() for n in range(6)}
    flow_files_upload(flow=long_flow, user=owner, files=files, based_on=VERSIONS, message="prompts")
    client.force_login(owner)
    client.get(diff(long_flow), {"a": 1, "b": VERSIONS + 1})  # materialises both snapshots once
    with django_assert_max_num_queries(7):
        page = client.get(diff(long_flow), {"a": 1, "b": VERSIONS + 1}).content.decode()
    assert page.count('class="card card-dense diff-file" open') == 7
    assert f"line {VERSIONS - 1}" in page and "prompt 5" in page
    assert '<option value="1" selected>v1</option>' in page
    assert f'<option value="{VERSIONS + 1}" selected>v{VERSIONS + 1}</option>' in page


# --- large diffs -----------------------------------------------------------------------------------------


def test_a_diff_larger_than_the_page_budget_is_collapsed_behind_a_show_full_link(
    client, owner, long_flow, monkeypatch
):
    monkeypatch.setattr(authoring, "DIFF_PAGE_ROWS", 4)
    client.force_login(owner)
    page = client.get(diff(long_flow), {"a": 1, "b": VERSIONS}).content.decode()
    assert "line 7" not in page
    assert "Large diff (" in page and "1 large diff collapsed." in page
    assert f'href="{diff(long_flow)}?a=1&amp;b={VERSIONS}&amp;full=1#file-1"' in page
    full = client.get(diff(long_flow), {"a": 1, "b": VERSIONS, "full": 1}).content.decode()
    assert "line 7" in full and "Large diff (" not in full


def test_a_small_diff_is_shown_open_without_the_show_full_link(client, owner, long_flow):
    client.force_login(owner)
    page = client.get(diff(long_flow)).content.decode()
    assert f"line {VERSIONS - 1}" in page
    assert "full=1" not in page
    assert 'class="card card-dense diff-file" open id="file-1" data-path="notes.md"' in page


def test_the_diff_table_built_in_python_is_the_templates_markup():
    rows = [
        DiffRow("hunk", "@@ -1,2 +1,2 @@"),
        DiffRow("ctx", "same <b>", 1, 1),
        DiffRow("del", "old 'a' & \"b\"", old_no=2),
        DiffRow("add", "<script>x</script>", new_no=2),
    ]
    template = render_to_string("flows_app/_diff_table.html", {"rows": rows})
    assert str(diff_table_html(rows)).strip() == template.strip()
    assert (
        str(diff_table_html([])).strip()
        == render_to_string("flows_app/_diff_table.html", {"rows": []}).strip()
    )
    assert diff_table_html(rows_from_unified("@@ -1 +1 @@\n-a\n+b\n")).count("<tr") == 3
