"""The REST API at /api/v1/: one NinjaAPI with a router per app."""

from __future__ import annotations

from ninja import NinjaAPI

from accounts_app.api import TokenAuth
from accounts_app.api import router as accounts_router
from flows_app.api import router as flows_router
from runs_app.api import router as runs_router

api = NinjaAPI(
    title="Flow Studio API",
    version="1",
    urls_namespace="api",
    auth=TokenAuth(),
    openapi_url="/openapi.json",
    docs_url="/docs",
)
api.add_router("/", accounts_router)
api.add_router("/", flows_router)
api.add_router("/", runs_router)
