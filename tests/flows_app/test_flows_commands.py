"""manage.py import_flow: folders and zips become flows; unsafe input is refused with the reason."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from flows_app.models import Flow
from flows_app.services import flow_create, snapshot_files, snapshot_zip

pytestmark = pytest.mark.django_db


def test_imports_a_prompt_flow_folder_without_its_caches(owner, tmp_path):
    folder = tmp_path / "web_classify"
    (folder / ".promptflow").mkdir(parents=True)
    (folder / ".promptflow" / "flow.tools.json").write_text("{}")
    (folder / "flow.dag.yaml").write_text("nodes: []\n")
    out = io.StringIO()
    call_command("import_flow", str(folder), user="owner", stdout=out)
    flow = Flow.objects.get()
    assert "Imported 'web_classify'" in out.getvalue()
    assert snapshot_files(snapshot=flow.head.snapshot) == {"flow.dag.yaml": b"nodes: []\n"}


def test_imports_a_zip_under_a_given_name(owner, tmp_path):
    source = flow_create(owner=owner, name="source", files={"flow.flex.yaml": b"entry: a:b\n"})
    archive = tmp_path / "x.zip"
    archive.write_bytes(snapshot_zip(snapshot=source.head.snapshot))
    call_command("import_flow", str(archive), user="owner", name="from zip", stdout=io.StringIO())
    assert Flow.objects.get(name="from zip").head.snapshot_id == source.head.snapshot_id


def test_a_folder_with_a_symlink_is_refused(owner, tmp_path):
    (tmp_path / "flow.dag.yaml").write_text("nodes: []\n")
    (tmp_path / "secrets").symlink_to("/etc")
    with pytest.raises(CommandError, match="'secrets' is a symbolic link"):
        call_command("import_flow", str(tmp_path), user="owner")
    assert not Flow.objects.exists()


def test_unknown_user_and_missing_path_are_errors(owner, tmp_path):
    with pytest.raises(CommandError, match="no user named 'ghost'"):
        call_command("import_flow", str(tmp_path), user="ghost")
    with pytest.raises(CommandError, match="no such file or folder"):
        call_command("import_flow", str(tmp_path / "nope"), user="owner")
