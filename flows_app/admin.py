"""Django admin for the flows app: connections are shown without their secrets."""

from __future__ import annotations

from django.contrib import admin

from flows_app.models import Connection


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    """Read-mostly view of connections; secrets stay encrypted and are never shown or edited here."""

    list_display = ("name", "type", "owner", "team", "updated_at")
    list_filter = ("type",)
    search_fields = ("name", "owner__username")
    exclude = ("encrypted_secrets",)
    readonly_fields = ("id", "secret_names", "created_at", "updated_at", "created_by", "updated_by")
    raw_id_fields = ("owner", "team")
