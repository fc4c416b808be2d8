"""A canary secret stored through the UI and the API must never appear in plaintext anywhere we can see.

Sinks checked: every page and API response touching the connections (bodies and headers), all log records at
DEBUG, everything written to stdout/stderr, log files under the data directory, and every column of every
table of every database.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections
from django.test import Client
from django.urls import reverse

from flows_app.models import Connection
from flows_app.services import connection_secrets_for_runner

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _api(user) -> Client:
    from accounts_app.services import token_create

    return Client(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='canary').plaintext}")


def _text(response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.items())
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return f"{response.status_code}\n{headers}\n{body.decode(errors='replace')}"


def _database_dump() -> str:
    chunks: list[str] = []
    for alias in connections:
        db = connections[alias]
        with db.cursor() as cursor:
            for table in db.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {db.ops.quote_name(table)}")
                for row in cursor.fetchall():
                    chunks.append(f"{alias}.{table}: " + " | ".join(map(str, row)))
    return "\n".join(chunks)


def _data_dir_logs() -> str:
    return "\n".join(
        path.read_text(errors="replace") for path in Path(settings.DATA_DIR).rglob("*.log") if path.is_file()
    )


@pytest.mark.django_db(databases="__all__")
def test_canary_secret_never_appears_in_plaintext(
    owner, teammate, django_user_model, fake_llm, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    canary_ui = f"sk-canary-{uuid.uuid4()}"
    canary_ui_extra = f"sk-canary-{uuid.uuid4()}"
    canary_api = f"sk-canary-{uuid.uuid4()}"
    canaries = (canary_ui, canary_ui_extra, canary_api)
    from accounts_app.models import Team

    team = Team.objects.get(name="core")
    staff = django_user_model.objects.create_superuser(username="admin", password="admin-pass-123!")
    ui, api, mate, mate_api, admin = (
        _login(owner),
        _api(owner),
        _login(teammate),
        _api(teammate),
        _login(staff),
    )
    seen: list[str] = []

    # Stored through the UI (shared with the team) and through the API.
    seen.append(_text(ui.get(reverse("connections:new"))))
    form = {
        "name": "canary_ui",
        "type": "open_ai",
        "base_url": fake_llm.base_url,
        "model": "fake-gpt",
        "api_key": canary_ui,
        "team": str(team.pk),
        "config_key": ["region"],
        "config_value": ["eu"],
        "secret_key": ["extra"],
        "secret_value": [canary_ui_extra],
    }
    seen.append(_text(ui.post(reverse("connections:new"), form, follow=True)))
    body = {
        "name": "canary_api",
        "type": "open_ai",
        "configs": {"base_url": fake_llm.base_url},
        "secrets": {"api_key": canary_api},
    }
    seen.append(_text(api.post("/api/v1/connections", json.dumps(body), content_type="application/json")))
    ui_conn = Connection.objects.get(name="canary_ui")
    api_conn = Connection.objects.get(name="canary_api")
    assert connection_secrets_for_runner(ui_conn).secrets == {"api_key": canary_ui, "extra": canary_ui_extra}
    assert connection_secrets_for_runner(api_conn).secrets == {"api_key": canary_api}

    # A form re-rendered with an error must not echo the submitted key.
    seen.append(_text(ui.post(reverse("connections:new"), dict(form, name="bad name"))))
    seen.append(_text(ui.post(reverse("connections:new"), dict(form, name="bad name"), **HTMX)))

    for conn in (ui_conn, api_conn):
        pk = {"pk": conn.pk}
        for client in (ui, mate) if conn.team_id else (ui,):
            seen.append(_text(client.get(reverse("connections:list"))))
            seen.append(_text(client.get(reverse("connections:list"), {"q": "canary"}, **HTMX)))
            seen.append(_text(client.get(reverse("connections:detail", kwargs=pk))))
            seen.append(_text(client.post(reverse("connections:test", kwargs=pk), **HTMX)))
            seen.append(_text(client.post(reverse("connections:test", kwargs=pk))))
        seen.append(_text(ui.get(reverse("connections:edit", kwargs=pk))))
        seen.append(_text(ui.get(reverse("connections:delete", kwargs=pk))))
        seen.append(_text(admin.get(reverse("admin:flows_app_connection_changelist"))))
        seen.append(_text(admin.get(reverse("admin:flows_app_connection_change", args=[conn.pk]))))
        for client in (api, mate_api) if conn.team_id else (api,):
            seen.append(_text(client.get("/api/v1/connections")))
            seen.append(_text(client.get(f"/api/v1/connections/{conn.name}")))
            seen.append(_text(client.post(f"/api/v1/connections/{conn.name}/test")))

    # Saving the edit form with the key left blank, and patching with the mask, keep the secret unchanged.
    edit = dict(form, api_key="", secret_value=[""])
    seen.append(_text(ui.post(reverse("connections:edit", kwargs={"pk": ui_conn.pk}), edit, follow=True)))
    patch = {"secrets": {"api_key": "******"}}
    seen.append(
        _text(api.patch("/api/v1/connections/canary_api", json.dumps(patch), content_type="application/json"))
    )
    ui_conn.refresh_from_db()
    api_conn.refresh_from_db()
    assert connection_secrets_for_runner(ui_conn).secrets == {"api_key": canary_ui, "extra": canary_ui_extra}
    assert connection_secrets_for_runner(api_conn).secrets == {"api_key": canary_api}

    # A provider that rejects the key quotes part of it; none of that may come back.
    fake_llm.config(api_key="sk-something-else-entirely")
    seen.append(_text(ui.post(reverse("connections:test", kwargs={"pk": ui_conn.pk}), **HTMX)))
    seen.append(_text(api.post("/api/v1/connections/canary_api/test")))
    assert "refused the API key" in seen[-1]

    # The connection tests really reached the server with the keys: the canaries were in use.
    sent = " ".join(r["headers"].get("authorization", "") for r in fake_llm.requests())
    assert canary_ui in sent
    assert canary_api in sent

    assert [
        text.split("\n", 1)[0] for text in seen if not text.startswith(("200", "201", "302", "422"))
    ] == []

    captured = capfd.readouterr()
    sinks = {
        "responses": "\n".join(seen),
        "log records": "\n".join(
            f"{r.name} {r.levelname} {r.getMessage()} {r.args!r} {getattr(r, 'exc_text', '')}"
            for r in caplog.records
        ),
        "stdout/stderr": captured.out + captured.err,
        "log files": _data_dir_logs(),
        "database": _database_dump(),
    }
    assert len(caplog.records) > 0
    assert "canary_ui" in sinks["database"]
    for sink, text in sinks.items():
        for canary in canaries:
            assert canary not in text, f"canary secret found in {sink}"
        # Not even a recognisable piece of one.
        for canary in canaries:
            assert canary[10:30] not in text, f"part of a canary secret found in {sink}"
