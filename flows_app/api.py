"""REST routes of this app under /api/v1/ (TokenAuth is applied to the whole API in studio/api.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest
from ninja import Router, Schema
from pydantic import Field

from flows_app.models import CONNECTION_NAME_RULE, Connection
from flows_app.selectors import connection_get_for, connection_list_for
from flows_app.services import (
    KEEP,
    SECRET_MASK,
    connection_create,
    connection_delete,
    connection_test,
    connection_update,
)

router = Router(tags=["connections"])

ConnectionType = Literal["open_ai", "azure_open_ai", "openai_compatible", "custom"]
ConfigValue = str | int | float | bool | None


class ConnectionOut(Schema):
    """A connection as the API shows it: every secret value is '******'."""

    id: UUID
    name: str
    type: ConnectionType
    configs: dict[str, ConfigValue]
    secrets: dict[str, str] = Field(description="Secret names, each with the value '******'.")
    owner: str
    team: str | None = Field(description="The team it is shared with (read-only for its members).")
    editable: bool = Field(description="Whether the caller owns it and may change it.")
    created_at: datetime
    updated_at: datetime


class ConnectionIn(Schema):
    """A new connection; secrets are encrypted at rest and never returned."""

    name: str = Field(description=f"Flows refer to it by this name: {CONNECTION_NAME_RULE}.")
    type: ConnectionType
    configs: dict[str, ConfigValue] = Field(
        default_factory=dict,
        description="base_url, api_base, api_version, organization, model, or any custom key.",
    )
    secrets: dict[str, str] = Field(default_factory=dict, description="api_key and any custom secrets.")
    team: str | None = Field(default=None, description="Name of one of your teams to share it with.")


class ConnectionPatch(Schema):
    """A partial update: configs, when given, replace the stored ones; secrets merge."""

    name: str | None = None
    type: ConnectionType | None = None
    configs: dict[str, ConfigValue] | None = None
    secrets: dict[str, str | None] | None = Field(
        default=None,
        description="'******' or '' keeps a stored value, null removes it, anything else sets it.",
    )
    team: str | None = Field(default=None, description="A team name to share with; null or '' stops sharing.")


class TestOut(Schema):
    """The outcome of one real call with the connection."""

    ok: bool
    message: str


class ErrorOut(Schema):
    """An error with the messages of each field at fault."""

    detail: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


def _user(request: HttpRequest) -> AbstractBaseUser:
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, AbstractBaseUser) else request.user  # type: ignore[return-value]


def _out(connection: Connection, user: AbstractBaseUser) -> dict[str, Any]:
    return {
        "id": connection.id,
        "name": connection.name,
        "type": connection.type,
        "configs": connection.configs,
        "secrets": {name: SECRET_MASK for name in connection.secret_names},
        "owner": connection.owner.get_username(),
        "team": connection.team.name if connection.team_id else None,
        "editable": connection.owner_id == user.pk,
        "created_at": connection.created_at,
        "updated_at": connection.updated_at,
    }


def _error(error: ValidationError) -> ErrorOut:
    errors = error.message_dict if hasattr(error, "error_dict") else {"__all__": error.messages}
    detail = "; ".join(f"{field}: {message}" for field, messages in errors.items() for message in messages)
    return ErrorOut(detail=detail, errors=errors)


def _team(user: AbstractBaseUser, name: str | None) -> Any:
    from accounts_app.models import Team
    from accounts_app.selectors import user_team_ids

    if not name:
        return None
    team = Team.objects.filter(name=name, pk__in=list(user_team_ids(user))).first()
    if team is None:
        raise ValidationError({"team": f"You are not a member of a team named '{name}'."})
    return team


def _editable(request: HttpRequest, name: str) -> Connection:
    try:
        return connection_get_for(_user(request), name=name, editable=True)
    except PermissionDenied as denied:
        from ninja.errors import HttpError

        raise HttpError(403, str(denied)) from None


@router.get("/connections", response=list[ConnectionOut], summary="List your connections and shared ones")
def connections_list(request: HttpRequest) -> list[dict[str, Any]]:
    """Your connections plus those shared with your teams; secrets masked."""
    user = _user(request)
    return [_out(connection, user) for connection in connection_list_for(user)]


@router.post("/connections", response={201: ConnectionOut, 422: ErrorOut}, summary="Create a connection")
def connections_create(request: HttpRequest, payload: ConnectionIn) -> tuple[int, Any]:
    """Create a connection owned by the caller."""
    user = _user(request)
    try:
        connection = connection_create(
            owner=user,
            name=payload.name,
            type=payload.type,
            configs=payload.configs,
            secrets=payload.secrets,
            team=_team(user, payload.team),
        )
    except ValidationError as error:
        return 422, _error(error)
    return 201, _out(connection, user)


@router.get("/connections/{name}", response=ConnectionOut, summary="Show a connection")
def connections_get(request: HttpRequest, name: str) -> dict[str, Any]:
    """One connection by name (yours first, then shared ones); secrets masked."""
    user = _user(request)
    return _out(connection_get_for(user, name=name), user)


@router.patch(
    "/connections/{name}",
    response={200: ConnectionOut, 403: ErrorOut, 422: ErrorOut},
    summary="Update a connection",
)
def connections_update(request: HttpRequest, name: str, payload: ConnectionPatch) -> tuple[int, Any]:
    """Change a connection you own; secrets you leave out or send as '******' stay as they are."""
    user = _user(request)
    connection = _editable(request, name)
    try:
        team = _team(user, payload.team) if "team" in payload.model_fields_set else KEEP
        connection = connection_update(
            connection=connection,
            by=user,
            name=payload.name,
            type=payload.type,
            configs=payload.configs,
            secrets=payload.secrets,
            team=team,
        )
    except ValidationError as error:
        return 422, _error(error)
    return 200, _out(connection, user)


@router.delete("/connections/{name}", response={204: None, 403: ErrorOut}, summary="Delete a connection")
def connections_delete(request: HttpRequest, name: str) -> tuple[int, None]:
    """Delete a connection you own."""
    connection_delete(connection=_editable(request, name), by=_user(request))
    return 204, None


@router.post("/connections/{name}/test", response=TestOut, summary="Test a connection with one real call")
def connections_test(request: HttpRequest, name: str) -> TestOut:
    """List models (or a 1-token chat when a default model is set); the message never contains a secret."""
    result = connection_test(connection=connection_get_for(_user(request), name=name))
    return TestOut(ok=result.ok, message=result.message)
