"""The studio's routes, discovered from the URLconf, and one owned object of every kind to fill them.

Shared by the authorisation matrix and the studio-wide secret canary. `discover_routes()` walks
`django.urls.get_resolver()` (pages, the ninja API, the Django admin) and `studio.routing` (websockets);
`build_world()` creates, through the apps' services, the owner's flow, connection, dataset, runs, endpoint,
team and tokens; `fill()` maps every route kwarg to one of those objects and fails, naming the route and the
kwarg, when it meets a kwarg nobody has mapped yet.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RegexPattern, RoutePattern

FLOWS = Path(__file__).resolve().parent / "data" / "flows"
API_PREFIX = "api/v1/"
ADMIN_PREFIX = "django-admin/"
DEFAULT_PAGE_METHODS = ("GET", "POST")


class UnmappedKwarg(AssertionError):
    """A route carries a kwarg the matrix does not know how to fill."""


@dataclass(frozen=True)
class Route:
    """One URL pattern: its full route, name, kind, kwarg names and the methods it accepts."""

    route: str
    name: str
    kind: str  # "page" | "api" | "admin"
    kwargs: tuple[str, ...]
    methods: tuple[str, ...]
    # API only: method -> the operation's function name, and whether each operation has auth.
    operations: tuple[tuple[str, str, bool], ...] = ()

    @property
    def id(self) -> str:
        """A short test id: the route name and its route."""
        return f"{self.name} {self.route}"

    def operation(self, method: str) -> str:
        """The API operation answering `method` on this route ('' for pages)."""
        return next((op for m, op, _ in self.operations if m == method), "")


def _qualified(namespace: str | None, name: str | None) -> str:
    if not name:
        return f"{namespace}:<unnamed>" if namespace else "<unnamed>"
    return f"{namespace}:{name}" if namespace else name


def _kwarg_names(pattern: Any) -> list[str]:
    if isinstance(pattern, RoutePattern):
        return list(pattern.converters)
    if isinstance(pattern, RegexPattern):
        return list(pattern.regex.groupindex)
    return []


def _view_methods(callback: Callable[..., Any]) -> tuple[str, ...]:
    """The methods a page view accepts, read from require_http_methods/require_GET/require_POST or the CBV."""
    view_class = getattr(callback, "view_class", None)
    if view_class is not None:
        names = [m for m in view_class.http_method_names if m not in ("head", "options")]
        return tuple(m.upper() for m in names if hasattr(view_class, m))
    stack: list[Any] = [callback]
    seen: set[int] = set()
    while stack:
        func = stack.pop()
        if id(func) in seen or not callable(func):
            continue
        seen.add(id(func))
        code = getattr(func, "__code__", None)
        cells = getattr(func, "__closure__", None) or ()
        for var, cell in zip(code.co_freevars if code else (), cells, strict=False):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if var == "request_method_list":
                return tuple(str(m).upper() for m in value)
            if callable(value):
                stack.append(value)
        if hasattr(func, "__wrapped__"):
            stack.append(func.__wrapped__)
    return DEFAULT_PAGE_METHODS


def _api_operations(callback: Callable[..., Any]) -> tuple[tuple[str, str, bool], ...]:
    """(method, operation name, has auth) of the ninja PathView behind an API URL pattern."""
    for cell in getattr(callback, "__closure__", None) or ():
        path_view = cell.cell_contents
        if hasattr(path_view, "operations"):
            return tuple(
                (method, op.view_func.__name__, bool(op.auth_callbacks))
                for op in path_view.operations
                for method in op.methods
            )
    return ()


def _walk(patterns: list[Any], prefix: str, namespace: str | None) -> Iterator[tuple[str, str, Any]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            ns = namespace
            if pattern.namespace:
                ns = f"{namespace}:{pattern.namespace}" if namespace else pattern.namespace
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), ns)
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), _qualified(namespace, pattern.name), pattern


def discover_routes() -> list[Route]:
    """Every HTTP route of the URLconf, once per distinct route (ninja repeats a route per operation)."""
    routes: dict[str, Route] = {}
    for full, name, pattern in _walk(get_resolver().url_patterns, "", None):
        if full in routes:
            continue
        kwargs = tuple(_kwarg_names(pattern.pattern))
        if full.startswith(API_PREFIX):
            operations = _api_operations(pattern.callback)
            methods = tuple(dict.fromkeys(m for m, _, _ in operations)) or ("GET",)
            routes[full] = Route(full, name, "api", kwargs, methods, operations)
        elif full.startswith(ADMIN_PREFIX):
            routes[full] = Route(full, name, "admin", kwargs, ("GET", "POST"))
        else:
            routes[full] = Route(full, name, "page", kwargs, _view_methods(pattern.callback))
    return list(routes.values())


def websocket_routes() -> list[tuple[str, str, tuple[str, ...]]]:
    """(route, name, kwarg names) of every websocket route in studio.routing."""
    from studio.routing import websocket_urlpatterns

    found = []
    for full, name, pattern in _walk(websocket_urlpatterns, "", None):
        found.append((full, name, tuple(_kwarg_names(pattern.pattern))))
    return found


def url_for(route: str, values: dict[str, str]) -> str:
    """The path of `route` with its kwargs replaced by `values` (route syntax and admin regexes)."""

    def converter(match: re.Match[str]) -> str:
        return values[match.group(2)]

    # Admin regexes first: their named groups look like route converters.
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: values[m.group(1)], route)
    path = re.sub(r"<(?:(\w+):)?(\w+)>", converter, path)
    # A catch-all regex (the API's JSON 404 for unknown paths) gets a path no route has.
    path = re.sub(r"\[\\s\\S\]\*|\.\*", "no/such/route", path)
    return "/" + path.replace("^", "").replace("$", "")


# --- the owner's objects --------------------------------------------------------------------------------


@dataclass
class World:
    """The owner's objects of every kind (and a few of the outsider's), created through the services."""

    mark: str
    owner: Any
    outsider: Any
    teammate: Any
    staff: Any
    team: Any
    connection: Any
    flow: Any
    snapshot: Any
    share: Any
    dataset: Any
    run: Any
    evaluation: Any
    flow_test: Any
    endpoint: Any
    deployment: Any
    endpoint_keys: Any
    owner_token: Any
    owner_token_plain: str
    outsider_token_plain: str
    outsider_flow: Any
    outsider_endpoint: Any
    outsider_endpoint_keys: Any
    group: Any
    by_model: dict[type, Any] = field(default_factory=dict)


def _llm_flow_files(connection_name: str) -> dict[str, bytes]:
    from flows_app.services import files_from_folder

    files = files_from_folder(root=FLOWS / "dag_llm_chat")
    dag = files["flow.dag.yaml"].decode()
    files["flow.dag.yaml"] = dag.replace("connection: fake_openai", f"connection: {connection_name}").encode()
    return files


def build_world(
    *,
    owner: Any,
    outsider: Any,
    teammate: Any,
    staff: Any,
    api_key: str = "sk-owner-not-a-real-key",
    base_url: str = "",
) -> World:
    """One object of every kind owned by `owner`, all named with a unique mark that outsiders must never see."""
    from django.contrib.auth.models import Group

    from accounts_app.services import team_create, token_create
    from flows_app.models import FlowTest
    from flows_app.services import connection_create, flow_create, flow_file_save, flow_share
    from runs_app.models import LineResult, RunLog, RunStatus
    from runs_app.services import dataset_create, deployment_create, run_create

    mark = "own" + uuid.uuid4().hex[:8]
    team = team_create(name=f"{mark}-team", created_by=owner)
    connection = connection_create(
        owner=owner,
        name=f"{mark}_conn",
        type="open_ai",
        # Nothing listens on port 9: a connection test by the owner fails fast instead of calling out.
        configs={"base_url": base_url or "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"},
        secrets={"api_key": api_key},
    )
    flow = flow_create(owner=owner, name=f"{mark}-flow", files=_llm_flow_files(connection.name))
    flow_file_save(
        flow=flow,
        user=owner,
        path="notes.md",
        content=f"# {mark} notes\n".encode(),
        based_on=flow.head.number,
        message=f"{mark} second version",
    )
    flow.refresh_from_db()
    share = flow_share(flow=flow, by=owner, user=teammate)
    data = "".join(
        json.dumps({"question": f"{mark} question {i}", "style": "short"}) + "\n" for i in range(3)
    ).encode()
    dataset = dataset_create(owner=owner, name=f"{mark}-data", filename=f"{mark}.jsonl", data=data)
    mapping = {"question": "${data.question}", "style": "${data.style}"}
    run = run_create(
        user=owner, flow_version=flow.head, dataset=dataset, column_mapping=mapping, name=f"{mark}-run"
    )
    for line in range(3):
        LineResult.objects.create(
            run=run,
            line_number=line,
            status="Completed",
            inputs={"question": f"{mark} question {line}", "style": "short"},
            outputs={"answer": f"{mark} answer {line}", "answer_length": 12},
            duration_ms=5.0,
            usage={"total_tokens": 3},
            trace=[{"span_id": "a", "parent_id": None, "name": "flow", "kind": "flow", "start": 1, "end": 2}],
        )
    RunLog.objects.create(run=run, time=run.created_at, line_number=0, stream="stdout", text=f"{mark} log")
    type(run).objects.filter(pk=run.pk).update(
        status=RunStatus.COMPLETED, total_lines=3, done_lines=3, finished_at=run.created_at
    )
    run.refresh_from_db()
    evaluation = run_create(
        user=owner,
        flow_version=flow.head,
        base_run=run,
        dataset=dataset,
        column_mapping={"question": "${run.outputs.answer}", "style": "${data.style}"},
        name=f"{mark}-eval",
    )
    flow_test = FlowTest.objects.create(
        flow=flow,
        version=flow.head,
        user=owner,
        inputs={"question": f"{mark} test"},
        outputs={"answer": f"{mark} tested"},
        status=FlowTest.Status.COMPLETED,
    )
    deployment, keys = deployment_create(user=owner, endpoint=f"{mark}-ep", deployment="blue", run=run)
    owner_token = token_create(user=owner, name=f"{mark}-token")
    outsider_token = token_create(user=outsider, name="outsider-token")
    outsider_connection = connection_create(
        owner=outsider, name="outsider_conn", type="open_ai", secrets={"api_key": "sk-outsider-not-real"}
    )
    outsider_flow = flow_create(
        owner=outsider, name="outsider-flow", files=_llm_flow_files(outsider_connection.name)
    )
    outsider_deployment, outsider_keys = deployment_create(
        user=outsider, endpoint=f"out{mark[3:]}-ep", deployment="blue", flow_version=outsider_flow.head
    )
    group, _ = Group.objects.get_or_create(name=f"{mark}-group")
    world = World(
        mark=mark,
        owner=owner,
        outsider=outsider,
        teammate=teammate,
        staff=staff,
        team=team,
        connection=connection,
        flow=flow,
        snapshot=flow.head.snapshot,
        share=share,
        dataset=dataset,
        run=run,
        evaluation=evaluation,
        flow_test=flow_test,
        endpoint=deployment.endpoint,
        deployment=deployment,
        endpoint_keys=keys,
        owner_token=owner_token.token,
        owner_token_plain=owner_token.plaintext,
        outsider_token_plain=outsider_token.plaintext,
        outsider_flow=outsider_flow,
        outsider_endpoint=outsider_deployment.endpoint,
        outsider_endpoint_keys=outsider_keys,
        group=group,
    )
    from accounts_app.models import Membership
    from flows_app.models import Blob
    from runs_app.models import EndpointKey

    for obj in (
        owner,
        team,
        connection,
        flow,
        flow.head,
        flow.head.snapshot,
        share,
        dataset,
        run,
        flow_test,
        deployment.endpoint,
        deployment,
        owner_token.token,
        group,
        Membership.objects.filter(team=team).first(),
        Blob.objects.get(sha256=flow.head.snapshot.manifest["flow.dag.yaml"]),
        EndpointKey.objects.filter(endpoint=deployment.endpoint).first(),
        LineResult.objects.filter(run=run).first(),
        RunLog.objects.filter(run=run).first(),
    ):
        world.by_model.setdefault(type(obj), obj)
    return world


# --- route kwargs -> the owner's objects ----------------------------------------------------------------


@dataclass(frozen=True)
class KwargRule:
    """How to fill one kwarg on routes starting with `prefix`: the owner's value and a value nobody has.

    `owned`: the value names one of the owner's objects, so an outsider must get a 404 for the route.
    """

    prefix: str
    kwarg: str
    value: Callable[[World, str], str]
    missing: Callable[[World, str], str]
    owned: bool = True


def _admin_object(world: World, route: str) -> str:
    from django.apps import apps

    match = re.match(r"django-admin/(\w+)/(\w+)/", route)
    if match is None:
        raise UnmappedKwarg(
            f"route {route!r}: cannot tell which model its object_id is; add it to the matrix"
        )
    model = apps.get_model(match.group(1), match.group(2))
    obj = world.by_model.get(model)
    if obj is None:
        raise UnmappedKwarg(
            f"route {route!r}, kwarg 'object_id': no {model.__name__} in tests/authz_objects.build_world; "
            "add it to the matrix"
        )
    return str(obj.pk)


def _missing_uuid(world: World, route: str) -> str:
    return "00000000-0000-4000-8000-000000000000"


def _missing_int(world: World, route: str) -> str:
    return "987654321"


def _missing_name(world: World, route: str) -> str:
    return "nosuch-object-here"


# First matching prefix wins; an empty prefix matches every route.
KWARG_RULES: tuple[KwargRule, ...] = (
    # Pages.
    KwargRule("connections/", "pk", lambda w, r: str(w.connection.pk), _missing_uuid),
    KwargRule("flows/", "pk", lambda w, r: str(w.flow.pk), _missing_int),
    KwargRule("runs/datasets/", "pk", lambda w, r: str(w.dataset.pk), _missing_int),
    KwargRule("", "run_id", lambda w, r: str(w.run.pk), _missing_uuid),
    KwargRule("", "flow_id", lambda w, r: str(w.flow.pk), _missing_int),
    KwargRule("", "share_id", lambda w, r: str(w.share.pk), _missing_int),
    KwargRule("", "token_id", lambda w, r: str(w.owner_token.pk), _missing_int),
    KwargRule("", "team_id", lambda w, r: str(w.team.pk), _missing_int),
    KwargRule("", "user_id", lambda w, r: str(w.owner.pk), _missing_int),
    KwargRule("endpoints-admin/", "name", lambda w, r: w.endpoint.name, _missing_name),
    KwargRule(f"{API_PREFIX}endpoints/", "name", lambda w, r: w.endpoint.name, _missing_name),
    KwargRule(f"{API_PREFIX}connections/", "name", lambda w, r: w.connection.name, _missing_name),
    KwargRule(f"{API_PREFIX}snapshots/", "sha256", lambda w, r: w.snapshot.sha256, lambda w, r: "0" * 64),
    KwargRule(f"{API_PREFIX}datasets/", "dataset_id", lambda w, r: str(w.dataset.pk), _missing_int),
    KwargRule(f"{API_PREFIX}runs/", "run_ref", lambda w, r: w.run.name, _missing_name),
    # Kwargs that only pick something inside an object named by another kwarg of the same route.
    KwargRule("", "number", lambda w, r: "1", lambda w, r: "1", owned=False),
    KwargRule("", "line_number", lambda w, r: "0", lambda w, r: "0", owned=False),
    KwargRule("", "path", lambda w, r: "flow.dag.yaml", lambda w, r: "flow.dag.yaml", owned=False),
    KwargRule("", "deployment", lambda w, r: w.deployment.name, lambda w, r: w.deployment.name, owned=False),
    KwargRule("", "slot", lambda w, r: "primary", lambda w, r: "primary", owned=False),
    KwargRule("flows/", "what", lambda w, r: "input", lambda w, r: "input", owned=False),
    # Public pages whose kwargs are one-time tokens, not objects.
    KwargRule("setup/", "token", lambda w, r: "not-a-setup-token", lambda w, r: "x", owned=False),
    KwargRule("set-password/", "uidb64", lambda w, r: "MQ", lambda w, r: "MQ", owned=False),
    KwargRule("set-password/", "token", lambda w, r: "set-password", lambda w, r: "x", owned=False),
    # The Django admin (staff only): each change/delete/history page names one row of its model.
    KwargRule(f"{ADMIN_PREFIX}r/", "object_id", lambda w, r: str(w.flow.pk), _missing_int),
    KwargRule(ADMIN_PREFIX, "object_id", _admin_object, lambda w, r: "987654321"),
    KwargRule(ADMIN_PREFIX, "id", lambda w, r: str(w.owner.pk), _missing_int),
    KwargRule(
        ADMIN_PREFIX,
        "content_type_id",
        lambda w, r: _flow_content_type(),
        lambda w, r: _flow_content_type(),
        owned=False,
    ),
    KwargRule(ADMIN_PREFIX, "app_label", lambda w, r: "flows_app", lambda w, r: "flows_app", owned=False),
    KwargRule(ADMIN_PREFIX, "url", lambda w, r: "flows_app/nosuch/", lambda w, r: "x/", owned=False),
)


def _flow_content_type() -> str:
    from django.contrib.contenttypes.models import ContentType

    from flows_app.models import Flow

    return str(ContentType.objects.get_for_model(Flow).pk)


def _rule(route: str, kwarg: str) -> KwargRule:
    for rule in KWARG_RULES:
        if rule.kwarg == kwarg and route.startswith(rule.prefix):
            return rule
    raise UnmappedKwarg(
        f"route {route!r} has the kwarg {kwarg!r}, which the authorisation matrix cannot fill: "
        "add it to the matrix (tests/authz_objects.py KWARG_RULES) with the owner's object it names"
    )


def fill(route: Route, world: World, *, missing: bool = False) -> dict[str, str]:
    """The route's kwargs filled with the owner's objects (or, with `missing`, with ids nobody has)."""
    values = {}
    for kwarg in route.kwargs:
        rule = _rule(route.route, kwarg)
        values[kwarg] = (rule.missing if missing else rule.value)(world, route.route)
    return values


def is_object_route(route: Route) -> bool:
    """Whether the route names one of the owner's objects (an outsider must then get a 404)."""
    return any(_rule(route.route, kwarg).owned for kwarg in route.kwargs)


# --- requests -------------------------------------------------------------------------------------------


def _upload(name: str, data: bytes, content_type: str = "text/plain") -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type=content_type)


def zip_upload() -> Any:
    """A small flow zip to upload."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("flow.dag.yaml", "inputs: {}\noutputs: {}\nnodes: []\n")
    return _upload("stolen.zip", data.getvalue(), content_type="application/zip")


# Requests that get past a route's own validation, so the outsider's request really reaches the lookup of
# the owner's object (a 422 for a malformed form says nothing about authorisation). Keyed by the API
# operation or the page route name, and the method; `actor` is who sends it.
REQUESTS: dict[tuple[str, str], Any] = {
    ("flows:file_download", "GET"): lambda w, actor: {"query": {"path": "flow.dag.yaml"}},
    # The health check waits up to 5 s for a worker that never runs in these tests.
    ("healthz", "GET"): lambda w, actor: {"query": {"wait": "0.1"}},
    ("runs:compare", "GET"): lambda w, actor: {"query": {"runs": f"{w.run.pk},{w.evaluation.pk}"}},
    ("runs:compare_csv", "GET"): lambda w, actor: {"query": {"runs": f"{w.run.pk},{w.evaluation.pk}"}},
    ("runs:compare_json", "GET"): lambda w, actor: {"query": {"runs": f"{w.run.pk},{w.evaluation.pk}"}},
    ("runs:compare_changes", "GET"): lambda w, actor: {"query": {"a": w.run.pk, "b": w.evaluation.pk}},
    ("flows:save", "POST"): lambda w, actor: {
        "data": {"path": "flow.dag.yaml", "content": "stolen", "based_on": 2}
    },
    ("flows:file_add", "POST"): lambda w, actor: {"data": {"path": "stolen.py", "based_on": 2}},
    ("flows:file_rename", "POST"): lambda w, actor: {
        "data": {"path": "notes.md", "new_path": "stolen.md", "based_on": 2}
    },
    ("flows:file_delete", "POST"): lambda w, actor: {"data": {"path": "notes.md", "based_on": 2}},
    ("flows:upload", "POST"): lambda w, actor: {
        "data": {"based_on": 2, "files": _upload("stolen.txt", b"stolen")}
    },
    ("flows:import_version", "POST"): lambda w, actor: {"data": {"archive": zip_upload(), "based_on": 2}},
    ("flows:structure_add", "POST"): lambda w, actor: {
        "data": {"name": "stolen", "type": "string", "based_on": 2}
    },
    ("connections_update", "PATCH"): lambda w, actor: {"json": {"configs": {"model": "stolen"}}},
    ("flows_file_save", "PUT"): lambda w, actor: {"json": {"based_on": 2, "content": "stolen"}},
    ("flows_file_delete", "DELETE"): lambda w, actor: {"query": {"based_on": 2}},
    ("flows_import_version", "POST"): lambda w, actor: {"data": {"file": zip_upload()}},
    ("flows_share", "POST"): lambda w, actor: {"json": {"user": "outsider", "role": "editor"}},
    ("flows_unshare", "DELETE"): lambda w, actor: {"query": {"user": "teammate"}},
    ("runs_update", "PATCH"): lambda w, actor: {"json": {"display_name": "stolen"}},
    ("runs_rerun", "POST"): lambda w, actor: {"json": {"line_numbers": [0]}},
    # The outsider evaluates the owner's run with a flow of their own: only the run is foreign.
    ("runs_evaluate", "POST"): lambda w, actor: {
        "json": {
            "flow_id": (w.outsider_flow if actor == w.outsider else w.flow).pk,
            "column_mapping": {"question": "${run.outputs.answer}"},
        }
    },
    ("endpoints_update", "PATCH"): lambda w, actor: {"json": {"disabled": True}},
    ("endpoints_key_regenerate", "POST"): lambda w, actor: {"json": {"key_type": "primary"}},
}


def request_for(route: Route, method: str, world: World, actor: Any) -> dict[str, Any]:
    """What to send with `method` to `route` (query, form data or JSON), or nothing special."""
    build = REQUESTS.get((route.operation(method) or route.name, method))
    return build(world, actor) if build else {}


def send(client: Any, method: str, url: str, request: dict[str, Any] | None = None, **extra: Any) -> Any:
    """One request through Django's test client: `request` may hold `query`, `data` (form) or `json`."""
    request = request or {}
    if request.get("query"):
        url = f"{url}?{urlencode(request['query'], doseq=True)}"
    if "json" in request:
        return client.generic(
            method, url, json.dumps(request["json"]), content_type="application/json", **extra
        )
    if "data" in request:
        return getattr(client, method.lower())(url, request["data"], **extra)
    return client.generic(method, url, **extra)


def body_of(response: Any) -> bytes:
    """The whole body of a response, streamed or not."""
    return b"".join(response.streaming_content) if response.streaming else response.content
