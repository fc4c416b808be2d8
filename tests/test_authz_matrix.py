"""The authorisation matrix: every studio route, API route, websocket and endpoint path, for every persona.

Routes are discovered from the URLconf (tests/authz_objects.py), so a route added later is in the matrix at
once, and a route whose kwargs the matrix cannot fill fails `test_every_route_kwarg_is_in_the_matrix`.

- anonymous: pages redirect to the login page (htmx: HX-Redirect to it), the API answers 401, the Django
  admin redirects to its own login; only the short PUBLIC_ROUTES list answers without a session;
- outsider (signed in, or with their own API token): 404 for every route naming one of the owner's objects,
  for every method the route accepts, with the very answer a missing object gets, never a 403 or a 200;
  list routes answer without one trace of the owner's objects; nothing of the owner's changes;
- owner: reaches every object route with the same kwargs (so the outsider's 404s are not typos).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import connections, transaction
from django.shortcuts import resolve_url
from django.test import Client
from django.urls import resolve

from tests.authz_objects import (
    Route,
    UnmappedKwarg,
    World,
    body_of,
    build_world,
    discover_routes,
    fill,
    is_object_route,
    request_for,
    send,
    url_for,
    websocket_routes,
)

pytestmark = pytest.mark.django_db(databases="__all__")

ROUTES = discover_routes()
PAGES = [r for r in ROUTES if r.kind == "page"]
API = [r for r in ROUTES if r.kind == "api"]
ADMIN = [r for r in ROUTES if r.kind == "admin"]

# Routes that answer without a session or token, and why that is safe.
PUBLIC_ROUTES = {
    "healthz",  # liveness probe: statuses only, no user data (tests/accounts_app/test_healthz.py)
    "login",  # the sign-in form
    "logout",  # signing out needs no session
    "setup",  # first-user setup behind a one-time token
    "password_reset_confirm",  # set-password link behind a one-time token
    "password_reset_complete",  # "your password is set" after that link
    "api:openapi-json",  # the API schema: operations and types, no user data
    "api:openapi-view",  # the API docs page rendering that schema
    "api:api-root",  # ninja's index of the API
    "api:no-route",  # any other path under /api/v1/: a JSON 404 for everyone, naming only that path
    "admin:login",  # Django admin's own sign-in form
    "admin:logout",  # Django admin's sign-out
    "admin:jsi18n",  # Django admin's translation catalogue (static JavaScript)
}
# List routes (no object kwarg) whose bare GET is not a 200 for an ordinary signed-in user.
OUTSIDER_LIST_STATUS = {
    # Staff only: hides itself with a 404 (accounts_app.views.staff_required).
    "accounts:admin": 404,
    # Comparing needs `?runs=a,b`; without them the page says so (the owner's runs are tried further down).
    "runs:compare": 400,
    "runs:compare_csv": 400,
    "runs:compare_json": 400,
    # "What changed" needs `?a=&b=`: two runs the user can see, else a 404.
    "runs:compare_changes": 404,
}
HTMX = {"HTTP_HX_REQUEST": "true"}
CSRF_RE = re.compile(
    rb'(name="csrfmiddlewaretoken" value=|"X-CSRFToken": *|csrf[_-]?token["\']?[:=] *)"[^"]*"', re.I
)
LOGIN_URL = resolve_url(settings.LOGIN_URL)


def _ids(routes: list[Route]) -> list[str]:
    return [r.id for r in routes]


# --- the shared world: created once per module inside a transaction that is rolled back at the end ------


@pytest.fixture(scope="module")
def world(django_db_setup: Any, django_db_blocker: Any) -> Iterator[World]:
    """The owner's objects of every kind; each test runs in a savepoint of this transaction."""
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    with django_db_blocker.unblock():
        atomics = [transaction.atomic(using=alias) for alias in connections]
        for atomic in atomics:
            atomic.__enter__()
        try:
            # Unusable passwords: the personas sign in with force_login, and hashing would cost seconds.
            owner = user_model.objects.create_user(username="owner", password=None)
            outsider = user_model.objects.create_user(username="outsider", password=None)
            teammate = user_model.objects.create_user(username="teammate", password=None)
            staff = user_model.objects.create_user(username="staff", password=None, is_staff=True)
            yield build_world(owner=owner, outsider=outsider, teammate=teammate, staff=staff)
        finally:
            for alias, atomic in zip(reversed(list(connections)), reversed(atomics), strict=True):
                transaction.set_rollback(True, using=alias)
                atomic.__exit__(None, None, None)


def _session(user: Any) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _api_client(token: str | None) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}") if token else Client()


def _normalised(
    body: bytes, missing: dict[str, str] | None = None, owner: dict[str, str] | None = None
) -> bytes:
    """The body without its per-request CSRF token, the missing object's ids put back to the owner's."""
    body = CSRF_RE.sub(b"CSRF", body)
    for kwarg, value in (missing or {}).items():
        body = body.replace(value.encode(), (owner or {})[kwarg].encode())
    return body


def _db_state() -> dict[str, list[dict[str, Any]]]:
    """Every row of the studio's tables (and auth's), minus bookkeeping that reading legitimately touches."""
    volatile = {"last_used_at", "last_login", "heartbeat_at", "session_data"}
    state = {}
    for model in apps.get_models():
        if model is Session or model._meta.app_label not in {"auth", "accounts_app", "flows_app", "runs_app"}:
            continue
        rows = model._default_manager.order_by("pk").values()
        state[model._meta.label] = [{k: v for k, v in row.items() if k not in volatile} for row in rows]
    return state


def _route_url(route: Route, world: World, *, missing: bool = False) -> str:
    url = url_for(route.route, fill(route, world, missing=missing))
    # ResolverMatch.route drops the admin regexes' anchors.
    assert resolve(url).route == route.route.replace("^", ""), f"{url} does not resolve to {route.route}"
    return url


# --- completeness ---------------------------------------------------------------------------------------


def test_the_matrix_sees_pages_api_admin_and_websockets():
    names = {r.name for r in ROUTES}
    assert {"flows:detail", "runs:detail", "connections:detail", "api:flows_get", "admin:index"} <= names
    assert len(PAGES) > 50 and len(API) > 30 and len(ADMIN) > 10
    assert websocket_routes()


def test_public_routes_all_exist():
    assert PUBLIC_ROUTES <= {r.name for r in ROUTES}


def test_a_route_with_an_unknown_kwarg_fails_naming_the_route_and_the_kwarg(world: World):
    new = Route(
        "flows/<int:pk>/widgets/<int:widget_id>", "flows:widget", "page", ("pk", "widget_id"), ("GET",)
    )
    with pytest.raises(UnmappedKwarg, match=r"flows/<int:pk>/widgets/<int:widget_id>.*'widget_id'.*add it"):
        fill(new, world)


@pytest.mark.parametrize("route", ROUTES, ids=_ids(ROUTES))
def test_every_route_kwarg_is_in_the_matrix(route: Route, world: World):
    url = _route_url(route, world)
    _route_url(route, world, missing=True)
    assert url.startswith("/")


@pytest.mark.parametrize("route", API, ids=_ids(API))
def test_every_api_operation_requires_a_token(route: Route):
    if route.name in PUBLIC_ROUTES:
        return
    unauthenticated = [f"{method} {op}" for method, op, has_auth in route.operations if not has_auth]
    assert unauthenticated == [], f"API operations without auth on {route.route}"


# --- anonymous ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", PAGES, ids=_ids(PAGES))
def test_anonymous_is_sent_to_login_for_pages(route: Route, world: World):
    if route.name in PUBLIC_ROUTES:
        return
    url = _route_url(route, world)
    client = Client()
    for method in route.methods:
        response = send(client, method, url)
        assert response.status_code == 302, f"{method} {url}: {response.status_code}"
        assert response["Location"].split("?")[0] == LOGIN_URL, f"{method} {url}"
        response = send(client, method, url, **HTMX)
        assert response.status_code == 200 and response["HX-Redirect"].split("?")[0] == LOGIN_URL, (
            f"{method} {url} (htmx)"
        )
        assert world.mark.encode() not in body_of(response)


@pytest.mark.parametrize("route", API, ids=_ids(API))
def test_anonymous_gets_401_from_the_api(route: Route, world: World):
    if route.name in PUBLIC_ROUTES:
        return
    url = _route_url(route, world)
    for client in (Client(), _api_client("fst_not-a-real-token"), _api_client(world.endpoint_keys.primary)):
        for method in route.methods:
            response = send(client, method, url, request_for(route, method, world, None))
            assert response.status_code == 401, f"{method} {url}: {response.status_code}"
            assert world.mark.encode() not in body_of(response)


@pytest.mark.parametrize("route", ADMIN, ids=_ids(ADMIN))
def test_anonymous_is_sent_to_the_admin_login(route: Route, world: World):
    if route.name in PUBLIC_ROUTES:
        return
    url = _route_url(route, world)
    for method in route.methods:
        response = send(Client(), method, url)
        assert response.status_code == 302, f"{method} {url}: {response.status_code}"
        assert response["Location"].startswith("/django-admin/login/"), f"{method} {url}"


# --- the outsider ---------------------------------------------------------------------------------------

OBJECT_ROUTES = [r for r in PAGES + API if r.kwargs and r.name not in PUBLIC_ROUTES]


@pytest.mark.parametrize("route", OBJECT_ROUTES, ids=_ids(OBJECT_ROUTES))
def test_outsider_gets_the_missing_object_404(route: Route, world: World):
    if not is_object_route(route):
        pytest.fail(f"{route.id}: a route with kwargs that name none of the owner's objects; classify it")
    owner_values, missing_values = fill(route, world), fill(route, world, missing=True)
    url, missing_url = _route_url(route, world), _route_url(route, world, missing=True)
    if route.kind == "api":
        client = _api_client(world.outsider_token_plain)
    else:
        client = _session(world.outsider)
    before = _db_state()
    variants = [{}] if route.kind == "api" else [{}, HTMX]
    for method in route.methods:
        for extra in variants:
            response = send(client, method, url, request_for(route, method, world, world.outsider), **extra)
            label = f"{method} {url}{' (htmx)' if extra else ''}"
            assert response.status_code == 404, f"{label}: outsider got {response.status_code}"
            reference = send(
                client, method, missing_url, request_for(route, method, world, world.outsider), **extra
            )
            assert reference.status_code == 404, f"{method} {missing_url}: {reference.status_code}"
            assert _normalised(body_of(response)) == _normalised(
                body_of(reference), missing_values, owner_values
            ), f"{label}: the 404 differs from a missing object's (existence leaks)"
    assert _db_state() == before, f"{route.id}: the outsider's requests changed something"


LIST_ROUTES = [r for r in PAGES + API if not r.kwargs and r.name not in PUBLIC_ROUTES]


@pytest.mark.parametrize("route", LIST_ROUTES, ids=_ids(LIST_ROUTES))
def test_outsider_lists_show_nothing_of_the_owner(route: Route, world: World):
    url = _route_url(route, world)
    client = _api_client(world.outsider_token_plain) if route.kind == "api" else _session(world.outsider)
    before = _db_state()
    for method in route.methods:
        for extra in [{}] if route.kind == "api" else [{}, HTMX]:
            response = send(client, method, url, **extra)
            label = f"{method} {url}{' (htmx)' if extra else ''}"
            if method == "GET":
                expected = OUTSIDER_LIST_STATUS.get(route.name, 200)
                assert response.status_code == expected, f"{label}: {response.status_code}"
            else:
                # An empty form or body: refused as invalid, never as forbidden.
                assert response.status_code not in (403, 500), f"{label}: {response.status_code}"
            assert world.mark.encode() not in body_of(response), f"{label}: shows the owner's objects"
    assert _db_state() == before, f"{route.id}: the outsider's requests changed something"


# --- the owner: the same URLs reach real objects --------------------------------------------------------


@pytest.mark.parametrize("route", OBJECT_ROUTES, ids=_ids(OBJECT_ROUTES))
def test_owner_reaches_every_object_route(route: Route, world: World):
    url = _route_url(route, world)
    # The staff pages (accounts' admin/...) are the staff's; every other object is the owner's.
    actor = world.staff if route.route.startswith("admin/") else world.owner
    client = _api_client(world.owner_token_plain) if route.kind == "api" else _session(actor)
    for method in route.methods:
        # Whatever the request changes is rolled back: each method meets the same objects.
        with transaction.atomic():
            response = send(client, method, url, request_for(route, method, world, actor))
            transaction.set_rollback(True)
        assert response.status_code not in (403, 404, 405), (
            f"{method} {url}: owner got {response.status_code}"
        )
        assert response.status_code < 500, f"{method} {url}: owner got {response.status_code}"


# --- the owner's objects named in query strings and bodies of other routes -----------------------------


def _cross_references(w: World) -> list[tuple[str, str, str, dict[str, Any], set[int], str]]:
    """(client kind, method, url, request, allowed statuses, what the answer may echo) for the outsider."""
    run, evaluation, flow = w.run, w.evaluation, w.flow
    runs = f"{run.pk},{evaluation.pk}"
    return [
        ("page", "GET", "/runs/compare", {"query": {"runs": runs}}, {404}, ""),
        ("page", "GET", "/runs/compare/export.csv", {"query": {"runs": runs}}, {404}, ""),
        ("page", "GET", "/runs/compare/export.json", {"query": {"runs": runs}}, {404}, ""),
        ("page", "GET", "/runs/compare", {"query": {"runs": f"{run.name},{evaluation.name}"}}, {404}, ""),
        ("page", "GET", "/runs/compare/changes", {"query": {"a": run.pk, "b": evaluation.pk}}, {404}, ""),
        ("page", "GET", "/runs/new", {"query": {"base_run": run.pk}}, {404}, ""),
        ("page", "GET", "/runs/new", {"query": {"clone": run.pk}}, {404}, ""),
        ("page", "GET", "/runs/new", {"query": {"flow": flow.pk, "dataset": w.dataset.pk}}, {200}, ""),
        ("page", "POST", "/runs/new", {"data": {"flow": flow.pk, "dataset": w.dataset.pk}}, {422}, ""),
        (
            "page",
            "POST",
            "/runs/new",
            {"data": {"flow": w.outsider_flow.pk, "dataset": w.dataset.pk}},
            {422},
            "",
        ),
        ("page", "POST", "/runs/new", {"data": {"base_run": run.pk}}, {404}, ""),
        # A run the user cannot see is a 404, like one that does not exist: nothing is archived.
        ("page", "POST", "/runs/archive-selected", {"data": {"runs": [run.pk, evaluation.pk]}}, {404}, ""),
        ("page", "GET", "/runs/", {"query": {"flow": flow.pk}}, {200, 404}, ""),
        ("page", "GET", "/runs/", {"query": {"search": "run"}}, {200}, ""),
        ("page", "GET", "/runs/", {"query": {"archived": "all"}}, {200}, ""),
        ("page", "GET", "/flows/", {"query": {"q": "flow"}}, {200}, ""),
        ("page", "GET", "/connections/", {"query": {"q": "conn"}}, {200}, ""),
        (
            "page",
            "POST",
            f"/flows/{w.outsider_flow.pk}/share",
            {"data": {"team": w.team.pk, "role": "viewer"}},
            {422},
            "",
        ),
        # The outsider's own flow, the owner's share of another flow.
        ("page", "POST", f"/flows/{w.outsider_flow.pk}/share/{w.share.pk}/remove", {}, {404}, ""),
        (
            "page",
            "POST",
            f"/deploy/flow/{w.outsider_flow.pk}/",
            {
                "data": {
                    "endpoint_mode": "existing",
                    "endpoint": w.endpoint.name,
                    "deployment": "green",
                    "instance_count": 1,
                    "auth_mode": "key",
                }
            },
            {422},
            w.endpoint.name,
        ),
        (
            "page",
            "POST",
            f"/deploy/flow/{w.outsider_flow.pk}/",
            {
                "data": {
                    "endpoint_mode": "new",
                    "endpoint_name": w.endpoint.name,
                    "deployment": "green",
                    "instance_count": 1,
                    "auth_mode": "key",
                }
            },
            {422},
            w.endpoint.name,
        ),
        ("api", "GET", "/api/v1/runs", {"query": {"flow_id": flow.pk}}, {200, 404}, ""),
        ("api", "GET", "/api/v1/runs", {"query": {"base_run": str(run.pk)}}, {200, 404}, ""),
        ("api", "GET", "/api/v1/runs", {"query": {"search": "run", "archived": "include"}}, {200}, ""),
        ("api", "GET", "/api/v1/flows", {"query": {"q": "flow", "trash": "true"}}, {200}, ""),
        (
            "api",
            "POST",
            "/api/v1/runs",
            {"json": {"flow_id": flow.pk, "dataset": w.dataset.pk, "column_mapping": {}}},
            {404, 422},
            "",
        ),
        (
            "api",
            "POST",
            "/api/v1/runs",
            {"json": {"flow_id": w.outsider_flow.pk, "dataset": w.dataset.pk}},
            {404, 422},
            "",
        ),
        (
            "api",
            "POST",
            "/api/v1/runs",
            {"json": {"flow_id": w.outsider_flow.pk, "run": run.name}},
            {404, 422},
            run.name,
        ),
        (
            "api",
            "POST",
            "/api/v1/runs",
            {"json": {"flow": flow.name, "dataset": w.dataset.pk}},
            {404, 422},
            flow.name,
        ),
        (
            "api",
            "POST",
            "/api/v1/deployments",
            {"json": {"run": str(run.pk), "endpoint": "outsider-new-ep"}},
            {404, 422},
            "",
        ),
        (
            "api",
            "POST",
            "/api/v1/deployments",
            {"json": {"flow_id": flow.pk, "endpoint": "outsider-new-ep"}},
            {404, 422},
            "",
        ),
        # Endpoint names are global (they are URLs): a taken name may be refused as taken, nothing more.
        (
            "api",
            "POST",
            "/api/v1/deployments",
            {"json": {"flow_id": w.outsider_flow.pk, "endpoint": w.endpoint.name, "deployment": "green"}},
            {404, 409, 422},
            w.endpoint.name,
        ),
        (
            "api",
            "POST",
            "/api/v1/connections",
            {"json": {"name": "mine", "type": "open_ai", "team": w.team.name}},
            {404, 422},
            w.team.name,
        ),
        (
            "api",
            "POST",
            "/api/v1/flows",
            {"json": {"name": "mine", "team": w.team.name}},
            {404, 422},
            w.team.name,
        ),
        (
            "api",
            "POST",
            f"/api/v1/flows/{w.outsider_flow.pk}/shares",
            {"json": {"team": w.team.name}},
            {404, 422},
            w.team.name,
        ),
    ]


def test_outsider_cannot_reach_owner_objects_named_in_queries_and_bodies(world: World):
    page, api = _session(world.outsider), _api_client(world.outsider_token_plain)
    before = _db_state()
    problems = []
    for kind, method, url, request, allowed, echo in _cross_references(world):
        for extra in [{}] if kind == "api" else [{}, HTMX]:
            response = send(api if kind == "api" else page, method, url, request, **extra)
            label = f"{method} {url} {request}{' (htmx)' if extra else ''}"
            # htmx gets the 422 of a refused form as a 422 too, and a redirect as HX-Redirect (200).
            statuses = allowed | ({200} if extra and 302 in allowed else set())
            if response.status_code not in statuses:
                problems.append(f"{label}: {response.status_code}, expected one of {sorted(statuses)}")
            body = body_of(response).replace(echo.encode(), b"") if echo else body_of(response)
            if world.mark.encode() in body:
                problems.append(f"{label}: the answer shows the owner's objects")
    assert problems == []
    assert _db_state() == before, "the outsider's requests changed something"


# --- the Django admin: staff only ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ADMIN, ids=_ids(ADMIN))
def test_outsider_is_sent_to_the_admin_login_and_sees_nothing(route: Route, world: World):
    if route.name in PUBLIC_ROUTES:
        return
    url = _route_url(route, world)
    client = _session(world.outsider)
    before = _db_state()
    for method in route.methods:
        response = send(client, method, url)
        assert response.status_code == 302, f"{method} {url}: {response.status_code}"
        assert response["Location"].startswith("/django-admin/login/"), f"{method} {url}"
        login = client.get(response["Location"])
        assert login.status_code == 200
        assert world.mark.encode() not in body_of(login)
    assert _db_state() == before
