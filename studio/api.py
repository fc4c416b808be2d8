"""The REST API at /api/v1/: one NinjaAPI with a router per app."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import URLPattern, URLResolver, re_path
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError

from accounts_app.api import TokenAuth
from accounts_app.api import router as accounts_router
from flows_app.api import router as flows_router
from runs_app.api import router as runs_router

# The shape of every error answer: the routers' ErrorOut schemas, and the handlers below.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "properties": {
        "detail": {"type": "string", "title": "Detail"},
        "errors": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "title": "Errors",
        },
    },
    "required": ["detail"],
}
# Answers any operation can give without declaring them itself: auth, unknown ids, invalid parameters.
COMMON_ERRORS = {
    401: "The token is missing, unknown or revoked.",
    404: "Nothing of that id or name that you can see.",
    422: "A parameter or the body is invalid; `errors` names each field at fault.",
}
BODY_ERRORS = {400: "The request body could not be parsed."}


class StudioAPI(NinjaAPI):
    """A NinjaAPI whose OpenAPI schema also documents the errors every operation can answer."""

    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: Any = None) -> Any:
        """Ninja's schema plus the shared error answers on each operation."""
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path_item in schema["paths"].values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                errors = {**COMMON_ERRORS, **(BODY_ERRORS if "requestBody" in operation else {})}
                for status, description in errors.items():
                    if status not in responses and str(status) not in responses:
                        responses[status] = {"description": description, "content": content}
        return schema

    def _get_urls(self) -> list[URLPattern | URLResolver]:
        # Last: any other URL under the API's prefix (even one Django's path converters cannot match, such
        # as a file path with a newline) answers with a JSON 404 like the API's own, not the HTML error page.
        return [*super()._get_urls(), re_path(r"^[\s\S]*$", _no_route, name="no-route")]


# No session or form is read here, and unsafe methods must get the same JSON 404 as GET, not Django's CSRF page.
@csrf_exempt
def _no_route(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"detail": f"There is no API route at {request.path!r}."}, status=404)


api = StudioAPI(
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


@api.exception_handler(ValidationError)
def validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    """Invalid parameters answer in the same shape as every other error: `detail` text plus `errors` by field."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors:
        # ninja's locations start with where the value came from and the parameter's own name.
        parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form", "file")]
        if len(parts) > 1 and parts[0] == "payload":
            parts = parts[1:]
        errors.setdefault(".".join(parts) or "__all__", []).append(str(error.get("msg", "invalid")))
    detail = "; ".join(f"{field}: {message}" for field, messages in errors.items() for message in messages)
    return api.create_response(request, {"detail": detail, "errors": errors}, status=422)


@api.exception_handler(HttpError)
def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    """`{"detail": ...}`; a 400 also carries a `reason` code, like the archive and path refusals declared as 400."""
    body: dict[str, Any] = {"detail": str(exc)}
    if exc.status_code == 400:
        # Ninja raises this 400 itself for a body that is not JSON.
        body["reason"] = "invalid_body"
    return api.create_response(request, body, status=exc.status_code)
