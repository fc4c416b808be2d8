"""REST routes for the signed-in user and their tokens, and the bearer-token authentication of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from ninja import Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from ninja.security import HttpBearer

from accounts_app import selectors, services
from accounts_app.models import ApiToken


class TokenAuth(HttpBearer):
    """`Authorization: Bearer fst_…` with a personal access token; request.auth becomes its user."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        """The token's user, None for an unknown token, or a 401 naming the revocation."""
        try:
            user = services.token_authenticate(plaintext=token)
        except services.TokenRevokedError as exc:
            raise HttpError(401, str(exc)) from None
        if user is not None:
            # Views and selectors written for sessions read request.user.
            request.user = user
        return user


router = Router(tags=["accounts"])


class MeOut(Schema):
    """The authenticated user."""

    id: int
    username: str
    email: str
    is_staff: bool
    teams: list[str]


class TokenOut(Schema):
    """A personal access token as listed: never the token itself."""

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreateIn(Schema):
    """The label of a new token."""

    name: str


class TokenCreatedOut(TokenOut):
    """A new token, with its plaintext shown this once."""

    token: str


def _token_out(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.pk,
        "name": token.name,
        "prefix": token.prefix,
        "created_at": token.created_at,
        "last_used_at": token.last_used_at,
        "revoked_at": token.revoked_at,
    }


@router.get("/me", response=MeOut, summary="The user the token belongs to")
def me(request: HttpRequest) -> dict[str, Any]:
    """The user the token belongs to and their teams."""
    user = request.auth  # type: ignore[attr-defined]
    return {
        "id": user.pk,
        "username": user.get_username(),
        "email": user.email,
        "is_staff": user.is_staff,
        "teams": [team.name for team in selectors.teams_for(user)],
    }


@router.get("/tokens", response=list[TokenOut], summary="The user's active tokens")
def token_list(request: HttpRequest) -> list[dict[str, Any]]:
    """The user's tokens that still work."""
    return [_token_out(t) for t in selectors.tokens_for(user=request.auth)]  # type: ignore[attr-defined]


@router.post("/tokens", response={201: TokenCreatedOut}, summary="Create a token (shown once)")
def token_create(request: HttpRequest, payload: TokenCreateIn) -> Status[dict[str, Any]]:
    """Create a token; the response is the only time its plaintext is shown."""
    try:
        created = services.token_create(user=request.auth, name=payload.name)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise HttpError(422, "; ".join(exc.messages)) from None
    return Status(201, {**_token_out(created.token), "token": created.plaintext})


@router.delete("/tokens/{token_id}", response=TokenOut, summary="Revoke a token")
def token_revoke(request: HttpRequest, token_id: int) -> dict[str, Any]:
    """Revoke one of the user's tokens; someone else's token is a 404."""
    try:
        token = services.token_revoke(token_id=token_id, user=request.auth)  # type: ignore[attr-defined]
    except ApiToken.DoesNotExist:
        raise HttpError(404, f"No token with id {token_id}.") from None
    return _token_out(token)
