"""Django admin for the flows app: connections are shown read-only and without their secrets."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from flows_app.models import Connection


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    """View-only list of connections; changes go through the studio's pages and services, which encrypt."""

    list_display = ("name", "type", "owner", "team", "updated_at")
    list_filter = ("type",)
    search_fields = ("name", "owner__username")
    list_select_related = ("owner", "team")
    exclude = ("encrypted_secrets",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Connections are created in the studio, where secrets are encrypted."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Connection | None = None) -> bool:
        """Connections are changed in the studio, where secrets are encrypted."""
        return False
