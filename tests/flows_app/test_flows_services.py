"""Flow services: create, templates, file operations as versions, clone, trash, and the selectors."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.http import Http404
from django.test.utils import CaptureQueriesContext

from flowengine import load_flow, validate
from flows_app.models import Flow, FlowVersion
from flows_app.selectors import flow_get_for, flow_list_for, flow_version_get_for, flow_versions_for
from flows_app.services import (
    FLOW_TEMPLATES,
    FlowPathError,
    flow_clone,
    flow_create,
    flow_create_from_template,
    flow_delete,
    flow_file_delete,
    flow_file_rename,
    flow_file_save,
    flow_files_upload,
    flow_purge,
    flow_restore,
    flow_update,
    snapshot_files,
    snapshot_materialize,
)

pytestmark = pytest.mark.django_db

DAG = b"inputs:\n  q: {type: string}\noutputs:\n  a: {type: string, reference: '${echo.output}'}\nnodes:\n- name: echo\n  type: python\n  source: {type: code, path: echo.py}\n  inputs: {x: '${inputs.q}'}\n"
ECHO = b"from promptflow import tool\n\n@tool\ndef echo(x: str) -> str:\n    return x\n"


@pytest.fixture
def flow(owner) -> Flow:
    """A small DAG flow owned by `owner`, at version 1."""
    return flow_create(owner=owner, name="echo", files={"flow.dag.yaml": DAG, "echo.py": ECHO})


def _files(flow: Flow) -> dict[str, bytes]:
    flow.refresh_from_db()
    return snapshot_files(snapshot=flow.head.snapshot)


def test_create_makes_version_one_with_author_and_kind(owner, flow):
    assert flow.head.number == 1
    assert flow.head.author == owner
    assert flow.kind == "dag"
    assert _files(flow) == {"flow.dag.yaml": DAG, "echo.py": ECHO}


def test_name_is_unique_per_owner_among_live_flows(owner, flow):
    with pytest.raises(ValidationError, match="already have a flow named 'echo'"):
        flow_create(owner=owner, name="echo", files={})
    flow_delete(flow=flow, user=owner)
    assert flow_create(owner=owner, name="echo", files={}).name == "echo"


@pytest.mark.parametrize("template", FLOW_TEMPLATES)
def test_every_template_creates_a_valid_flow(owner, template, tmp_path):
    made = flow_create_from_template(owner=owner, name=f"from {template}", template=template)
    assert made.kind == {"flex": "flex", "prompty": "prompty"}.get(template, "dag")
    folder = snapshot_materialize(snapshot_sha=made.head.snapshot.sha256, root=tmp_path)
    assert validate(load_flow(folder)) == []
    assert not any("__pycache__" in path for path in made.head.snapshot.manifest)


def test_unknown_template_is_refused(owner):
    with pytest.raises(ValidationError, match="Unknown template 'nope'"):
        flow_create_from_template(owner=owner, name="x", template="nope")
    assert not Flow.objects.exists()


def test_file_save_makes_a_new_version_keeping_the_others(owner, flow):
    version = flow_file_save(
        flow=flow, user=owner, path="echo.py", content=b"# v2\n", based_on=1, message="tweak"
    )
    assert (version.number, version.message, version.based_on.number) == (2, "tweak", 1)
    assert _files(flow) == {"flow.dag.yaml": DAG, "echo.py": b"# v2\n"}
    assert FlowVersion.objects.filter(flow=flow).count() == 2


def test_rename_and_delete_of_files_and_folders(owner, flow):
    flow_files_upload(
        flow=flow, user=owner, files={"a.txt": b"A", "sub/b.txt": b"B"}, folder="docs", based_on=1
    )
    flow_file_rename(flow=flow, user=owner, path="docs", new_path="notes", based_on=2)
    assert set(_files(flow)) == {"flow.dag.yaml", "echo.py", "notes/a.txt", "notes/sub/b.txt"}
    flow_file_rename(flow=flow, user=owner, path="notes/a.txt", new_path="a.txt", based_on=3)
    flow_file_delete(flow=flow, user=owner, path="notes", based_on=4)
    assert _files(flow) == {"flow.dag.yaml": DAG, "echo.py": ECHO, "a.txt": b"A"}
    assert flow.head.number == 5


def test_rename_onto_an_existing_file_is_refused(owner, flow):
    with pytest.raises(FlowPathError, match="'echo.py' already exists"):
        flow_file_rename(flow=flow, user=owner, path="flow.dag.yaml", new_path="echo.py", based_on=1)
    assert flow.versions.count() == 1


def test_deleting_a_missing_file_names_it(owner, flow):
    with pytest.raises(FlowPathError, match="no file or folder 'ghost.py'"):
        flow_file_delete(flow=flow, user=owner, path="ghost.py", based_on=1)


def test_saving_over_a_folder_is_refused(owner, flow):
    flow_files_upload(flow=flow, user=owner, files={"lib/x.py": b"x"}, based_on=1)
    with pytest.raises(FlowPathError, match="'lib' is a folder"):
        flow_file_save(flow=flow, user=owner, path="lib", content=b"", based_on=2)


def test_clone_shares_the_snapshot_and_belongs_to_the_cloner(owner, teammate, flow):
    from flows_app.services import flow_share

    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    clone = flow_clone(flow=flow, user=teammate)
    assert (clone.owner, clone.name, clone.head.number) == (teammate, "echo (copy)", 1)
    assert clone.head.snapshot_id == flow.head.snapshot_id


def test_trash_hides_a_flow_and_restore_brings_it_back(owner, flow):
    flow_delete(flow=flow, user=owner)
    assert not flow_list_for(owner).exists()
    assert list(flow_list_for(owner, trash=True)) == [flow]
    with pytest.raises(Http404):
        flow_get_for(owner, flow.pk)
    flow_create(owner=owner, name="echo", files={})
    restored = flow_restore(flow=flow_get_for(owner, flow.pk, include_trash=True), user=owner)
    assert restored.name == "echo (restored)"
    assert flow_get_for(owner, flow.pk).deleted_at is None


def test_a_trashed_flow_cannot_be_edited(owner, flow):
    flow_delete(flow=flow, user=owner)
    with pytest.raises(ValidationError, match="in the trash"):
        flow_file_save(flow=flow, user=owner, path="x.txt", content=b"", based_on=1)


def test_purge_deletes_only_from_the_trash(owner, flow):
    with pytest.raises(ValidationError, match="not in the trash"):
        flow_purge(flow=flow, user=owner)
    flow_delete(flow=flow, user=owner)
    flow_purge(flow=flow, user=owner)
    assert not Flow.objects.exists()


def test_only_the_owner_deletes(owner, teammate, flow):
    from flows_app.services import flow_share

    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    with pytest.raises(PermissionDenied):
        flow_delete(flow=flow, user=teammate)


def test_rename_flow_keeps_names_unique(owner, flow):
    other = flow_create(owner=owner, name="other", files={})
    with pytest.raises(ValidationError, match="already a flow named 'echo'"):
        flow_update(flow=other, user=owner, name="echo")
    assert flow_update(flow=other, user=owner, name="renamed", description="d").name == "renamed"


def test_list_and_history_do_not_query_per_row(owner):
    for index in range(5):
        made = flow_create(owner=owner, name=f"f{index}", files={"a.txt": b"%d" % index})
        for number in range(1, 4):
            flow_file_save(flow=made, user=owner, path="a.txt", content=b"v%d" % number, based_on=number)
    with CaptureQueriesContext(connection) as list_queries:
        rows = [
            (f.name, f.role, f.head.number, f.head.author.username, f.owner.username)
            for f in flow_list_for(owner)
        ]
    assert len(rows) == 5
    assert len(list_queries) <= 2
    with CaptureQueriesContext(connection) as history_queries:
        history = [
            (v.number, v.author.username, v.based_on.number if v.based_on else None, v.snapshot.file_count)
            for v in flow_versions_for(owner, made.pk)
        ]
    assert [row[0] for row in history] == [4, 3, 2, 1]
    assert len(history_queries) <= 4


def test_version_selector_defaults_to_the_head(owner, flow):
    flow_file_save(flow=flow, user=owner, path="echo.py", content=b"#", based_on=1)
    assert flow_version_get_for(owner, flow.pk).number == 2
    assert flow_version_get_for(owner, flow.pk, 1).number == 1
    with pytest.raises(Http404):
        flow_version_get_for(owner, flow.pk, 9)
