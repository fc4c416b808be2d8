"""The authorisation matrix through the real ASGI stack: websockets and online endpoint paths.

Apart from tests/test_authz_matrix.py because the consumers and the endpoint server read the database in their
own calls, with close_old_connections around them: they need committed objects (transactional tests), which
cannot share that module's rolled-back world.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from tests.authz_objects import World, build_world, url_for, websocket_routes

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def _api_client(token: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


# --- websockets -----------------------------------------------------------------------------------------


@pytest.fixture
def committed_world(owner, outsider, teammate, django_user_model) -> World:
    """The owner's objects, committed."""
    staff = django_user_model.objects.create_user(username="staff", password=None, is_staff=True)
    return build_world(owner=owner, outsider=outsider, teammate=teammate, staff=staff)


# studio.asgi builds its origin check from ALLOWED_HOSTS at import, before the test runner adds "testserver".
ORIGIN = (b"origin", b"http://localhost")
WS_KWARGS = {"flow_id": lambda w: w.flow.pk, "run_id": lambda w: w.run.pk}


def _cookie(user: Any) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (
        b"cookie",
        f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode(),
    )


async def _ws_connect(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None, Any]:
    from studio.asgi import application

    socket = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await socket.connect(timeout=5)
    first = await socket.receive_json_from(timeout=5) if connected else None
    await socket.disconnect()
    return connected, code, first


WS_ROUTES = websocket_routes()
WS_MISSING = {"flow_id": "987654321", "run_id": "00000000-0000-4000-8000-000000000000"}


def test_every_websocket_kwarg_is_in_the_matrix():
    for route, _name, kwargs in WS_ROUTES:
        missing = [k for k in kwargs if k not in WS_KWARGS or k not in WS_MISSING]
        assert missing == [], f"websocket route {route!r}: kwargs {missing} unknown; add it to the matrix"


@pytest.mark.parametrize(("route", "name", "kwargs"), WS_ROUTES, ids=[r[1] for r in WS_ROUTES])
async def test_websockets_refuse_anonymous_outsider_and_foreign_origins(
    route, name, kwargs, committed_world: World
):
    world = committed_world
    path = url_for(route, {k: str(WS_KWARGS[k](world)) for k in kwargs})
    missing_path = url_for(route, {k: WS_MISSING[k] for k in kwargs})
    outsider = await sync_to_async(_cookie)(world.outsider)
    owner = await sync_to_async(_cookie)(world.owner)
    anonymous = await _ws_connect(path, [ORIGIN])
    assert not anonymous[0] and 4000 <= (anonymous[1] or 0) < 5000, f"{path}: anonymous got {anonymous}"
    refused = await _ws_connect(path, [ORIGIN, outsider])
    assert not refused[0] and 4000 <= (refused[1] or 0) < 5000, f"{path}: the outsider got {refused}"
    # The same close as for an object nobody has: the socket does not reveal that the object exists.
    assert refused == await _ws_connect(missing_path, [ORIGIN, outsider])
    for label, headers in (
        ("a foreign origin", [(b"origin", b"https://evil.example"), owner]),
        ("no origin", [owner]),
    ):
        connected, _code, first = await _ws_connect(path, headers)
        assert not connected, f"{path}: the owner's session from {label} was let in ({first})"


# --- endpoint scoring: key auth only ------------------------------------------------------------------


async def _asgi_http(path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP request through studio.asgi.application (where /endpoints/... is served)."""
    from studio.asgi import application

    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send_message(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if body else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("localhost", 80),
    }
    await application(scope, receive, send_message)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_endpoint_paths_answer_only_their_own_keys(committed_world: World):
    world = committed_world
    name = world.endpoint.name
    body = json.dumps({"question": "hi", "style": "short"}).encode()
    owner_session = await sync_to_async(_cookie)(world.owner)
    cases = {
        "no key": [],
        "a session cookie, no key": [owner_session],
        "the owner's API token": [(b"authorization", f"Bearer {world.owner_token_plain}".encode())],
        "the outsider's endpoint key": [
            (b"authorization", f"Bearer {world.outsider_endpoint_keys.primary}".encode())
        ],
        "a made-up key": [(b"authorization", b"Bearer not-a-key")],
    }
    for label, headers in cases.items():
        for path, payload in ((f"/endpoints/{name}/score", body), (f"/endpoints/{name}/swagger.json", b"")):
            status, answer = await _asgi_http(path, headers, payload)
            assert status == 401, f"{path} with {label}: {status} {answer[:200]!r}"
            assert b"answer" not in answer and world.mark.encode() not in answer.replace(name.encode(), b"")
    # The owner's own key does open it (so the 401s above are about the keys, not a broken path).
    from runs_app.services import endpoint_authenticate

    assert await sync_to_async(endpoint_authenticate)(name=name, credential=world.endpoint_keys.primary)
    # An unknown endpoint answers exactly like a wrong key, so keys cannot probe for names.
    status, _ = await _asgi_http(
        "/endpoints/nosuch-endpoint/score", [cases["the outsider's endpoint key"][0]], body
    )
    assert status == 401


def test_endpoint_keys_do_not_open_the_studio_api(committed_world: World):
    world = committed_world
    for key in (world.endpoint_keys.primary, world.endpoint_keys.secondary):
        assert _api_client(key).get("/api/v1/me").status_code == 401
        assert _api_client(key).get(f"/api/v1/endpoints/{world.endpoint.name}").status_code == 401
