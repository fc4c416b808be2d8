"""Connection pages: allowed, forbidden, anonymous and htmx paths of each view."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from flows_app.models import Connection
from flows_app.services import connection_create, connection_secrets_for_runner, connection_share

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


KEY = "sk-view-test-key-000111"
HTMX = {"HTTP_HX_REQUEST": "true"}


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _team(name: str = "core"):
    from accounts_app.models import Team

    return Team.objects.get(name=name)


@pytest.fixture
def conn(owner) -> Connection:
    """An OpenAI connection of the owner with an API key and one custom secret and config."""
    return connection_create(
        owner=owner,
        name="view_conn",
        type="open_ai",
        configs={"organization": "org-1", "region": "eu"},
        secrets={"api_key": KEY, "extra": "extra-view-secret-222"},
    )


@pytest.fixture
def shared(conn, owner, teammate) -> Connection:
    """The owner's connection, shared with the team the teammate is in."""
    return connection_share(connection=conn, team=_team(), by=owner)


def _form(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "new_conn",
        "type": "open_ai",
        "base_url": "",
        "api_version": "",
        "organization": "",
        "model": "",
        "api_key": "sk-form-key-333444",
        "team": "",
        "config_key": ["", ""],
        "config_value": ["", ""],
        "secret_key": ["", ""],
        "secret_value": ["", ""],
    }
    data.update(overrides)
    return data


# --- anonymous and outsider on every URL -----------------------------------------------------------

PK_URLS = [
    ("connections:detail", "get"),
    ("connections:edit", "get"),
    ("connections:edit", "post"),
    ("connections:delete", "get"),
    ("connections:delete", "post"),
    ("connections:test", "post"),
]


def test_anonymous_is_redirected_to_login_from_every_page(conn):
    urls = [(reverse(name, kwargs={"pk": conn.pk}), method) for name, method in PK_URLS]
    urls += [
        (reverse("connections:list"), "get"),
        (reverse("connections:new"), "get"),
        (reverse("connections:new"), "post"),
    ]
    for url, method in urls:
        for headers in ({}, HTMX):
            response = getattr(_client(), method)(url, **headers)
            # htmx requests get the login page through HX-Redirect, so the whole page navigates.
            target = response.get("HX-Redirect") if headers else response.get("Location")
            assert response.status_code == (200 if headers else 302), (method, url, headers)
            assert (target or "").startswith(reverse("login")), (method, url, headers)


def test_outsider_gets_404_for_every_connection_url_with_or_without_htmx(conn, outsider):
    client = _client(outsider)
    for name, method in PK_URLS:
        for headers in ({}, HTMX):
            response = getattr(client, method)(reverse(name, kwargs={"pk": conn.pk}), **headers)
            assert response.status_code == 404, (name, method, headers)
    conn.refresh_from_db()
    assert conn.name == "view_conn"


# --- list ------------------------------------------------------------------------------------------


def test_list_shows_own_connections_with_their_endpoint(conn, owner):
    response = _client(owner).get(reverse("connections:list"))
    assert response.status_code == 200
    assert "view_conn" in response.content.decode()
    assert KEY not in response.content.decode()


def test_list_shows_shared_connections_to_teammates_without_edit_links(shared, teammate):
    body = _client(teammate).get(reverse("connections:list")).content.decode()
    assert "view_conn" in body
    assert reverse("connections:edit", kwargs={"pk": shared.pk}) not in body


def test_list_hides_connections_from_outsiders(conn, outsider):
    body = _client(outsider).get(reverse("connections:list")).content.decode()
    assert "view_conn" not in body
    assert "No connections yet" in body


def test_list_htmx_filter_returns_only_the_rows(conn, owner):
    connection_create(owner=owner, name="other_conn", type="custom")
    response = _client(owner).get(reverse("connections:list"), {"q": "other"}, **HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in body
    assert "other_conn" in body
    assert "view_conn" not in body


# --- new -------------------------------------------------------------------------------------------


def test_new_form_has_the_fields_the_browser_test_fills(owner):
    body = _client(owner).get(reverse("connections:new")).content.decode()
    for field in ("name", "type", "base_url", "api_version", "organization", "model", "api_key", "team"):
        assert f'name="{field}"' in body
    for field in ("config_key", "config_value", "secret_key", "secret_value"):
        assert f'name="{field}"' in body
    assert "csrfmiddlewaretoken" in body


def test_creating_stores_secrets_encrypted_and_redirects_to_the_connection(owner):
    data = _form(
        config_key=["region", ""], config_value=["eu", ""], secret_key=["tok", ""], secret_value=["t-1", ""]
    )
    response = _client(owner).post(reverse("connections:new"), data)
    conn = Connection.objects.get(owner=owner, name="new_conn")
    assert response.status_code == 302
    assert response["Location"] == reverse("connections:detail", kwargs={"pk": conn.pk})
    assert conn.configs == {"region": "eu"}
    assert dict(connection_secrets_for_runner(conn).secrets) == {
        "api_key": "sk-form-key-333444",
        "tok": "t-1",
    }


def test_creating_openai_compatible_stores_base_url_and_model(owner):
    data = _form(type="openai_compatible", base_url="http://localhost:11434/v1", model="llama3", api_key="")
    _client(owner).post(reverse("connections:new"), data)
    conn = Connection.objects.get(name="new_conn")
    assert conn.configs == {"base_url": "http://localhost:11434/v1", "model": "llama3"}
    assert conn.secret_names == []


def test_creating_azure_stores_the_url_as_api_base(owner):
    data = _form(type="azure_open_ai", base_url="https://res.openai.azure.com/", api_version="2024-10-21")
    _client(owner).post(reverse("connections:new"), data)
    conn = Connection.objects.get(name="new_conn")
    assert conn.configs["api_base"] == "https://res.openai.azure.com/"
    assert conn.configs["api_version"] == "2024-10-21"
    assert "base_url" not in conn.configs


def test_invalid_form_names_the_field_and_never_echoes_the_key(owner):
    response = _client(owner).post(
        reverse("connections:new"), _form(name="bad name", api_key="sk-echo-check-555")
    )
    body = response.content.decode()
    assert response.status_code == 422
    assert "Connection name &#x27;bad name&#x27; is invalid" in body
    assert "sk-echo-check-555" not in body
    assert not Connection.objects.exists()


def test_missing_base_url_for_openai_compatible_is_shown_on_that_field(owner):
    response = _client(owner).post(reverse("connections:new"), _form(type="openai_compatible", api_key=""))
    assert "needs base_url" in response.content.decode()


def test_duplicate_name_is_refused(conn, owner):
    response = _client(owner).post(reverse("connections:new"), _form(name="view_conn"))
    assert "already have a connection named" in response.content.decode()
    assert Connection.objects.filter(name="view_conn").count() == 1


def test_htmx_create_redirects_with_the_htmx_header(owner):
    response = _client(owner).post(reverse("connections:new"), _form(), **HTMX)
    conn = Connection.objects.get(name="new_conn")
    assert response["HX-Redirect"] == reverse("connections:detail", kwargs={"pk": conn.pk})


def test_htmx_invalid_create_returns_only_the_form(owner):
    response = _client(owner).post(reverse("connections:new"), _form(name=""), **HTMX)
    body = response.content.decode()
    assert response.status_code == 422
    assert "<html" not in body
    assert 'id="connection-form"' in body


def test_sharing_from_the_form_with_own_team(owner, teammate):
    team = _team()
    _client(owner).post(reverse("connections:new"), _form(team=str(team.pk)))
    assert Connection.objects.get(name="new_conn").team == team


def test_team_choices_are_only_the_users_teams(owner, teammate, outsider):
    from accounts_app.services import team_create

    foreign = team_create(name="foreign_team", created_by=outsider)
    body = _client(owner).get(reverse("connections:new")).content.decode()
    assert "core" in body
    assert "foreign_team" not in body
    response = _client(owner).post(reverse("connections:new"), _form(team=str(foreign.pk)))
    assert response.status_code == 422
    assert not Connection.objects.exists()


# --- detail ----------------------------------------------------------------------------------------


def test_detail_masks_secrets_for_the_owner(conn, owner):
    body = _client(owner).get(reverse("connections:detail", kwargs={"pk": conn.pk})).content.decode()
    assert "******" in body
    assert KEY not in body
    assert "extra-view-secret-222" not in body
    assert reverse("connections:edit", kwargs={"pk": conn.pk}) in body


def test_teammate_sees_a_shared_connection_read_only(shared, teammate):
    body = _client(teammate).get(reverse("connections:detail", kwargs={"pk": shared.pk})).content.decode()
    assert "read-only" in body
    assert reverse("connections:edit", kwargs={"pk": shared.pk}) not in body
    assert reverse("connections:test", kwargs={"pk": shared.pk}) in body


def test_teammate_gets_404_for_an_unshared_connection(conn, teammate):
    assert _client(teammate).get(reverse("connections:detail", kwargs={"pk": conn.pk})).status_code == 404


def test_detail_of_a_missing_connection_is_404(owner):
    url = reverse("connections:detail", kwargs={"pk": "00000000-0000-4000-8000-000000000000"})
    assert _client(owner).get(url).status_code == 404


# --- edit ------------------------------------------------------------------------------------------


def test_edit_form_never_contains_a_secret_value(conn, owner):
    body = _client(owner).get(reverse("connections:edit", kwargs={"pk": conn.pk})).content.decode()
    assert KEY not in body
    assert "extra-view-secret-222" not in body
    api_key_input = re.search(r"<input[^>]*name=\"api_key\"[^>]*>", body).group(0)
    assert "value=" not in api_key_input
    assert 'placeholder="******"' in api_key_input
    assert 'value="extra"' in body
    assert 'value="region"' in body


def _edit_data(**overrides: object) -> dict[str, object]:
    return (
        _form(
            name="view_conn",
            organization="org-1",
            api_key="",
            config_key=["region", ""],
            config_value=["eu", ""],
            secret_key=["extra", ""],
            secret_value=["", ""],
        )
        | overrides
    )


def test_edit_with_blank_secrets_keeps_the_stored_values(conn, owner):
    response = _client(owner).post(
        reverse("connections:edit", kwargs={"pk": conn.pk}), _edit_data(model="gpt-4o")
    )
    assert response.status_code == 302
    conn.refresh_from_db()
    assert conn.configs == {"organization": "org-1", "region": "eu", "model": "gpt-4o"}
    assert dict(connection_secrets_for_runner(conn).secrets) == {
        "api_key": KEY,
        "extra": "extra-view-secret-222",
    }


def test_edit_sets_a_new_key_and_removing_a_row_deletes_that_secret(conn, owner):
    data = _edit_data(api_key="sk-replaced-777", secret_key=["", ""])
    _client(owner).post(reverse("connections:edit", kwargs={"pk": conn.pk}), data)
    conn.refresh_from_db()
    assert dict(connection_secrets_for_runner(conn).secrets) == {"api_key": "sk-replaced-777"}


def test_edit_can_clear_the_api_key_of_an_openai_compatible_connection(owner):
    conn = connection_create(
        owner=owner,
        name="local",
        type="openai_compatible",
        configs={"base_url": "http://localhost:11434/v1"},
        secrets={"api_key": "ollama-key"},
    )
    data = _form(
        name="local",
        type="openai_compatible",
        base_url="http://localhost:11434/v1",
        api_key="",
        api_key_clear="on",
    )
    _client(owner).post(reverse("connections:edit", kwargs={"pk": conn.pk}), data)
    conn.refresh_from_db()
    assert conn.secret_names == []


def test_edit_renames_and_unshares(shared, owner, teammate):
    _client(owner).post(
        reverse("connections:edit", kwargs={"pk": shared.pk}), _edit_data(name="renamed", team="")
    )
    shared.refresh_from_db()
    assert shared.name == "renamed"
    assert shared.team is None


def test_teammate_cannot_edit_a_shared_connection(shared, teammate):
    url = reverse("connections:edit", kwargs={"pk": shared.pk})
    assert _client(teammate).get(url).status_code == 403
    assert _client(teammate).post(url, _edit_data(name="hijacked")).status_code == 403
    shared.refresh_from_db()
    assert shared.name == "view_conn"


def test_htmx_edit_with_an_error_returns_the_form_fragment(conn, owner):
    response = _client(owner).post(
        reverse("connections:edit", kwargs={"pk": conn.pk}), _edit_data(base_url="not a url"), **HTMX
    )
    body = response.content.decode()
    assert response.status_code == 422
    assert "<html" not in body
    assert "is not an http(s) URL" in body


# --- delete ----------------------------------------------------------------------------------------


def test_delete_asks_for_confirmation_then_deletes(conn, owner):
    url = reverse("connections:delete", kwargs={"pk": conn.pk})
    client = _client(owner)
    assert "Delete connection" in client.get(url).content.decode()
    assert Connection.objects.filter(pk=conn.pk).exists()
    response = client.post(url)
    assert response.status_code == 302
    assert response["Location"] == reverse("connections:list")
    assert not Connection.objects.filter(pk=conn.pk).exists()


def test_htmx_delete_redirects_to_the_list(conn, owner):
    response = _client(owner).post(reverse("connections:delete", kwargs={"pk": conn.pk}), **HTMX)
    assert response["HX-Redirect"] == reverse("connections:list")
    assert not Connection.objects.exists()


def test_teammate_cannot_delete_a_shared_connection(shared, teammate):
    response = _client(teammate).post(reverse("connections:delete", kwargs={"pk": shared.pk}))
    assert response.status_code == 403
    assert Connection.objects.filter(pk=shared.pk).exists()


# --- test connection -------------------------------------------------------------------------------


@pytest.fixture
def local(owner, fake_llm) -> Connection:
    """An OpenAI-compatible connection to the fake LLM server, shared with the owner's team."""
    conn = connection_create(
        owner=owner,
        name="local",
        type="openai_compatible",
        configs={"base_url": fake_llm.base_url},
        secrets={"api_key": "sk-local-888"},
    )
    return conn


def test_htmx_test_button_swaps_in_the_outcome(local, owner):
    response = _client(owner).post(reverse("connections:test", kwargs={"pk": local.pk}), **HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in body
    assert "2 model(s) available" in body
    assert "sk-local-888" not in body


def test_test_without_htmx_renders_the_detail_page_with_the_outcome(local, owner):
    body = _client(owner).post(reverse("connections:test", kwargs={"pk": local.pk})).content.decode()
    assert "<html" in body
    assert "2 model(s) available" in body


def test_teammate_may_test_a_shared_connection(local, owner, teammate):
    connection_share(connection=local, team=_team(), by=owner)
    response = _client(teammate).post(reverse("connections:test", kwargs={"pk": local.pk}), **HTMX)
    assert "2 model(s) available" in response.content.decode()


def test_test_reports_a_closed_port(owner):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn = connection_create(
        owner=owner,
        name="down",
        type="openai_compatible",
        configs={"base_url": f"http://127.0.0.1:{port}/v1"},
    )
    body = _client(owner).post(reverse("connections:test", kwargs={"pk": conn.pk}), **HTMX).content.decode()
    assert f"Could not connect to http://127.0.0.1:{port}/v1" in body


def test_test_only_accepts_post(local, owner):
    assert _client(owner).get(reverse("connections:test", kwargs={"pk": local.pk})).status_code == 405


# --- CSRF ------------------------------------------------------------------------------------------


def test_posts_without_a_csrf_token_are_refused(conn, owner):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    for name in ("connections:new", "connections:edit", "connections:delete", "connections:test"):
        kwargs = {} if name == "connections:new" else {"pk": conn.pk}
        response = client.post(reverse(name, kwargs=kwargs), _form(name="csrf_conn"))
        assert response.status_code == 403, name
    assert Connection.objects.filter(pk=conn.pk, name="view_conn").exists()
    assert not Connection.objects.filter(name="csrf_conn").exists()
