"""Django admin registrations for the accounts models (tokens are read-only: only hashes are stored)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from accounts_app.models import ApiToken, Membership, Team


class MembershipInline(admin.TabularInline):
    """Members of a team."""

    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    """Teams with their members."""

    list_display = ["name", "created_by", "created_at"]
    search_fields = ["name"]
    inlines = [MembershipInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Personal access tokens, for auditing; created and revoked from the Settings page or the API."""

    list_display = ["name", "user", "prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["user", "name", "prefix", "token_hash", "created_at", "last_used_at", "revoked_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Tokens are created through token_create, which shows the plaintext once."""
        return False
