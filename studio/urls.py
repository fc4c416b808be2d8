"""URL wiring of every app."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from studio.api import api

urlpatterns = [
    path("", include("accounts_app.urls")),
    path("", include("flows_app.urls")),
    path("", include("runs_app.urls")),
    path("api/v1/", api.urls),
    path("django-admin/", admin.site.urls),
]
