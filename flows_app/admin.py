"""Django admin for the flows app: connections without their secrets; flows, versions and storage read-only."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from flows_app.models import Blob, Connection, Flow, FlowShare, FlowVersion, Snapshot


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


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that only the studio's services write: version history and content-addressed storage."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Created by the studio's services only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        """Versions and snapshots are immutable."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        """Runs and deployments may point at any of these rows."""
        return False


class FlowShareInline(admin.TabularInline):
    """Who a flow is shared with."""

    model = FlowShare
    extra = 0
    can_delete = False
    readonly_fields = ("user", "team", "role", "created_at")

    def has_add_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        """Shares are made in the studio, which checks team membership."""
        return False


@admin.register(Flow)
class FlowAdmin(ReadOnlyAdmin):
    """Flows with owner, team, head version and trash state."""

    list_display = ("name", "owner", "team", "kind", "head", "updated_at", "deleted_at")
    list_filter = ("kind", ("deleted_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "owner__username")
    list_select_related = ("owner", "team", "head")
    inlines = [FlowShareInline]


@admin.register(FlowVersion)
class FlowVersionAdmin(ReadOnlyAdmin):
    """Every saved version: who, when, why."""

    list_display = ("flow", "number", "author", "created_at", "message")
    search_fields = ("flow__name", "author__username", "message")
    list_select_related = ("flow", "author")


@admin.register(Snapshot)
class SnapshotAdmin(ReadOnlyAdmin):
    """Manifests of flow folders, by hash."""

    list_display = ("sha256", "file_count", "total_size", "created_at")
    search_fields = ("sha256",)


@admin.register(Blob)
class BlobAdmin(ReadOnlyAdmin):
    """Distinct file contents, by hash; the bytes themselves are not shown."""

    list_display = ("sha256", "size")
    search_fields = ("sha256",)
    exclude = ("data",)
