"""Users, teams, personal access tokens, first-user setup and the studio launcher."""

from __future__ import annotations

from django.apps import AppConfig


class AccountsAppConfig(AppConfig):
    """The accounts app; it also registers the studio-wide system checks."""

    name = "accounts_app"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the studio's system checks."""
        from studio import checks  # noqa: F401
