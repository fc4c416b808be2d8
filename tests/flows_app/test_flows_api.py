"""Flow REST routes: list, create, history, import, export, sharing, trash and the OpenAPI schema."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from flows_app.models import Flow
from flows_app.services import flow_create, flow_file_save, flow_share

pytestmark = pytest.mark.django_db


def _api(user=None) -> Client:
    from accounts_app.services import token_create

    if user is None:
        return Client()
    return Client(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='tests').plaintext}")


def _post(client: Client, url: str, body: dict):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def _zip(files: dict[str, bytes]) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return SimpleUploadedFile("flow.zip", buffer.getvalue(), content_type="application/zip")


@pytest.fixture
def flow(owner):
    """A two-version flow."""
    made = flow_create(owner=owner, name="api flow", files={"flow.dag.yaml": b"nodes: []\n"})
    flow_file_save(flow=made, user=owner, path="a.txt", content=b"a", based_on=1, message="add a")
    return made


def test_create_from_a_template_and_list(owner):
    response = _post(_api(owner), "/api/v1/flows", {"name": "chatty", "template": "chat"})
    assert response.status_code == 201
    body = response.json()
    assert (body["name"], body["kind"], body["role"], body["head"], body["owner"]) == (
        "chatty",
        "dag",
        "owner",
        1,
        "owner",
    )
    assert [row["name"] for row in _api(owner).get("/api/v1/flows").json()] == ["chatty"]


def test_create_from_files_and_refuse_bad_input(owner):
    client = _api(owner)
    assert (
        _post(client, "/api/v1/flows", {"name": "f", "files": {"x.prompty": "---\n---\n"}}).json()["kind"]
        == "prompty"
    )
    assert _post(client, "/api/v1/flows", {"name": "f"}).status_code == 422
    assert (
        _post(client, "/api/v1/flows", {"name": "g", "files": {"../x": ""}}).json()["reason"] == "traversal"
    )
    assert _post(client, "/api/v1/flows", {"name": "h", "template": "nope"}).status_code == 422


def test_search_and_trash_filters(owner, flow):
    flow_create(owner=owner, name="other", files={})
    client = _api(owner)
    assert [row["name"] for row in client.get("/api/v1/flows?q=api").json()] == ["api flow"]
    assert client.delete(f"/api/v1/flows/{flow.pk}").status_code == 204
    assert [row["name"] for row in client.get("/api/v1/flows").json()] == ["other"]
    trashed = client.get("/api/v1/flows?trash=true").json()
    assert [row["name"] for row in trashed] == ["api flow"]
    assert trashed[0]["deleted_at"] is not None


def test_history_and_files_of_a_version(owner, flow):
    client = _api(owner)
    history = client.get(f"/api/v1/flows/{flow.pk}/versions").json()
    assert [(v["number"], v["message"], v["based_on"], v["file_count"]) for v in history] == [
        (2, "add a", 1, 2),
        (1, "Create the flow", None, 1),
    ]
    files = client.get(f"/api/v1/flows/{flow.pk}/versions/1/files").json()
    assert [(f["path"], f["size"]) for f in files] == [("flow.dag.yaml", 10)]
    assert client.get(f"/api/v1/flows/{flow.pk}/versions/9/files").status_code == 404


def test_export_any_version_and_snapshot_byte_identically(owner, flow):
    client = _api(owner)
    head = client.get(f"/api/v1/flows/{flow.pk}/export")
    assert head["Content-Type"] == "application/zip"
    assert 'filename="api flow-v2.zip"' in head["Content-Disposition"]
    assert zipfile.ZipFile(io.BytesIO(head.content)).namelist() == ["a.txt", "flow.dag.yaml"]
    first = client.get(f"/api/v1/flows/{flow.pk}/export?version=1").content
    assert zipfile.ZipFile(io.BytesIO(first)).namelist() == ["flow.dag.yaml"]
    sha = flow.versions.get(number=1).snapshot_id
    assert client.get(f"/api/v1/snapshots/{sha}/export").content == first
    assert client.get("/api/v1/snapshots/" + "0" * 64 + "/export").status_code == 404


def test_upload_download_round_trip_is_byte_identical(owner, flow):
    client = _api(owner)
    exported = client.get(f"/api/v1/flows/{flow.pk}/export").content
    upload = SimpleUploadedFile("x.zip", exported, content_type="application/zip")
    created = client.post("/api/v1/flows/import", data={"file": upload, "name": "copy"})
    assert created.status_code == 201
    new_id = created.json()["flow"]["id"]
    assert client.get(f"/api/v1/flows/{new_id}/export").content == exported


def test_import_as_a_new_flow_unwraps_a_prompt_flow_folder(owner):
    upload = _zip(
        {"web_classify/flow.dag.yaml": b"nodes: []\n", "web_classify/.promptflow/flow.tools.json": b"{}"}
    )
    response = _api(owner).post("/api/v1/flows/import", data={"file": upload})
    assert response.status_code == 201
    assert response.json()["flow"]["name"] == "web_classify"
    assert response.json()["version"]["file_count"] == 1


def test_import_as_a_new_version_with_and_without_based_on(owner, flow):
    client = _api(owner)
    pushed = client.post(
        f"/api/v1/flows/{flow.pk}/import", data={"file": _zip({"flow.dag.yaml": b"nodes: []\n"})}
    )
    assert (pushed.status_code, pushed.json()["number"]) == (201, 3)
    stale = client.post(
        f"/api/v1/flows/{flow.pk}/import",
        data={"file": _zip({"b.txt": b"b"}), "based_on": "2", "message": "m"},
    )
    assert stale.status_code == 409
    assert stale.json()["head"]["number"] == 3


def test_hostile_upload_gets_400_naming_the_entry(owner):
    response = _api(owner).post("/api/v1/flows/import", data={"file": _zip({"../../evil.py": b"x"})})
    assert response.status_code == 400
    assert response.json()["entry"] == "../../evil.py"
    assert "../../evil.py" in response.json()["detail"]
    assert not Flow.objects.exists()


def test_oversized_upload_gets_413(owner, settings):
    settings.STUDIO_ZIP_MAX_BYTES = 1024
    upload = SimpleUploadedFile("big.zip", b"PK\x03\x04" + b"\0" * 4096)
    assert _api(owner).post("/api/v1/flows/import", data={"file": upload}).status_code == 413


def test_owner_shares_with_a_user_and_a_team(owner, teammate, flow):
    client = _api(owner)
    response = _post(client, f"/api/v1/flows/{flow.pk}/shares", {"user": "teammate", "role": "editor"})
    assert (response.status_code, response.json()) == (
        201,
        {"user": "teammate", "team": None, "role": "editor"},
    )
    assert _post(client, f"/api/v1/flows/{flow.pk}/shares", {"team": "core"}).status_code == 201
    assert _api(teammate).get(f"/api/v1/flows/{flow.pk}").json()["role"] == "editor"
    assert len(_api(teammate).get(f"/api/v1/flows/{flow.pk}/shares").json()) == 2
    assert client.delete(f"/api/v1/flows/{flow.pk}/shares?user=teammate").status_code == 204
    assert _api(teammate).get(f"/api/v1/flows/{flow.pk}").json()["role"] == "viewer"
    assert _post(client, f"/api/v1/flows/{flow.pk}/shares", {"user": "nobody"}).status_code == 422


def test_editor_cannot_share_or_delete(owner, teammate, outsider, flow):
    flow_share(flow=flow, by=owner, user=teammate, role="editor")
    client = _api(teammate)
    assert _post(client, f"/api/v1/flows/{flow.pk}/shares", {"user": "outsider"}).status_code == 403
    assert client.delete(f"/api/v1/flows/{flow.pk}").status_code == 403


def test_outsider_list_is_empty(outsider, flow):
    assert _api(outsider).get("/api/v1/flows").json() == []


def test_anonymous_gets_401(flow):
    assert Client().get("/api/v1/flows").status_code == 401
    assert Client().get(f"/api/v1/flows/{flow.pk}/export").status_code == 401


def test_openapi_documents_every_flow_route_with_schemas(owner):
    schema = _api(owner).get("/api/v1/openapi.json").json()
    paths = schema["paths"]
    for path in [
        "/api/v1/flows",
        "/api/v1/flows/import",
        "/api/v1/flows/{flow_id}",
        "/api/v1/flows/{flow_id}/versions",
        "/api/v1/flows/{flow_id}/versions/{number}/files",
        "/api/v1/flows/{flow_id}/files/{path}",
        "/api/v1/flows/{flow_id}/import",
        "/api/v1/flows/{flow_id}/export",
        "/api/v1/snapshots/{sha256}/export",
        "/api/v1/flows/{flow_id}/shares",
    ]:
        assert path in paths, path
    put = paths["/api/v1/flows/{flow_id}/files/{path}"]["put"]
    assert set(put["responses"]) >= {"201", "400", "403", "409"}
    assert "application/zip" in paths["/api/v1/flows/{flow_id}/export"]["get"]["responses"]["200"]["content"]
    assert {"FlowOut", "VersionOut", "ConflictOut", "RefusedOut", "FileSaveIn"} <= set(
        schema["components"]["schemas"]
    )
