"""Reads of the flows app (connections and flows), always scoped to the requesting user."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Case, CharField, Exists, OuterRef, Prefetch, Q, QuerySet, Value, When
from django.http import Http404

from flows_app.models import Connection, Flow, FlowShare, FlowVersion, Snapshot

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser


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


def flow_versions_for(user: AbstractBaseUser | AnonymousUser, flow_id: int) -> QuerySet[FlowVersion]:
    """A flow's history, newest first, with author, based-on number, file count and size; manifests left out."""
    flow = flow_get_for(user, flow_id)
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
