"""Reads of the flows app, always scoped to the requesting user."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q, QuerySet
from django.http import Http404

from flows_app.models import Connection

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
