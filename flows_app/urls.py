"""Page routes of this app."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from flows_app import views

connection_patterns: list[URLPattern | URLResolver] = [
    path("", views.connection_list, name="list"),
    path("new", views.connection_new, name="new"),
    path("<uuid:pk>/", views.connection_detail, name="detail"),
    path("<uuid:pk>/edit", views.connection_edit, name="edit"),
    path("<uuid:pk>/delete", views.connection_delete_view, name="delete"),
    path("<uuid:pk>/test", views.connection_test_view, name="test"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("connections/", include((connection_patterns, "connections"))),
]
