"""Page routes of the accounts app.

Django's own auth names (`login`, `logout`, `password_change`, `password_reset_confirm`, ...) stay global,
as `django.contrib.auth.urls` has them, because Django's views reverse them by those names; the studio's
own pages live in the `accounts` namespace.
"""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import URLPattern, URLResolver, include, path, reverse_lazy

from accounts_app import views

accounts_patterns: list[URLPattern | URLResolver] = [
    path("settings/", views.settings_page, name="settings"),
    path("settings/tokens/new", views.token_create, name="token_create"),
    path("settings/tokens/<int:token_id>/revoke", views.token_revoke, name="token_revoke"),
    path("admin/", views.admin_page, name="admin"),
    path("admin/users/new", views.user_invite, name="user_invite"),
    path("admin/users/<int:user_id>/link", views.user_link, name="user_link"),
    path("admin/teams/new", views.team_create, name="team_create"),
    path("admin/teams/<int:team_id>/delete", views.team_delete, name="team_delete"),
    path("admin/teams/<int:team_id>/members/add", views.team_member_add, name="team_member_add"),
    path(
        "admin/teams/<int:team_id>/members/<int:user_id>/remove",
        views.team_member_remove,
        name="team_member_remove",
    ),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("setup/<str:token>", views.setup, name="setup"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("password/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path(
        "set-password/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(
            success_url=reverse_lazy("password_reset_complete"), post_reset_login=False
        ),
        name="password_reset_confirm",
    ),
    path(
        "set-password/done/", auth_views.PasswordResetCompleteView.as_view(), name="password_reset_complete"
    ),
    path("", include((accounts_patterns, "accounts"))),
]
