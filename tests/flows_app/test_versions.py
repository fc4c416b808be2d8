"""Versions: stale saves are refused with the head, never overwriting; restore; diffs between versions."""

from __future__ import annotations

import pytest

from flows_app.models import Blob, FlowVersion, Snapshot
from flows_app.services import (
    FlowConflict,
    flow_create,
    flow_file_save,
    flow_restore_version,
    flow_save,
    flow_share,
    flow_version_diff,
    snapshot_files,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _data_dir(settings, tmp_path):
    """Diffs materialise snapshots under DATA_DIR: keep them out of the developer's data folder."""
    settings.DATA_DIR = tmp_path


DAG_V1 = b"""inputs:
  q: {type: string}
outputs:
  a: {type: string, reference: '${second.output}'}
nodes:
- name: first
  type: python
  source: {type: code, path: step.py}
  inputs: {x: '${inputs.q}'}
- name: second
  type: python
  source: {type: code, path: step.py}
  inputs: {x: '${first.output}'}
"""
DAG_V2 = b"""inputs:
  q: {type: string}
outputs:
  a: {type: string, reference: '${third.output}'}
nodes:
- name: second
  type: python
  source: {type: code, path: step.py}
  inputs: {x: '${inputs.q}'}
- name: third
  type: python
  source: {type: code, path: step.py}
  inputs: {x: '${second.output}'}
"""
STEP = b"from promptflow import tool\n\n@tool\ndef step(x: str) -> str:\n    return x\n"


@pytest.fixture
def flow(owner, teammate):
    """A DAG flow the teammate may edit too."""
    made = flow_create(
        owner=owner, name="shared", files={"flow.dag.yaml": DAG_V1, "step.py": STEP, "notes.md": b"a\n"}
    )
    flow_share(flow=made, by=owner, user=teammate, role="editor")
    return made


def _rows() -> tuple[int, int, int]:
    return Blob.objects.count(), Snapshot.objects.count(), FlowVersion.objects.count()


def test_stale_whole_folder_save_raises_conflict_with_the_head(owner, teammate, flow):
    flow_save(
        flow=flow,
        user=teammate,
        files={"flow.dag.yaml": DAG_V1, "step.py": STEP, "notes.md": b"theirs\n"},
        based_on=1,
    )
    before = _rows()
    with pytest.raises(FlowConflict) as caught:
        flow_save(
            flow=flow,
            user=owner,
            files={"flow.dag.yaml": DAG_V1, "step.py": STEP, "notes.md": b"mine\n"},
            based_on=1,
        )
    assert caught.value.head.number == 2
    assert caught.value.head.author == teammate
    assert "is at version 2 (saved by teammate)" in str(caught.value)
    assert _rows() == before


def test_conflict_on_one_file_then_merged_save_keeps_both_changes(owner, teammate, flow):
    flow_file_save(flow=flow, user=teammate, path="notes.md", content=b"a\nteammate line\n", based_on=1)
    with pytest.raises(FlowConflict) as caught:
        flow_file_save(flow=flow, user=owner, path="notes.md", content=b"owner line\na\n", based_on=1)
    head = caught.value.head
    theirs = snapshot_files(snapshot=head.snapshot)["notes.md"]
    merged = b"owner line\n" + theirs
    version = flow_file_save(flow=flow, user=owner, path="notes.md", content=merged, based_on=head.number)
    assert snapshot_files(snapshot=version.snapshot)["notes.md"] == b"owner line\na\nteammate line\n"
    assert [(v.number, v.author.username) for v in flow.versions.order_by("number")] == [
        (1, "owner"),
        (2, "teammate"),
        (3, "owner"),
    ]


def test_edits_of_different_files_from_the_same_base_both_apply(owner, teammate, flow):
    flow_file_save(flow=flow, user=teammate, path="notes.md", content=b"theirs\n", based_on=1)
    version = flow_file_save(flow=flow, user=owner, path="step.py", content=STEP + b"# mine\n", based_on=1)
    files = snapshot_files(snapshot=version.snapshot)
    assert (files["notes.md"], files["step.py"]) == (b"theirs\n", STEP + b"# mine\n")
    assert (version.number, version.based_on.number) == (3, 1)


def test_based_on_a_version_that_does_not_exist_is_a_conflict(owner, flow):
    with pytest.raises(FlowConflict):
        flow_file_save(flow=flow, user=owner, path="notes.md", content=b"x", based_on=7)


def test_restore_makes_a_new_version_equal_to_the_old_one(owner, flow):
    flow_file_save(flow=flow, user=owner, path="notes.md", content=b"b\n", based_on=1)
    version = flow_restore_version(flow=flow, user=owner, number=1)
    assert version.number == 3
    assert version.snapshot_id == flow.versions.get(number=1).snapshot_id
    assert version.message == "Restore version 1"


def test_stale_restore_is_a_conflict(owner, flow):
    flow_file_save(flow=flow, user=owner, path="notes.md", content=b"b\n", based_on=1)
    with pytest.raises(FlowConflict):
        flow_restore_version(flow=flow, user=owner, number=1, based_on=1)


def test_diff_lists_files_and_dag_nodes(owner, flow):
    flow_save(
        flow=flow,
        user=owner,
        files={"flow.dag.yaml": DAG_V2, "step.py": STEP, "extra.txt": b"new\n"},
        based_on=1,
    )
    diff = flow_version_diff(a=flow.versions.get(number=1), b=flow.versions.get(number=2))
    by_path = {item["path"]: item for item in diff["files"]}
    assert {path: item["status"] for path, item in by_path.items()} == {
        "extra.txt": "added",
        "flow.dag.yaml": "changed",
        "notes.md": "removed",
    }
    assert "-  a: {type: string, reference: '${second.output}'}" in by_path["flow.dag.yaml"]["unified_diff"]
    assert by_path["flow.dag.yaml"]["unified_diff"].startswith("--- a/flow.dag.yaml\n+++ b/flow.dag.yaml\n")
    assert diff["dag"]["nodes_added"] == ["third"]
    assert diff["dag"]["nodes_removed"] == ["first"]
    assert diff["dag"]["nodes_changed"] == [{"name": "second", "fields": ["inputs"]}]


def test_diff_of_identical_versions_is_empty(owner, flow):
    version = flow_restore_version(flow=flow, user=owner, number=1)
    diff = flow_version_diff(a=flow.versions.get(number=1), b=version)
    assert diff == {
        "files": [],
        "dag": {"nodes_added": [], "nodes_removed": [], "nodes_changed": [], "error": None},
    }


def test_diff_reports_an_unreadable_flow_file_instead_of_failing(owner, flow):
    version = flow_file_save(flow=flow, user=owner, path="flow.dag.yaml", content=b"nodes: [\n", based_on=1)
    diff = flow_version_diff(a=flow.versions.get(number=1), b=version)
    assert diff["files"][0]["status"] == "changed"
    assert "flow.dag.yaml" in diff["dag"]["error"]


def test_binary_files_are_marked_without_a_text_diff(owner, flow):
    version = flow_file_save(flow=flow, user=owner, path="logo.png", content=b"\x89PNG\x00\x01", based_on=1)
    diff = flow_version_diff(a=flow.versions.get(number=1), b=version)
    assert diff["files"] == [{"path": "logo.png", "status": "added", "unified_diff": "", "binary": True}]
