"""Reads for users, teams and tokens (scoped to the requesting user), and the health report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from accounts_app.models import ApiToken, Membership, SetupToken, Team
from accounts_app.services import hash_token

logger = logging.getLogger(__name__)


def teams_for(user: AbstractBaseUser) -> QuerySet[Team]:
    """The teams the user belongs to, with their members prefetched."""
    if not user.is_authenticated:
        return Team.objects.none()
    return (
        Team.objects.filter(memberships__user=user)
        .prefetch_related(Prefetch("memberships", queryset=Membership.objects.select_related("user")))
        .distinct()
    )


def user_team_ids(user: AbstractBaseUser) -> frozenset[int]:
    """Ids of the teams the user belongs to: filter shared objects with `team_id__in=user_team_ids(user)`."""
    if not user.is_authenticated:
        return frozenset()
    return frozenset(Membership.objects.filter(user=user).values_list("team_id", flat=True))


def teams_for_admin(*, user: AbstractBaseUser) -> QuerySet[Team]:
    """Every team with its members, for the staff admin page."""
    if not getattr(user, "is_staff", False):
        raise PermissionDenied("Only staff can manage teams.")
    return Team.objects.prefetch_related(
        Prefetch("memberships", queryset=Membership.objects.select_related("user").order_by("user__username"))
    )


def users_for_admin(*, user: AbstractBaseUser) -> QuerySet[Any]:
    """Every user, for the staff admin page."""
    if not getattr(user, "is_staff", False):
        raise PermissionDenied("Only staff can manage users.")
    return get_user_model()._default_manager.order_by("username")


def tokens_for(*, user: AbstractBaseUser) -> QuerySet[ApiToken]:
    """The user's tokens that still work, newest first."""
    return ApiToken.objects.filter(user=user, revoked_at__isnull=True)


def setup_token_is_valid(*, token: str) -> bool:
    """Whether a first-user setup link can still be used."""
    if get_user_model()._default_manager.exists():
        return False
    return SetupToken.objects.filter(
        token_hash=hash_token(token), used_at__isnull=True, expires_at__gt=timezone.now()
    ).exists()


def _timed(name: str, check: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        detail = check() or {}
        result = {"ok": True, **detail}
    except Exception as exc:
        # Messages of connection errors can carry hosts or credentials: the log gets them, the response
        # (served to anonymous callers) only the error type.
        logger.warning("health check %s failed", name, exc_info=True)
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.monotonic() - start) * 1000, 1)
    return result


def _check_database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"vendor": connection.vendor}


def _check_broker() -> dict[str, Any]:
    from studio.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
        conn.default_channel  # noqa: B018 -- opening a channel proves the transport accepts work
        return {"transport": conn.transport_cls}


async def _channel_round_trip(timeout: float) -> dict[str, Any]:
    from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

    # A private layer instance, so this probe's subscription is closed with it and never lingers in the
    # layer the consumers share.
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    try:
        channel = await layer.new_channel("healthz.")
        nonce = secrets.token_hex(8)
        await layer.send(channel, {"type": "healthz.ping", "nonce": nonce})
        message = await asyncio.wait_for(layer.receive(channel), timeout)
        if message.get("nonce") != nonce:
            raise RuntimeError("the channel layer returned a different message")
        return {"backend": type(layer).__name__}
    finally:
        # Each backend names its clean-up differently; flush() on the pub/sub layer only drops this
        # instance's subscriptions, while on a database layer it would delete everyone's messages.
        if type(layer).__module__.startswith("channels_redis.pubsub"):
            await layer.flush()
        elif hasattr(layer, "close_pools"):
            await layer.close_pools()
        elif hasattr(layer, "close"):
            await layer.close()


def _check_workers(wait: float) -> dict[str, Any]:
    from accounts_app.tasks import ping

    # expires: a ping nobody picked up in time is dropped by the next worker instead of answered late.
    result = ping.apply_async(expires=max(wait, 1.0))
    try:
        reply = result.get(timeout=wait, interval=0.1)
    finally:
        # Nothing to forget when no worker answered (the file backend then has no file to delete).
        with contextlib.suppress(OSError):
            result.forget()
    return {"hostname": reply["hostname"]}


def health_report(*, wait: float = 5.0) -> dict[str, Any]:
    """Check the database, the broker, the channel layer and that a Celery worker answers within `wait` s."""
    checks = {
        "database": _timed("database", _check_database),
        "broker": _timed("broker", _check_broker),
        "channel_layer": _timed("channel_layer", lambda: async_to_sync(_channel_round_trip)(max(wait, 1.0))),
    }
    checks["workers"] = (
        _timed("workers", lambda: _check_workers(wait))
        if checks["broker"]["ok"]
        else {"ok": False, "error": "BrokerUnavailable", "ms": 0.0}
    )
    if not checks["workers"]["ok"] and checks["workers"]["error"] == "TimeoutError":
        checks["workers"]["error"] = f"no worker answered within {wait:g} s"
    return {"status": "ok" if all(c["ok"] for c in checks.values()) else "error", "checks": checks}
