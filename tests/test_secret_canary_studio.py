"""A canary API key, stored in a connection that a flow, a run and a deployment use, never shows in plaintext.

The owner opens every GET route of the studio (pages, their htmx fragments, the API, the Django admin as
staff), downloads the flow and run snapshot zips and tests the connection for real against the fake LLM.
Then every sink is searched: response bodies and headers (zips unpacked), log records at DEBUG, stdout and
stderr, every file under settings.DATA_DIR, and every column of every table of every configured database.
"""

from __future__ import annotations

import io
import logging
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from django.test import Client
from django.urls import resolve

from tests.authz_objects import World, body_of, build_world, discover_routes, fill, request_for, send, url_for

pytestmark = pytest.mark.django_db(databases="__all__")

HTMX = {"HTTP_HX_REQUEST": "true"}
# GET routes that answer 404 even to the owner: a made-up one-time token, and paths that are no API route.
ANSWER_404 = {"setup", "api:api-root", "api:no-route"}


def _response_text(response: Any) -> bytes:
    """Status, headers and body; a zip's entries are unpacked so their contents are searched too."""
    body = body_of(response)
    parts = [str(response.status_code).encode()]
    parts += [f"{k}: {v}".encode() for k, v in response.items()]
    parts.append(body)
    if body[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            parts += [archive.read(name) for name in archive.namelist()]
    return b"\n".join(parts)


def _database_dump() -> bytes:
    """Every row of every table of every configured database, values as text (bytes kept as bytes)."""
    chunks: list[bytes] = []
    for alias in connections:
        db = connections[alias]
        with db.cursor() as cursor:
            for table in db.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {db.ops.quote_name(table)}")
                for row in cursor.fetchall():
                    for value in row:
                        chunks.append(
                            bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                        )
    return b"\n".join(chunks)


def _data_dir_files() -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(settings.DATA_DIR).rglob("*") if p.is_file()}


@pytest.fixture
def world(owner, outsider, teammate, django_user_model, fake_llm) -> World:
    """The owner's objects of every kind; the connection's API key is a canary, its server the fake LLM."""
    staff = django_user_model.objects.create_user(username="staff", password=None, is_staff=True)
    canary = f"sk-canary-{uuid.uuid4()}"
    world = build_world(
        owner=owner,
        outsider=outsider,
        teammate=teammate,
        staff=staff,
        api_key=canary,
        base_url=fake_llm.base_url,
    )
    world.canary = canary  # type: ignore[attr-defined]
    return world


def test_canary_secret_appears_in_no_response_log_file_or_column(
    world: World, fake_llm, django_user_model, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    canary: str = world.canary  # type: ignore[attr-defined]
    from flows_app.services import connection_secrets_for_runner
    from runs_app.services import deployment_serving

    # The canary is really the connection's key, and what a deployment hands its runners.
    assert connection_secrets_for_runner(world.connection).secrets["api_key"] == canary
    serving = deployment_serving(deployment_id=world.deployment.pk)
    assert serving.connections[world.connection.name].secrets["api_key"] == canary

    superuser = django_user_model.objects.create_superuser(username="root", password=None)
    page, staff, admin = Client(), Client(), Client()
    page.force_login(world.owner)
    staff.force_login(world.staff)
    admin.force_login(superuser)
    api = Client(HTTP_AUTHORIZATION=f"Bearer {world.owner_token_plain}")
    seen: list[tuple[str, bytes]] = []
    statuses: list[str] = []
    for route in discover_routes():
        if "GET" not in route.methods:
            continue
        url = url_for(route.route, fill(route, world))
        assert resolve(url).route == route.route.replace("^", "")
        client = {"page": page, "api": api, "admin": admin}[route.kind]
        if route.route.startswith("admin/"):
            client = staff
        for extra in [{}, HTMX] if route.kind == "page" else [{}]:
            response = send(client, "GET", url, request_for(route, "GET", world, world.owner), **extra)
            seen.append((f"GET {url}", _response_text(response)))
            # /healthz answers 503 here: no Celery worker runs during these tests.
            if route.name == "healthz":
                assert response.status_code in (200, 503)
            elif response.status_code >= 500 or (
                response.status_code == 404 and route.kind != "admin" and route.name not in ANSWER_404
            ):
                statuses.append(f"GET {url}: {response.status_code}")

    # The exports, and the connection tested for real: once accepted, once refused by the provider.
    exports = [
        (page, f"/flows/{world.flow.pk}/download"),
        (page, f"/flows/{world.flow.pk}/download?version=1"),
        (page, f"/runs/{world.run.pk}/snapshot.zip"),
        (api, f"/api/v1/flows/{world.flow.pk}/export"),
        (api, f"/api/v1/snapshots/{world.run.snapshot_id}/export"),
    ]
    for client, url in exports:
        response = client.get(url)
        seen.append((f"zip {url}", _response_text(response)))
        assert response.status_code == 200, url
        assert response["Content-Type"] in ("application/zip", "application/x-zip-compressed"), url
        # The exported flow is the one that names the canary's connection.
        assert world.connection.name.encode() in seen[-1][1]
    for _ in range(2):
        seen.append(("page test", _response_text(page.post(f"/connections/{world.connection.pk}/test"))))
        seen.append(
            ("api test", _response_text(api.post(f"/api/v1/connections/{world.connection.name}/test")))
        )
        fake_llm.config(api_key="sk-something-else-entirely")
    sent = " ".join(r["headers"].get("authorization", "") for r in fake_llm.requests())
    assert canary in sent, "the connection tests never used the canary key"

    assert statuses == [], "\n".join(statuses)
    captured = capfd.readouterr()
    sinks: dict[str, bytes] = {name: text for name, text in seen}
    sinks["log records"] = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    ).encode()
    sinks["stdout/stderr"] = (captured.out + captured.err).encode()
    sinks.update({f"file {path}": data for path, data in _data_dir_files().items()})
    sinks["database"] = _database_dump()
    assert world.connection.name.encode() in sinks["database"]
    assert len(caplog.records) > 0
    found = [
        name for name, text in sinks.items() if canary.encode() in text or canary[10:30].encode() in text
    ]
    assert found == [], "the canary secret is in plaintext in these sinks"
