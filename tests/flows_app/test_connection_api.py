"""Connection REST routes under /api/v1/: token auth, masking, ownership and the OpenAPI schema."""

from __future__ import annotations

import json
import warnings

import pytest
from django.test import Client

from flows_app.models import Connection
from flows_app.services import connection_create, connection_secrets_for_runner, connection_share

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


API = "/api/v1/connections"
KEY = "sk-api-test-key-424242"


def _api(user=None) -> Client:
    from accounts_app.services import token_create

    if user is None:
        return Client()
    token = token_create(user=user, name="tests").plaintext
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def _team(name: str = "core"):
    from accounts_app.models import Team

    return Team.objects.get(name=name)


def _json(client: Client, method: str, url: str, body: object | None = None):
    if body is None:
        return getattr(client, method)(url)
    return getattr(client, method)(url, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def conn(owner) -> Connection:
    """An OpenAI connection with an API key."""
    return connection_create(
        owner=owner,
        name="api_conn",
        type="open_ai",
        configs={"organization": "org-9"},
        secrets={"api_key": KEY},
    )


def test_create_returns_201_with_masked_secrets(owner):
    body = {"name": "made", "type": "open_ai", "configs": {"model": "gpt-4o"}, "secrets": {"api_key": KEY}}
    response = _json(_api(owner), "post", API, body)
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["secrets"] == {"api_key": "******"}
    assert data["configs"] == {"model": "gpt-4o"}
    assert data["owner"] == "owner"
    assert data["editable"] is True
    assert KEY not in response.content.decode()
    conn = Connection.objects.get(name="made")
    assert connection_secrets_for_runner(conn).secrets["api_key"] == KEY


def test_create_with_a_bad_field_is_422_naming_it(owner):
    response = _json(
        _api(owner), "post", API, {"name": "x", "type": "azure_open_ai", "secrets": {"api_key": KEY}}
    )
    assert response.status_code == 422
    assert "api_base" in response.json()["errors"]
    assert KEY not in response.content.decode()


def test_create_with_an_unknown_type_is_rejected_by_the_schema(owner):
    response = _json(_api(owner), "post", API, {"name": "x", "type": "gemini"})
    assert response.status_code == 422


def test_create_shared_with_a_team_by_name(owner, teammate):
    response = _json(_api(owner), "post", API, {"name": "team_conn", "type": "custom", "team": "core"})
    assert response.status_code == 201
    assert response.json()["team"] == "core"
    listed = _api(teammate).get(API).json()
    assert [c["name"] for c in listed] == ["team_conn"]
    assert listed[0]["editable"] is False


def test_create_shared_with_a_team_the_caller_is_not_in_is_422(owner, outsider, teammate):
    response = _json(_api(outsider), "post", API, {"name": "x", "type": "custom", "team": "core"})
    assert response.status_code == 422
    assert "team" in response.json()["errors"]


def test_list_and_get_mask_secrets(conn, owner):
    client = _api(owner)
    listed = client.get(API)
    assert listed.status_code == 200
    assert listed.json()[0]["secrets"] == {"api_key": "******"}
    one = client.get(f"{API}/api_conn")
    assert one.status_code == 200
    assert one.json()["configs"] == {"organization": "org-9"}
    assert KEY not in listed.content.decode() + one.content.decode()


def test_patch_with_masked_secret_keeps_it_and_replaces_configs(conn, owner):
    body = {"configs": {"model": "gpt-4o"}, "secrets": {"api_key": "******", "extra": "x-1"}}
    response = _json(_api(owner), "patch", f"{API}/api_conn", body)
    assert response.status_code == 200, response.content
    assert response.json()["secrets"] == {"api_key": "******", "extra": "******"}
    conn.refresh_from_db()
    assert conn.configs == {"model": "gpt-4o"}
    assert dict(connection_secrets_for_runner(conn).secrets) == {"api_key": KEY, "extra": "x-1"}


def test_patch_null_secret_removes_it_and_rename_works(conn, owner):
    response = _json(
        _api(owner), "patch", f"{API}/api_conn", {"name": "renamed", "secrets": {"api_key": None}}
    )
    assert response.status_code == 422  # an OpenAI connection needs its api_key
    response = _json(_api(owner), "patch", f"{API}/api_conn", {"name": "renamed"})
    assert response.json()["name"] == "renamed"
    assert _api(owner).get(f"{API}/api_conn").status_code == 404


def test_patch_team_shares_and_null_unshares(conn, owner, teammate):
    client = _api(owner)
    assert _json(client, "patch", f"{API}/api_conn", {"team": "core"}).json()["team"] == "core"
    assert _api(teammate).get(f"{API}/api_conn").status_code == 200
    assert _json(client, "patch", f"{API}/api_conn", {"team": None}).json()["team"] is None
    assert _api(teammate).get(f"{API}/api_conn").status_code == 404


def test_patch_without_team_leaves_sharing_alone(conn, owner, teammate):
    connection_share(connection=conn, team=_team(), by=owner)
    response = _json(_api(owner), "patch", f"{API}/api_conn", {"configs": {}})
    assert response.json()["team"] == "core"


def test_delete_returns_204(conn, owner):
    response = _api(owner).delete(f"{API}/api_conn")
    assert response.status_code == 204
    assert not Connection.objects.exists()


def test_writes_answer_without_ninjas_deprecated_tuple_returns(owner):
    client = _api(owner)
    body = {"name": "made", "type": "open_ai", "secrets": {"api_key": KEY}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert _json(client, "post", API, body).status_code == 201
        assert _json(client, "post", API, {**body, "name": "bad name!"}).status_code == 422
        assert _json(client, "patch", f"{API}/made", {"configs": {"model": "gpt-4o"}}).status_code == 200
        assert _json(client, "patch", f"{API}/made", {"secrets": {"api_key": None}}).status_code == 422
        assert client.delete(f"{API}/made").status_code == 204


def test_teammate_reads_and_tests_but_cannot_change_a_shared_connection(conn, owner, teammate, fake_llm):
    connection_update_to_fake(conn, owner, fake_llm)
    connection_share(connection=conn, team=_team(), by=owner)
    client = _api(teammate)
    assert client.get(f"{API}/api_conn").status_code == 200
    assert _json(client, "patch", f"{API}/api_conn", {"name": "hijacked"}).status_code == 403
    assert client.delete(f"{API}/api_conn").status_code == 403
    tested = client.post(f"{API}/api_conn/test")
    assert tested.status_code == 200
    assert tested.json()["ok"] is True
    assert Connection.objects.filter(name="api_conn").exists()


def connection_update_to_fake(conn: Connection, owner, fake_llm) -> None:
    """Point the connection at the fake LLM server."""
    from flows_app.services import connection_update

    connection_update(connection=conn, by=owner, configs={"base_url": fake_llm.base_url})


def test_outsider_gets_404_on_every_connection_route(conn, outsider):
    client = _api(outsider)
    assert client.get(API).json() == []
    responses = [
        client.get(f"{API}/api_conn"),
        _json(client, "patch", f"{API}/api_conn", {"name": "hijacked"}),
        client.delete(f"{API}/api_conn"),
        client.post(f"{API}/api_conn/test"),
    ]
    assert [r.status_code for r in responses] == [404, 404, 404, 404]
    conn.refresh_from_db()
    assert conn.name == "api_conn"


def test_anonymous_gets_401_on_every_connection_route(conn):
    client = _api()
    responses = [
        client.get(API),
        _json(client, "post", API, {"name": "x", "type": "custom"}),
        client.get(f"{API}/api_conn"),
        _json(client, "patch", f"{API}/api_conn", {"name": "x"}),
        client.delete(f"{API}/api_conn"),
        client.post(f"{API}/api_conn/test"),
    ]
    assert [r.status_code for r in responses] == [401] * 6


def test_a_session_cookie_alone_does_not_authenticate_the_api(conn, owner):
    client = Client()
    client.force_login(owner)
    assert client.get(API).status_code == 401


def test_test_route_reports_ok_against_the_fake_llm(conn, owner, fake_llm):
    connection_update_to_fake(conn, owner, fake_llm)
    response = _api(owner).post(f"{API}/api_conn/test")
    assert response.json() == {
        "ok": True,
        "message": f"Connected to {fake_llm.base_url}: 2 model(s) available.",
    }


def test_test_route_reports_a_closed_port(owner):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    connection_create(
        owner=owner,
        name="down",
        type="openai_compatible",
        configs={"base_url": f"http://127.0.0.1:{port}/v1"},
    )
    data = _api(owner).post(f"{API}/down/test").json()
    assert data["ok"] is False
    assert data["message"].startswith(f"Could not connect to http://127.0.0.1:{port}/v1")


def test_openapi_schema_describes_every_connection_route(owner):
    schema = _api(owner).get("/api/v1/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/api/v1/connections"]) >= {"get", "post"}
    assert set(paths["/api/v1/connections/{name}"]) >= {"get", "patch", "delete"}
    assert "post" in paths["/api/v1/connections/{name}/test"]
    components = schema["components"]["schemas"]
    for name in ("ConnectionOut", "ConnectionIn", "ConnectionPatch", "TestOut", "ErrorOut"):
        assert name in components
    assert components["ConnectionIn"]["properties"]["type"]["enum"] == [
        "open_ai",
        "azure_open_ai",
        "openai_compatible",
        "custom",
    ]
