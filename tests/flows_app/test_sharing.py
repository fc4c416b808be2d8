"""Sharing: owner, editor, viewer and outsider see and may do exactly what their role allows."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404

from accounts_app.models import Team
from flows_app.models import Blob, Flow, FlowVersion, Snapshot
from flows_app.selectors import (
    flow_get_for,
    flow_list_for,
    flow_role_for,
    flow_version_get_for,
    snapshot_get_for,
)
from flows_app.services import (
    flow_clone,
    flow_create,
    flow_file_delete,
    flow_file_rename,
    flow_file_save,
    flow_files_upload,
    flow_import_zip,
    flow_restore_version,
    flow_save,
    flow_share,
    flow_unshare,
    snapshot_zip,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def flow(owner):
    """A flow owned by `owner`, not shared."""
    return flow_create(owner=owner, name="private", files={"flow.dag.yaml": b"nodes: []\n", "a.txt": b"a"})


def _rows() -> tuple[int, int, int, int]:
    return Blob.objects.count(), Snapshot.objects.count(), Flow.objects.count(), FlowVersion.objects.count()


def _edits(flow, user):
    zipped = snapshot_zip(snapshot=flow.head.snapshot)
    return {
        "save": lambda: flow_save(flow=flow, user=user, files={"b.txt": b"b"}, based_on=1),
        "file_save": lambda: flow_file_save(flow=flow, user=user, path="a.txt", content=b"x", based_on=1),
        "rename": lambda: flow_file_rename(flow=flow, user=user, path="a.txt", new_path="b.txt", based_on=1),
        "delete": lambda: flow_file_delete(flow=flow, user=user, path="a.txt", based_on=1),
        "upload": lambda: flow_files_upload(flow=flow, user=user, files={"c.txt": b"c"}, based_on=1),
        "import": lambda: flow_import_zip(owner=user, data=zipped, into=flow, based_on=1),
        "restore": lambda: flow_restore_version(flow=flow, user=user, number=1),
    }


def test_outsider_sees_nothing(outsider, flow):
    assert not flow_list_for(outsider).exists()
    assert flow_role_for(outsider, flow) is None
    for call in (
        lambda: flow_get_for(outsider, flow.pk),
        lambda: flow_version_get_for(outsider, flow.pk, 1),
        lambda: snapshot_get_for(outsider, flow.head.snapshot_id),
    ):
        with pytest.raises(Http404):
            call()


@pytest.mark.parametrize("action", ["save", "file_save", "rename", "delete", "upload", "import", "restore"])
def test_viewer_cannot_change_a_flow(owner, teammate, flow, action):
    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    before = _rows()
    with pytest.raises(PermissionDenied, match="shared with you read-only"):
        _edits(flow, teammate)[action]()
    assert _rows() == before


@pytest.mark.parametrize("action", ["save", "file_save", "rename", "delete", "upload", "import", "restore"])
def test_outsider_cannot_change_a_flow(outsider, flow, action):
    with pytest.raises(PermissionDenied, match="not shared with you"):
        _edits(flow, outsider)[action]()


@pytest.mark.parametrize("action", ["save", "file_save", "rename", "delete", "upload", "import", "restore"])
def test_editor_can_change_a_flow(owner, teammate, flow, action):
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    version = _edits(flow, teammate)[action]()
    assert (version.number, version.author) == (2, teammate)


def test_viewer_can_open_and_clone(owner, teammate, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    assert flow_get_for(teammate, flow.pk).role == "viewer"
    with pytest.raises(PermissionDenied):
        flow_get_for(teammate, flow.pk, edit=True)
    assert flow_clone(flow=flow, user=teammate).owner == teammate


def test_team_share_reaches_every_member_with_its_role(owner, teammate, flow):
    team = Team.objects.get(name="core")
    flow_share(flow=flow, by=owner, team=team, role="editor")
    assert flow_role_for(teammate, flow) == "editor"
    assert [f.role for f in flow_list_for(teammate)] == ["editor"]
    flow_unshare(flow=flow, by=owner, team=team)
    assert flow_role_for(teammate, flow) is None


def test_user_editor_share_wins_over_team_viewer_share(owner, teammate, flow):
    flow_share(flow=flow, by=owner, team=Team.objects.get(name="core"), role="viewer")
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    assert flow_get_for(teammate, flow.pk).role == "editor"
    assert flow_list_for(teammate).count() == 1


def test_filing_a_flow_under_a_team_lets_members_view(owner, teammate):
    team = Team.objects.get(name="core")
    made = flow_create(owner=owner, name="team flow", files={}, team=team)
    assert flow_role_for(teammate, made) == "viewer"
    assert flow_get_for(teammate, made.pk).role == "viewer"


def test_sharing_again_changes_the_role_and_unshare_is_idempotent(owner, teammate, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    assert flow.shares.count() == 1
    assert flow_role_for(teammate, flow) == "editor"
    flow_unshare(flow=flow, by=owner, user=teammate)
    flow_unshare(flow=flow, by=owner, user=teammate)
    assert flow_role_for(teammate, flow) is None


def test_only_the_owner_shares(owner, teammate, outsider, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    with pytest.raises(PermissionDenied):
        flow_share(flow=flow, by=teammate, user=outsider, role="viewer")


def test_sharing_with_a_team_you_are_not_in_is_refused(owner, outsider, flow):
    from accounts_app.services import team_create

    other = team_create(name="elsewhere", created_by=outsider)
    with pytest.raises(ValidationError, match="not a member of team 'elsewhere'"):
        flow_share(flow=flow, by=owner, team=other, role="viewer")


def test_share_needs_exactly_one_target_and_a_known_role(owner, teammate, flow):
    with pytest.raises(ValidationError, match="exactly one user or one team"):
        flow_share(flow=flow, by=owner, role="viewer")
    with pytest.raises(ValidationError, match="Unknown role 'admin'"):
        flow_share(flow=flow, by=owner, user=teammate, role="admin")


def test_trashed_shared_flow_disappears_for_others(owner, teammate, flow):
    from flows_app.services import flow_delete

    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    flow_delete(flow=flow, user=owner)
    assert not flow_list_for(teammate).exists()
    assert not flow_list_for(teammate, trash=True).exists()
    assert flow_role_for(teammate, flow) is None
