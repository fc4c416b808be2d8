"""System checks that catch a misconfigured studio at start-up (ids studio.E0xx / studio.W0xx)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

_BROKER_SCHEMES = {"filesystem", "redis", "rediss", "amqp", "amqps", "pyamqp", "sqs", "memory"}


@register(Tags.security)
def check_encryption_keys(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """studio.E001: every connection-encryption key is a valid Fernet key."""
    from cryptography.fernet import Fernet

    errors: list[CheckMessage] = []
    for index, key in enumerate(settings.STUDIO_ENCRYPTION_KEYS, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            errors.append(
                Error(
                    f"Key number {index} in STUDIO_ENCRYPTION_KEYS is not a Fernet key.",
                    hint="Each key is 32 random bytes in url-safe base64; make one with "
                    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'.",
                    id="studio.E001",
                )
            )
    return errors


@register()
def check_broker(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """studio.E002: the Celery broker URL names a transport; studio.W001: a file broker with a shared database."""
    scheme = settings.CELERY_BROKER_URL.split("://", 1)[0].lower()
    messages: list[CheckMessage] = []
    if "://" not in settings.CELERY_BROKER_URL or scheme not in _BROKER_SCHEMES:
        messages.append(
            Error(
                f"CELERY_BROKER_URL uses the unknown transport {scheme!r}.",
                hint="Use redis://host:6379/1 or amqp://user@host// for several hosts, or leave it unset "
                "for the embedded broker (filesystem://).",
                id="studio.E002",
            )
        )
    if scheme == "filesystem" and settings.DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
        messages.append(
            Warning(
                "The database is shared (DATABASE_URL) but the Celery broker is the embedded file broker, "
                "so workers on other hosts never see the tasks.",
                hint="Set CELERY_BROKER_URL (and REDIS_URL) as well when workers run on several hosts.",
                id="studio.W001",
            )
        )
    return messages


@register()
def check_data_dir(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """studio.E003: the data directory is writable."""
    if os.access(settings.DATA_DIR, os.W_OK):
        return []
    return [
        Error(
            f"The data directory {settings.DATA_DIR} is not writable.",
            hint="Set STUDIO_DATA_DIR to a directory the studio's user may write, or fix its permissions.",
            id="studio.E003",
        )
    ]


@register(Tags.security, deploy=True)
def check_production(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """studio.W002: production settings are on when checking for deployment."""
    if settings.PRODUCTION:
        return []
    return [
        Warning(
            "STUDIO_PRODUCTION is not set, so cookies are not marked secure and HTTPS is not enforced.",
            hint="Set STUDIO_PRODUCTION=1 (with STUDIO_SECRET_KEY and STUDIO_ALLOWED_HOSTS) in production.",
            id="studio.W002",
        )
    ]
