from __future__ import annotations

from django.apps import AppConfig


class AccountsAppConfig(AppConfig):
    name = "accounts_app"
    default_auto_field = "django.db.models.BigAutoField"
