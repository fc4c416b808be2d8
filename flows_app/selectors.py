"""Reads of the flows app (connections and flows), always scoped to the requesting user."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Page, Paginator
from django.db.models import Case, CharField, Exists, F, OuterRef, Prefetch, Q, QuerySet, Value, When
from django.http import Http404

from flows_app.models import Connection, Flow, FlowShare, FlowTest, FlowVersion, Snapshot

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

    from flowengine import Flow as EngineFlow


def connection_list_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Connection]:
    """The user's own connections plus those shared with any of the user's teams."""
    from accounts_app.selectors import user_team_ids

    if not user.is_authenticated:
        return Connection.objects.none()
    return (
        Connection.objects.filter(Q(owner=user) | Q(team_id__in=list(user_team_ids(user))))
        .select_related("owner", "team")
        .order_by("name", "created_at")
    )


def connection_get_for(
    user: AbstractBaseUser | AnonymousUser,
    *,
    pk: UUID | str | None = None,
    name: str | None = None,
    editable: bool = False,
) -> Connection:
    """One connection the user may see, by id or by name; Http404 for anything else.

    By name, the user's own connection wins over shared ones; among shared ones the oldest wins.
    With editable=True a teammate who can only see it gets PermissionDenied (they know it exists).
    """
    visible = connection_list_for(user)
    if pk is not None:
        try:
            connection = visible.filter(pk=pk).first()
        except (ValueError, TypeError, ValidationError):
            connection = None
    elif name is not None:
        connection = visible.filter(name=name, owner=user).first() if user.is_authenticated else None
        connection = connection or visible.filter(name=name).order_by("created_at").first()
    else:
        raise TypeError("connection_get_for needs pk or name")
    if connection is None:
        raise Http404("No such connection.")
    if editable and connection.owner_id != user.pk:
        raise PermissionDenied("This connection is shared with you read-only; only its owner can change it.")
    return connection


def connection_map_for_runner(
    user: AbstractBaseUser | AnonymousUser, *, names: list[str] | set[str]
) -> dict[str, Connection]:
    """The connections a flow of this user refers to, by name (own first, then shared), missing names left out."""
    found: dict[str, Connection] = {}
    for connection in connection_list_for(user).filter(name__in=list(names)).order_by("created_at"):
        current = found.get(connection.name)
        if current is None or (connection.owner_id == user.pk and current.owner_id != user.pk):
            found[connection.name] = connection
    return found


# --- flows ------------------------------------------------------------------------------------------

# Rows per page of a flow's history.
HISTORY_PER_PAGE = 50

ROLE_RANK = {"viewer": 1, "editor": 2, "owner": 3}


def flow_list_for(
    user: AbstractBaseUser | AnonymousUser,
    *,
    trash: bool = False,
    include_trash: bool = False,
    query: str = "",
    team_id: int | None = None,
) -> QuerySet[Flow]:
    """Flows the user owns or that are shared with them (directly, through a share to one of their teams, or
    filed under one of their teams), each annotated with `role`: "owner" | "editor" | "viewer".

    Trashed flows are left out; `trash=True` lists only the user's own trashed flows, `include_trash=True`
    lists both. Owner, team, head version and its author are fetched in the same query.
    """
    from accounts_app.selectors import user_team_ids

    if not user.is_authenticated:
        return Flow.objects.none()
    team_ids = list(user_team_ids(user))
    shares = FlowShare.objects.filter(flow=OuterRef("pk")).filter(Q(user=user) | Q(team_id__in=team_ids))
    visible = Q(owner=user) | Q(Exists(shares)) | Q(team_id__in=team_ids)
    flows = Flow.objects.filter(visible)
    if trash:
        flows = flows.filter(owner=user, deleted_at__isnull=False)
    elif not include_trash:
        flows = flows.filter(deleted_at__isnull=True)
    if query:
        flows = flows.filter(Q(name__icontains=query) | Q(description__icontains=query))
    if team_id is not None:
        flows = flows.filter(Q(team_id=team_id) | Q(shares__team_id=team_id)).distinct()
    return (
        flows.annotate(
            role=Case(
                When(owner=user, then=Value("owner")),
                When(Exists(shares.filter(role=FlowShare.Role.EDITOR)), then=Value("editor")),
                default=Value("viewer"),
                output_field=CharField(),
            )
        )
        .select_related("owner", "team", "head", "head__author")
        .defer("head__message")
        .order_by("-updated_at", "-id")
    )


def flow_get_for(
    user: AbstractBaseUser | AnonymousUser, flow_id: int, *, edit: bool = False, include_trash: bool = False
) -> Flow:
    """One flow the user may see, with `role` annotated; Http404 for anything else (never 403).

    With edit=True a viewer gets PermissionDenied (they already know it exists); `include_trash=True`
    also finds the user's own trashed flows (for restore).
    """
    try:
        flow = flow_list_for(user, include_trash=include_trash).filter(pk=int(flow_id)).first()
    except (TypeError, ValueError):
        flow = None
    if flow is None:
        raise Http404("No such flow.")
    if edit and flow.role not in ("owner", "editor"):
        raise PermissionDenied(f"Flow '{flow.name}' is shared with you read-only.")
    return flow


def flow_role_for(user: AbstractBaseUser | AnonymousUser, flow: Flow) -> str | None:
    """The user's role on the flow: "owner" | "editor" | "viewer", or None when they may not see it."""
    from accounts_app.selectors import user_team_ids

    if not user.is_authenticated:
        return None
    if flow.owner_id == user.pk:
        return "owner"
    team_ids = user_team_ids(user)
    if flow.deleted_at is not None:
        return None
    roles = set(
        FlowShare.objects.filter(flow_id=flow.pk)
        .filter(Q(user=user) | Q(team_id__in=list(team_ids)))
        .values_list("role", flat=True)
    )
    if "editor" in roles:
        return "editor"
    if roles or flow.team_id in team_ids:
        return "viewer"
    return None


def flow_version_get_for(
    user: AbstractBaseUser | AnonymousUser, flow_id: int, number: int | None = None
) -> FlowVersion:
    """One version of a flow the user may see (None = the head), with its snapshot; Http404 otherwise."""
    flow = flow_get_for(user, flow_id)
    if number is None:
        if flow.head_id is None:
            raise Http404("This flow has no versions.")
        number = flow.head.number
    version = (
        FlowVersion.objects.select_related("snapshot", "author").filter(flow=flow, number=number).first()
    )
    if version is None:
        raise Http404(f"Flow '{flow.name}' has no version {number}.")
    version.flow = flow
    return version


def _history_rows(flow: Flow) -> QuerySet[FlowVersion]:
    return (
        FlowVersion.objects.filter(flow=flow)
        .select_related("author", "based_on", "snapshot")
        .only(
            "id",
            "flow_id",
            "number",
            "created_at",
            "message",
            "author__id",
            "author__username",
            "based_on__id",
            "based_on__number",
            "snapshot__sha256",
            "snapshot__file_count",
            "snapshot__total_size",
        )
        .order_by("-number")
    )


def flow_versions_for(user: AbstractBaseUser | AnonymousUser, flow_id: int) -> QuerySet[FlowVersion]:
    """A flow's history, newest first, with author, based-on number, file count and size; manifests left out."""
    return _history_rows(flow_get_for(user, flow_id))


def flow_history_for(
    user: AbstractBaseUser | AnonymousUser,
    flow_id: int,
    *,
    page: int | str | None = None,
    per_page: int | None = None,
) -> tuple[Flow, Page[dict[str, Any]]]:
    """The flow and one page of its history, newest first (page 1 holds the head), in a fixed number of queries.

    Each row is a dict: number, previous_number, message, created_at, author_name, based_on_number,
    file_count, total_size.

    `per_page` defaults to HISTORY_PER_PAGE. A page number past the end gives the last page, one that is not a
    number the first.
    """
    flow = flow_get_for(user, flow_id)
    # Plain rows of just the shown columns: a page renders them without building model instances.
    rows = (
        FlowVersion.objects.filter(flow=flow)
        .order_by("-number")
        .values("number", "message", "created_at")
        .annotate(
            previous_number=F("number") - 1,
            author_name=F("author__username"),
            based_on_number=F("based_on__number"),
            file_count=F("snapshot__file_count"),
            total_size=F("snapshot__total_size"),
        )
    )
    return flow, Paginator(rows, per_page or HISTORY_PER_PAGE).get_page(page)


class VersionPair(NamedTuple):
    """Two versions of one flow to compare, and every version number of the flow (newest first) to pick from."""

    flow: Flow
    old: FlowVersion
    new: FlowVersion
    numbers: list[int]


def flow_version_pair_for(
    user: AbstractBaseUser | AnonymousUser, flow_id: int, *, a: int | None, b: int | None
) -> VersionPair:
    """Versions `a` and `b` of a flow the user may see, with snapshots and authors; Http404 when one is missing.

    `b` defaults to the head and `a` to the version before `b` (or `b` itself for a flow of one version).
    """
    flow = flow_get_for(user, flow_id)
    if b is None:
        if flow.head_id is None:
            raise Http404("This flow has no versions.")
        b = flow.head.number
    if a is None:
        a = max(b - 1, 1)
    found = {
        v.number: v
        for v in FlowVersion.objects.select_related("snapshot", "author").filter(flow=flow, number__in={a, b})
    }
    for number in (a, b):
        if number not in found:
            raise Http404(f"Flow '{flow.name}' has no version {number}.")
        found[number].flow = flow
    numbers = list(FlowVersion.objects.filter(flow=flow).order_by("-number").values_list("number", flat=True))
    return VersionPair(flow, found[a], found[b], numbers)


def flow_shares_for(user: AbstractBaseUser | AnonymousUser, flow_id: int) -> QuerySet[FlowShare]:
    """The shares of a flow the user may see, with users and teams."""
    flow = flow_get_for(user, flow_id)
    return FlowShare.objects.filter(flow=flow).select_related("user", "team").order_by("id")


def snapshot_get_for(user: AbstractBaseUser | AnonymousUser, sha256: str) -> Snapshot:
    """A snapshot used by a version of a flow the user may see; Http404 otherwise."""
    visible = flow_list_for(user, include_trash=True).values("pk")
    snapshot = Snapshot.objects.filter(sha256=str(sha256), versions__flow__in=visible).first()
    if snapshot is None:
        raise Http404("No such snapshot.")
    return snapshot


def flows_with_shares(flows: QuerySet[Flow]) -> QuerySet[Flow]:
    """The same flows with their shares (and those shares' users and teams) prefetched, for list pages."""
    return flows.prefetch_related(
        Prefetch("shares", queryset=FlowShare.objects.select_related("user", "team").order_by("id"))
    )


# --- single tests (the test pane of the authoring page) ----------------------------------------------

# JSON editors get these input types; everything else is typed in as text.
FLOWTEST_JSON_TYPES = ("list", "object", "array", "dict")
FLOWTEST_NUMBER_TYPES = ("int", "integer", "double", "float", "number")
FLOWTEST_DATA_FILES = ("data.jsonl", "samples.jsonl", "sample.jsonl")


def flowtest_list_for(user: AbstractBaseUser | AnonymousUser, flow_id: int) -> QuerySet[FlowTest]:
    """The newest tests of a flow the user may see (at most FLOWTEST_KEEP), without their logs and trace."""
    from flows_app.services import FLOWTEST_KEEP

    flow = flow_get_for(user, flow_id)
    return (
        FlowTest.objects.filter(flow=flow)
        .select_related("user", "version")
        .defer("logs", "trace")
        .order_by("-created_at", "-id")[:FLOWTEST_KEEP]
    )


def flowtest_get_for(user: AbstractBaseUser | AnonymousUser, flow_id: int, test_id: int) -> FlowTest:
    """One test of a flow the user may see, with everything recorded; Http404 otherwise."""
    flow = flow_get_for(user, flow_id)
    try:
        test = FlowTest.objects.select_related("user", "version").filter(flow=flow, pk=int(test_id)).first()
    except (TypeError, ValueError):
        test = None
    if test is None:
        raise Http404("No such test of this flow.")
    return test


def _flowtest_first_row(folder: Path) -> tuple[dict[str, Any], str | None]:
    """The first row of the flow folder's own dataset (data.jsonl and the like), as a starting point."""
    candidates = [folder / name for name in FLOWTEST_DATA_FILES]
    for path in candidates:
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    return {}, None
                return (row, f"the first row of {path.name}") if isinstance(row, dict) else ({}, None)
    return {}, None


def _flowtest_sample(flow: EngineFlow) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (inputs, init) parts of the flow's `sample`, as `flowstudio flow test` reads them."""
    sample = dict(flow.sample or {})
    if flow.kind == "flex" and isinstance(sample.get("inputs"), Mapping):
        return dict(sample["inputs"]), dict(sample.get("init") or {})
    if flow.kind == "flex" and isinstance(sample.get("init"), Mapping):
        return {k: v for k, v in sample.items() if k != "init"}, dict(sample["init"])
    return sample, {}


def _flowtest_field(name: str, spec: Any, value: Any, *, present: bool) -> dict[str, Any]:
    """One form field: how to edit it (text, textarea, number, bool, json, select) and its starting text."""
    type_ = str(getattr(spec, "type", "") or "string").lower()
    enum = list(getattr(spec, "enum", ()) or ())
    if enum:
        widget = "select"
    elif type_ in FLOWTEST_JSON_TYPES:
        widget = "json"
    elif type_ in FLOWTEST_NUMBER_TYPES:
        widget = "number"
    elif type_ in ("bool", "boolean"):
        widget = "bool"
    elif type_ in ("string", "str", "text"):
        widget = "textarea" if isinstance(value, str) and ("\n" in value or len(value) > 80) else "text"
    else:
        widget = "json"
    if not present:
        text = ""
    elif widget == "json" or (widget != "bool" and not isinstance(value, str | int | float)):
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        widget = "json" if widget in ("text", "textarea") else widget
    else:
        text = str(value)
    return {
        "name": name,
        "type": type_,
        "widget": widget,
        "value": text,
        "checked": bool(value) if present else False,
        "enum": [str(e) for e in enum],
        "description": str(getattr(spec, "description", "") or ""),
        "required": not present and not getattr(spec, "has_default", False),
        "chat_input": bool(getattr(spec, "is_chat_input", False)),
        "chat_history": bool(getattr(spec, "is_chat_history", False)),
    }


def flowtest_form_for(user: AbstractBaseUser | AnonymousUser, flow_id: int) -> dict[str, Any]:
    """What the test pane's form shows for the flow's saved head: input fields with starting values (the
    flow's sample, else the first row of its own data.jsonl, else defaults), chat roles, variants, and for
    each node the inputs of a single-node test. `problem` is set when the flow does not load.
    """
    from flows_app.services import snapshot_materialize
    from flows_app.workspace import workspace_state

    version = flow_version_get_for(user, flow_id)
    folder = Path(snapshot_materialize(snapshot_sha=version.snapshot_id))
    state = workspace_state(folder)
    form: dict[str, Any] = {
        "flow": version.flow,
        "version": version,
        "kind": state.kind,
        "problem": None,
        "fields": [],
        "init_fields": [],
        "chat": None,
        "variants": [],
        "nodes": [],
        "outputs": [],
        "start_from": None,
    }
    flow = state.flow
    if flow is None:
        form["problem"] = str(state.problems[0]) if state.problems else "The flow does not load."
        return form
    sample_inputs, sample_init = _flowtest_sample(flow)
    row, row_source = _flowtest_first_row(folder)
    start: dict[str, Any] = {}
    if sample_inputs:
        start, form["start_from"] = sample_inputs, "the flow's sample"
    elif row:
        start, form["start_from"] = row, row_source
    names = list(flow.inputs) or (list(start) if flow.kind != "dag" else [])
    for name in names:
        spec = flow.inputs.get(name)
        if name in start:
            value, present = start[name], True
        elif spec is not None and spec.default is not None:
            value, present = spec.default, True
        elif spec is not None and spec.is_chat_history:
            value, present = [], True
        else:
            value, present = None, False
        form["fields"].append(_flowtest_field(name, spec, value, present=present))
    for name, spec in flow.init.items():
        present = name in sample_init or spec.default is not None
        value = sample_init.get(name, spec.default)
        form["init_fields"].append(_flowtest_field(name, spec, value, present=present))
    if flow.is_chat:
        form["chat"] = {
            "input": flow.chat_input_name,
            "history": flow.chat_history_name,
            "output": flow.chat_output_name or next(iter(flow.outputs), None),
        }
    for node_name in flow.node_variants:
        ids = flow.variant_ids(node_name)
        for index, variant_id in enumerate(ids):
            label = f"{node_name}: {variant_id}" + (" (default)" if index == 0 else "")
            form["variants"].append({"value": "${" + f"{node_name}.{variant_id}" + "}", "label": label})
    by_name = {f["name"]: f for f in form["fields"]}
    # Nodes with variants read their inputs from the default variant.
    for node in flow.with_variant(None).line_nodes if flow.kind == "dag" else ():
        fields: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _, ref in node.references():
            key = ref.name if ref.kind == "input" else f"{ref.name}.{ref.section}"
            if key in seen:
                continue
            seen.add(key)
            if ref.kind == "input" and key in by_name:
                fields.append(dict(by_name[key], label=f"inputs.{key}"))
            else:
                field = _flowtest_field(key, None, None, present=False)
                fields.append(dict(field, widget="json", label=key))
        form["nodes"].append({"name": node.name, "type": node.type, "fields": fields})
    form["outputs"] = list(flow.outputs)
    return form
