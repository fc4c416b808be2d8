"""The deployment and endpoint REST routes in-process: errors name the field, others' endpoints are 404."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.test import Client

from accounts_app.services import token_create
from flows_app.services import files_from_folder, flow_create

pytestmark = pytest.mark.django_db

FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"


@pytest.fixture(autouse=True)
def _private_data_dir(settings, tmp_path):
    """Deploying materialises snapshots under DATA_DIR: keep them out of the developer's data folder."""
    settings.DATA_DIR = tmp_path


def _api(user) -> Client:
    token = token_create(user=user, name="api tests").plaintext
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def _post(client: Client, path: str, body: dict) -> object:
    return client.post(f"/api/v1{path}", json.dumps(body), content_type="application/json")


@pytest.fixture
def flow(owner):
    """The owner's `dag_basic` flow."""
    return flow_create(owner=owner, name="basic", files=files_from_folder(root=FLOWS / "dag_basic"))


def test_deploy_a_flow_version_then_list_show_and_patch(owner, flow):
    client = _api(owner)
    created = _post(client, "/deployments", {"flow": "basic@1", "endpoint": "basic-ep", "deployment": "blue"})
    assert created.status_code == 201
    body = created.json()
    assert set(body["keys"]) == {"primary", "secondary"}
    assert body["endpoint"]["scoring_uri"] == "http://testserver/endpoints/basic-ep/score"
    assert body["deployment"]["flow_version"] == 1 and body["deployment"]["run"] is None
    listed = client.get("/api/v1/endpoints").json()
    assert [e["name"] for e in listed] == ["basic-ep"]
    # Key prefixes only, never the keys.
    assert listed[0]["key_prefixes"]["primary"] == body["keys"]["primary"][:10]
    assert body["keys"]["primary"] not in json.dumps(listed)
    patched = client.patch(
        "/api/v1/endpoints/basic-ep", json.dumps({"disabled": True}), content_type="application/json"
    )
    assert patched.json()["disabled"] is True


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"flow": "basic", "endpoint": "No"}, 422, "endpoint"),
        ({"flow": "basic", "endpoint": "basic-ep", "deployment": "x"}, 422, "deployment"),
        ({"flow": "basic", "endpoint": "basic-ep", "new_endpoint": False}, 404, "endpoint"),
        ({"flow": "basic", "endpoint": "basic-ep", "instance_count": 99}, 422, "instance_count"),
        ({"flow": "basic", "endpoint": "basic-ep", "outputs": ["nope"]}, 422, "outputs"),
        ({"flow": "nope", "endpoint": "basic-ep"}, 422, "flow"),
    ],
)
def test_bad_deployments_name_the_field(owner, flow, payload, status, field):
    resp = _post(_api(owner), "/deployments", payload)
    assert resp.status_code == status, resp.content
    assert field in resp.json()["errors"]


def test_regenerate_returns_the_new_key_and_outsiders_get_404(owner, outsider, flow):
    client = _api(owner)
    keys = _post(client, "/deployments", {"flow": "basic", "endpoint": "basic-ep"}).json()["keys"]
    new = _post(client, "/endpoints/basic-ep/keys/regenerate", {"key_type": "secondary"}).json()
    assert new["key_type"] == "secondary" and new["key"] not in keys.values()
    stranger = _api(outsider)
    assert stranger.get("/api/v1/endpoints/basic-ep").status_code == 404
    assert _post(stranger, "/endpoints/basic-ep/keys/regenerate", {"key_type": "primary"}).status_code == 404
    assert stranger.delete("/api/v1/endpoints/basic-ep/deployments/blue").status_code == 404
    assert client.delete("/api/v1/endpoints/basic-ep").status_code == 204
    assert client.get("/api/v1/endpoints/basic-ep").status_code == 404


def test_an_endpoint_key_is_not_an_api_token(owner, flow):
    keys = _post(_api(owner), "/deployments", {"flow": "basic", "endpoint": "basic-ep"}).json()["keys"]
    resp = Client(HTTP_AUTHORIZATION=f"Bearer {keys['primary']}").get("/api/v1/endpoints")
    assert resp.status_code == 401
