"""Personal access tokens: stored hashed, shown once, revocable, and accepted by the REST API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from accounts_app.models import ApiToken
from accounts_app.services import hash_token, token_create, token_revoke

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_only_the_hash_and_a_short_prefix_are_stored(owner):
    created = token_create(user=owner, name="laptop")

    field_names = {field.name for field in ApiToken._meta.get_fields()}
    assert "token" not in field_names and "plaintext" not in field_names
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        stored = " ".join(str(value) for row in cursor.fetchall() for value in row)
    assert created.plaintext not in stored
    assert hash_token(created.plaintext) in stored
    assert created.token.prefix == created.plaintext[:12]
    assert len(created.plaintext) > 40


def test_me_answers_with_the_tokens_user(client, owner):
    created = token_create(user=owner, name="cli")

    response = client.get("/api/v1/me", headers=bearer(created.plaintext))

    assert response.status_code == 200
    assert response.json()["username"] == "owner"


def test_me_lists_the_users_teams(client, owner, teammate):
    created = token_create(user=teammate, name="cli")

    response = client.get("/api/v1/me", headers=bearer(created.plaintext))

    assert response.json()["teams"] == ["core"]


def test_anonymous_and_unknown_tokens_get_401(client, owner):
    assert client.get("/api/v1/me").status_code == 401
    assert client.get("/api/v1/me", headers=bearer("fst_not-a-real-token")).status_code == 401
    assert client.get("/api/v1/me", headers=bearer("something-else")).status_code == 401


def test_a_session_does_not_authenticate_the_api(client, owner):
    client.force_login(owner)

    assert client.get("/api/v1/me").status_code == 401


def test_revoked_token_is_refused_with_a_message_saying_so(client, owner):
    created = token_create(user=owner, name="old laptop")
    token_revoke(token_id=created.token.pk, user=owner)

    response = client.get("/api/v1/me", headers=bearer(created.plaintext))

    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]
    assert created.token.prefix in response.json()["detail"]


def test_token_of_a_deactivated_user_is_refused(client, owner):
    created = token_create(user=owner, name="cli")
    owner.is_active = False
    owner.save()

    assert client.get("/api/v1/me", headers=bearer(created.plaintext)).status_code == 401


def test_last_used_is_recorded_at_most_once_a_minute(client, owner):
    created = token_create(user=owner, name="cli")
    assert created.token.last_used_at is None

    client.get("/api/v1/me", headers=bearer(created.plaintext))
    created.token.refresh_from_db()
    first = created.token.last_used_at
    client.get("/api/v1/me", headers=bearer(created.plaintext))
    created.token.refresh_from_db()

    assert first is not None
    assert created.token.last_used_at == first

    ApiToken.objects.filter(pk=created.token.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    client.get("/api/v1/me", headers=bearer(created.plaintext))
    created.token.refresh_from_db()
    assert timezone.now() - created.token.last_used_at < timedelta(seconds=30)


def test_revoking_twice_keeps_the_first_revocation_time(owner):
    created = token_create(user=owner, name="cli")
    first = token_revoke(token_id=created.token.pk, user=owner).revoked_at

    again = token_revoke(token_id=created.token.pk, user=owner).revoked_at

    assert first is not None and again == first


def test_api_creates_lists_and_revokes_tokens(client, owner):
    auth = bearer(token_create(user=owner, name="bootstrap").plaintext)

    created = client.post("/api/v1/tokens", {"name": "ci"}, content_type="application/json", headers=auth)
    assert created.status_code == 201
    new = created.json()
    assert new["token"].startswith("fst_") and new["prefix"] == new["token"][:12]

    listed = client.get("/api/v1/tokens", headers=auth).json()
    assert {t["name"] for t in listed} == {"bootstrap", "ci"}
    assert all("token" not in t for t in listed)

    revoked = client.delete(f"/api/v1/tokens/{new['id']}", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert client.get("/api/v1/me", headers=bearer(new["token"])).status_code == 401


def test_api_cannot_revoke_someone_elses_token(client, owner, outsider):
    theirs = token_create(user=owner, name="cli")
    auth = bearer(token_create(user=outsider, name="cli").plaintext)

    response = client.delete(f"/api/v1/tokens/{theirs.token.pk}", headers=auth)

    assert response.status_code == 404
    theirs.token.refresh_from_db()
    assert theirs.token.revoked_at is None


def test_settings_page_lists_tokens_by_prefix_only(client, owner):
    created = token_create(user=owner, name="laptop")
    client.force_login(owner)

    page = client.get(reverse("accounts:settings")).content.decode()

    assert created.token.prefix in page
    assert created.plaintext not in page


def test_creating_a_token_in_the_page_shows_it_once(client, owner):
    client.force_login(owner)

    response = client.post(
        reverse("accounts:token_create"), {"name": "laptop"}, headers={"HX-Request": "true"}
    )

    stored = ApiToken.objects.get(user=owner)
    body = response.content.decode()
    assert response.status_code == 200
    assert '<div id="tokens">' in body and "<html" not in body
    token_value = body.split('id="new-token" value="', 1)[1].split('"', 1)[0]
    assert hash_token(token_value) == stored.token_hash
    assert token_value not in client.get(reverse("accounts:settings")).content.decode()


def test_creating_a_token_without_htmx_renders_the_whole_page(client, owner):
    client.force_login(owner)

    response = client.post(reverse("accounts:token_create"), {"name": "laptop"})

    assert response.status_code == 200
    assert "<html" in response.content.decode() and 'id="new-token"' in response.content.decode()


def test_a_token_without_a_name_is_refused_with_the_field_named(client, owner):
    client.force_login(owner)

    response = client.post(reverse("accounts:token_create"), {"name": "  "}, headers={"HX-Request": "true"})

    assert response.status_code == 422
    assert "errorlist" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_revoking_in_the_page_returns_the_fragment_without_it(client, owner):
    created = token_create(user=owner, name="laptop")
    client.force_login(owner)

    response = client.post(
        reverse("accounts:token_revoke", args=[created.token.pk]), headers={"HX-Request": "true"}
    )

    assert response.status_code == 200
    assert created.token.prefix not in response.content.decode()
    created.token.refresh_from_db()
    assert created.token.revoked_at is not None


def test_revoking_without_htmx_redirects_to_settings(client, owner):
    created = token_create(user=owner, name="laptop")
    client.force_login(owner)

    response = client.post(reverse("accounts:token_revoke", args=[created.token.pk]))

    assert response.status_code == 302 and response["Location"] == reverse("accounts:settings")


def test_outsider_gets_404_when_revoking_the_owners_token(client, owner, outsider):
    created = token_create(user=owner, name="laptop")
    client.force_login(outsider)

    response = client.post(reverse("accounts:token_revoke", args=[created.token.pk]))

    assert response.status_code == 404
    created.token.refresh_from_db()
    assert created.token.revoked_at is None


def test_anonymous_is_sent_to_login_and_htmx_gets_a_client_redirect(client, owner):
    created = token_create(user=owner, name="laptop")
    url = reverse("accounts:token_revoke", args=[created.token.pk])

    plain = client.post(url)
    htmx = client.post(url, headers={"HX-Request": "true"})

    assert plain.status_code == 302 and plain["Location"].startswith(reverse("login"))
    assert htmx.status_code == 200 and htmx["HX-Redirect"].startswith(reverse("login"))
    created.token.refresh_from_db()
    assert created.token.revoked_at is None


def test_openapi_schema_is_served_and_lists_the_accounts_routes(client):
    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/api/v1/me", "/api/v1/tokens", "/api/v1/tokens/{token_id}"} <= set(paths)
    assert response.json()["components"]["securitySchemes"]["TokenAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
