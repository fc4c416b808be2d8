from __future__ import annotations

from django.apps import AppConfig


class FlowsAppConfig(AppConfig):
    name = "flows_app"
    default_auto_field = "django.db.models.BigAutoField"
