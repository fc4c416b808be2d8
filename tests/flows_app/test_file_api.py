"""The file API refuses unsafe paths, stale saves and read-only users, and hides flows from outsiders."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from flows_app.models import Blob, FlowVersion, Snapshot
from flows_app.services import FlowPathError, flow_create, flow_file_save, flow_share, snapshot_files

pytestmark = pytest.mark.django_db


def _api(user=None) -> Client:
    from accounts_app.services import token_create

    if user is None:
        return Client()
    return Client(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='tests').plaintext}")


def _put(client: Client, flow_id: int, path: str, body: dict):
    return client.put(
        f"/api/v1/flows/{flow_id}/files/{path}", data=json.dumps(body), content_type="application/json"
    )


@pytest.fixture
def flow(owner):
    """A flow with one prompt file, at version 1."""
    return flow_create(
        owner=owner, name="files", files={"flow.dag.yaml": b"nodes: []\n", "prompt.jinja2": b"hi\n"}
    )


def _rows() -> tuple[int, int, int]:
    return Blob.objects.count(), Snapshot.objects.count(), FlowVersion.objects.count()


UNSAFE = {
    "../x": "traversal",
    "a/../../x": "traversal",
    "%2e%2e/x": "traversal",
    "..%2fx": "traversal",
    "..%5c..%5cx": "traversal",
    "%5c%5csrv%5cshare%5cx": "absolute",
    "/etc/passwd": "absolute",
    "C:%5cWindows": "absolute",
    "x%00.py": "nul",
    "a%5cb.txt": "backslash",
    "a//b.txt": "empty_segment",
    "%EF%BC%8E%EF%BC%8E/x": "traversal",
    "trailing.": "name",
}


@pytest.mark.parametrize("path", sorted(UNSAFE))
def test_saving_an_unsafe_path_gets_400_with_the_reason_and_writes_nothing(owner, flow, path):
    before = _rows()
    response = _put(_api(owner), flow.pk, path, {"based_on": 1, "content": "x"})
    assert response.status_code == 400, response.content
    assert response.json()["reason"] == UNSAFE[path]
    assert "File path" in response.json()["detail"]
    assert _rows() == before


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "x%00.py", "..%5cx"])
def test_reading_an_unsafe_path_gets_400(owner, flow, path):
    response = _api(owner).get(f"/api/v1/flows/{flow.pk}/files/{path}")
    assert response.status_code == 400
    assert response.json()["reason"] in {"traversal", "absolute", "nul"}


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "x\x00.py", "..\\..\\x", "C:\\x", "a//b", "．．/x"])
def test_services_refuse_the_same_paths(owner, flow, path):
    with pytest.raises(FlowPathError) as caught:
        flow_file_save(flow=flow, user=owner, path=path, content=b"x", based_on=1)
    assert caught.value.path == path
    assert _rows() == (2, 1, 1)


def test_a_folder_with_symlinks_is_refused_when_read_from_disk(tmp_path):
    from flows_app.services import files_from_folder

    (tmp_path / "flow.dag.yaml").write_text("nodes: []\n")
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(FlowPathError, match="'etc' is a symbolic link") as caught:
        files_from_folder(root=tmp_path)
    assert caught.value.reason == "link"


def test_symlink_in_an_uploaded_zip_is_refused_over_the_api(owner, flow):
    import io
    import stat
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("passwd")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    before = _rows()
    response = _api(owner).post(
        f"/api/v1/flows/{flow.pk}/import", data={"file": _upload(buffer.getvalue()), "based_on": "1"}
    )
    assert response.status_code == 400
    assert (response.json()["reason"], response.json()["entry"]) == ("link", "passwd")
    assert _rows() == before


def _upload(data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("flow.zip", data, content_type="application/zip")


def test_read_returns_bytes_and_the_version(owner, flow):
    response = _api(owner).get(f"/api/v1/flows/{flow.pk}/files/prompt.jinja2")
    assert (response.status_code, response.content, response["X-Flow-Version"]) == (200, b"hi\n", "1")
    assert _api(owner).get(f"/api/v1/flows/{flow.pk}/files/missing.txt").status_code == 404


def test_save_makes_a_version_and_a_stale_save_gets_409_with_the_head(owner, teammate, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    first = _put(
        _api(teammate), flow.pk, "prompt.jinja2", {"based_on": 1, "content": "theirs\n", "message": "m"}
    )
    assert first.status_code == 201
    assert (first.json()["number"], first.json()["author"], first.json()["based_on"]) == (2, "teammate", 1)
    before = _rows()
    stale = _put(_api(owner), flow.pk, "prompt.jinja2", {"based_on": 1, "content": "mine\n"})
    assert stale.status_code == 409
    assert stale.json()["head"]["number"] == 2
    assert stale.json()["head"]["author"] == "teammate"
    assert _rows() == before
    merged = _put(_api(owner), flow.pk, "prompt.jinja2", {"based_on": 2, "content": "mine\ntheirs\n"})
    assert merged.status_code == 201
    flow.refresh_from_db()
    assert snapshot_files(snapshot=flow.head.snapshot)["prompt.jinja2"] == b"mine\ntheirs\n"


def test_binary_content_is_saved_from_base64(owner, flow):
    response = _put(
        _api(owner), flow.pk, "logo.png", {"based_on": 1, "content": "iVBORw0KGgo=", "encoding": "base64"}
    )
    assert response.status_code == 201
    assert _api(owner).get(f"/api/v1/flows/{flow.pk}/files/logo.png").content == b"\x89PNG\r\n\x1a\n"
    bad = _put(_api(owner), flow.pk, "x.bin", {"based_on": 2, "content": "!!", "encoding": "base64"})
    assert bad.status_code == 422


def test_viewer_can_read_but_not_save_delete_or_import(owner, teammate, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    client = _api(teammate)
    before = _rows()
    assert client.get(f"/api/v1/flows/{flow.pk}/files/prompt.jinja2").status_code == 200
    assert _put(client, flow.pk, "prompt.jinja2", {"based_on": 1, "content": "x"}).status_code == 403
    assert client.delete(f"/api/v1/flows/{flow.pk}/files/prompt.jinja2?based_on=1").status_code == 403
    from flows_app.services import snapshot_zip

    upload = _upload(snapshot_zip(snapshot=flow.head.snapshot))
    assert client.post(f"/api/v1/flows/{flow.pk}/import", data={"file": upload}).status_code == 403
    assert client.delete(f"/api/v1/flows/{flow.pk}").status_code == 403
    assert _rows() == before


def test_outsider_gets_404_everywhere(outsider, flow):
    client = _api(outsider)
    sha = flow.head.snapshot_id
    for method, url in [
        ("get", f"/api/v1/flows/{flow.pk}"),
        ("get", f"/api/v1/flows/{flow.pk}/versions"),
        ("get", f"/api/v1/flows/{flow.pk}/versions/1/files"),
        ("get", f"/api/v1/flows/{flow.pk}/files/prompt.jinja2"),
        ("delete", f"/api/v1/flows/{flow.pk}/files/prompt.jinja2?based_on=1"),
        ("get", f"/api/v1/flows/{flow.pk}/export"),
        ("get", f"/api/v1/snapshots/{sha}/export"),
        ("get", f"/api/v1/flows/{flow.pk}/shares"),
        ("delete", f"/api/v1/flows/{flow.pk}"),
    ]:
        assert getattr(client, method)(url).status_code == 404, url
    assert _put(client, flow.pk, "prompt.jinja2", {"based_on": 1, "content": "x"}).status_code == 404
    assert client.post(f"/api/v1/flows/{flow.pk}/import", data={"file": _upload(b"PK")}).status_code == 404
    share = {"user": "outsider", "role": "editor"}
    response = client.post(
        f"/api/v1/flows/{flow.pk}/shares", data=json.dumps(share), content_type="application/json"
    )
    assert response.status_code == 404


def test_anonymous_gets_401(flow):
    assert Client().get(f"/api/v1/flows/{flow.pk}/files/prompt.jinja2").status_code == 401
    assert _put(Client(), flow.pk, "prompt.jinja2", {"based_on": 1, "content": "x"}).status_code == 401
