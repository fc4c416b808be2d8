"""ASGI wiring of online endpoints: `/endpoints/<name>/score`, `/health` and `/swagger.json` beside Django.

`with_endpoints(django_app)` routes paths under `/endpoints/` here and everything else to Django, so scoring
never pays for Django's request cycle (middleware, URL resolving, a thread hop per request). A request:

1. names a key (`Authorization: Bearer <key>`); a successful check is cached for a moment by
   `services.endpoint_auth_cached`, so the hot path touches no database; a miss asks `endpoint_authenticate`
   in a thread;
2. picks a deployment by the traffic weights (or the one named in `azureml-model-deployment` /
   `x-flowstudio-deployment`, as Azure's endpoints allow, to test a deployment without traffic);
3. goes to that deployment's warm `flowengine.serving.ScoreApp` (one per deployment, created on first use and
   kept in this process; its runners are separate processes, so flow code never runs here), which answers the
   DESIGN.md contract and tags every answer with the deployment and snapshot;
4. leaves a row (status, latency, tokens) that a background task writes to the database in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection
from django.utils import timezone

from flowengine import events
from flowengine.serving import RunnerPool, ScoreApp, asgi_app, error_body, generate_swagger
from runs_app import services

logger = logging.getLogger(__name__)

ENDPOINT_PATH = re.compile(r"^/endpoints/(?P<name>[^/]+)(?P<rest>/.*)?$")
PIN_HEADERS = (b"azureml-model-deployment", b"x-flowstudio-deployment")
IDLE_SECONDS = 900.0
JANITOR_SECONDS = 60.0
FLUSH_SECONDS = 1.0
MAX_PENDING_ROWS = 10_000

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


@dataclass
class _Meter:
    """What the runner reported about one request's line: its token usage and error code."""

    usage: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""


# Set around each scoring request; the pool below fills it from the line's LineCompleted event.
_meter: ContextVar[_Meter | None] = ContextVar("endpoint_meter", default=None)


class MeteredPool(RunnerPool):
    """A runner pool that hands each line's usage to the request that ran it (for monitoring)."""

    async def run_line(self, inputs: Mapping[str, Any], **kw: Any) -> AsyncIterator[Any]:
        """The pool's events, passed through unchanged."""
        meter = _meter.get()
        async with contextlib.aclosing(super().run_line(inputs, **kw)) as line:
            async for ev in line:
                if meter is not None and isinstance(ev, events.LineCompleted):
                    meter.usage = dict(ev.usage or {})
                    if ev.error is not None:
                        meter.error_code = ev.error.code
                yield ev


@dataclass
class _Served:
    app: ScoreApp
    asgi: ASGIApp
    last_used: float


async def _db(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a database-touching service in Django's sync thread, with fresh connections around it."""

    def call() -> Any:
        # As Django does around a request; not inside an open transaction (a caller's, e.g. a test's).
        fresh = not connection.in_atomic_block
        if fresh:
            close_old_connections()
        try:
            return fn(**kwargs)
        finally:
            if fresh:
                close_old_connections()

    return await sync_to_async(call, thread_sensitive=True)()


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer(scope: Mapping[str, Any]) -> str | None:
    value = _header(scope, b"authorization")
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


async def _answer(send: Callable[[Any], Awaitable[None]], status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="flowstudio-endpoint"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _pick(auth: services.EndpointAuth, pinned: str | None) -> services.ServedDeployment | str:
    """The deployment for this request, or the error message when there is none."""
    if pinned:
        chosen = next((d for d in auth.deployments if d.name == pinned), None)
        return chosen or f"endpoint '{auth.name}' has no deployment '{pinned}'"
    live = [d for d in auth.deployments if d.traffic > 0]
    if not live:
        return f"endpoint '{auth.name}' has no deployment taking traffic"
    if len(live) == 1:
        return live[0]
    return random.choices(live, weights=[d.traffic for d in live])[0]


class EndpointServer:
    """The serving state of one event loop: warm ScoreApps by deployment id and the request rows to write."""

    def __init__(self) -> None:
        self.apps: dict[int, _Served] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.rows: list[dict[str, Any]] = []
        self.flusher: asyncio.Task[None] | None = None
        self.janitor: asyncio.Task[None] | None = None

    async def app_for(self, deployment: services.ServedDeployment) -> _Served:
        """The deployment's warm app, created and started on first use (one start even under a burst)."""
        served = self.apps.get(deployment.id)
        if served is None:
            lock = self.locks.setdefault(deployment.id, asyncio.Lock())
            async with lock:
                served = self.apps.get(deployment.id)
                if served is None:
                    served = await self._start(deployment.id)
                    self.apps[deployment.id] = served
            if self.janitor is None:
                self.janitor = asyncio.ensure_future(self._sweep())
        served.last_used = time.monotonic()
        return served

    async def _start(self, deployment_id: int) -> _Served:
        spec = await _db(services.deployment_serving, deployment_id=deployment_id)

        def build() -> ScoreApp:
            # Loading the flow reads its files (no flow code runs): keep that off the event loop.
            pool = MeteredPool(
                spec.flow_dir,
                connections=spec.connections,
                size=spec.instance_count,
                variant=spec.variant,
                init=spec.init,
                environment_variables=spec.environment_variables,
                env_mode="scrubbed",
                line_timeout=spec.line_timeout,
                limits=spec.limits,
            )
            app = ScoreApp(
                spec.flow_dir,
                pool=pool,
                deployment=spec.name,
                snapshot=spec.snapshot,
                extra_headers={"x-flowstudio-endpoint": spec.endpoint},
                included_outputs=spec.outputs or None,
            )
            # The snapshot folder is named by its hash: the swagger names the flow as its author did.
            app.interface = dataclasses.replace(app.interface, name=spec.flow_name)
            app.swagger = generate_swagger(app.interface, sorted(app.outputs_to_remove))
            return app

        app = await asyncio.get_running_loop().run_in_executor(None, build)
        try:
            await app.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await app.close()
            raise
        return _Served(app=app, asgi=asgi_app(app), last_used=time.monotonic())

    async def _sweep(self) -> None:
        """Stop the runners of deployments nobody called for IDLE_SECONDS (deleted ones end up here too)."""
        while True:
            await asyncio.sleep(JANITOR_SECONDS)
            now = time.monotonic()
            for deployment_id, served in list(self.apps.items()):
                if now - served.last_used > IDLE_SECONDS:
                    self.apps.pop(deployment_id, None)
                    with contextlib.suppress(Exception):
                        await served.app.close()

    def record(self, row: dict[str, Any]) -> None:
        """Queue a request row; a background task writes the queue about once a second."""
        if len(self.rows) < MAX_PENDING_ROWS:
            self.rows.append(row)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Write the queued request rows now."""
        rows, self.rows = self.rows, []
        if rows:
            try:
                await _db(services.endpoint_requests_record, rows=rows)
            except Exception:
                logger.exception("could not record %d endpoint requests", len(rows))

    async def close(self) -> None:
        """Write pending rows and stop every runner pool of this loop."""
        for task in (self.janitor, self.flusher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self.janitor = self.flusher = None
        await self.flush()
        apps, self.apps = self.apps, {}
        await asyncio.gather(*(s.app.close() for s in apps.values()), return_exceptions=True)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any, name: str, rest: str) -> None:
        """Authenticate, pick a deployment, forward to its ScoreApp and record the request."""
        credential = _bearer(scope)
        if credential is None:
            await _answer(send, 401, "UserError", "Missing key: send 'Authorization: Bearer <endpoint key>'.")
            return
        auth = services.endpoint_auth_cached(name, credential)
        if auth is None:
            auth = await _db(services.endpoint_authenticate, name=name, credential=credential)
        if auth is None:
            # The same answer for an unknown endpoint, so keys cannot be used to probe for names.
            await _answer(send, 401, "UserError", f"Invalid key for endpoint '{name}'.")
            return
        if auth.disabled:
            # 403, not 503: the owner switched it off on purpose, and clients retry a 503 automatically.
            await _answer(send, 403, "UserError", f"endpoint '{name}' is disabled")
            return
        pinned = next((v for h in PIN_HEADERS if (v := _header(scope, h))), None)
        chosen = _pick(auth, pinned)
        if isinstance(chosen, str):
            await _answer(send, 404 if pinned else 503, "UserError" if pinned else "SystemError", chosen)
            return
        try:
            served = await self.app_for(chosen)
        except Exception:
            logger.exception("deployment %s of endpoint %s could not start", chosen.name, name)
            await _answer(
                send,
                503,
                "SystemError",
                f"deployment '{chosen.name}' of endpoint '{name}' could not start; its owner finds why in "
                "the studio's log.",
            )
            return
        if rest != "/score":
            await served.asgi(dict(scope, path=rest), receive, send)
            return
        await self._score(scope, receive, send, auth, chosen, served)

    async def _score(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        auth: services.EndpointAuth,
        deployment: services.ServedDeployment,
        served: _Served,
    ) -> None:
        started = time.perf_counter()
        when = timezone.now()
        status = {"code": 0, "streamed": False}

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["streamed"] = any(
                    k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"]
                )
            await send(message)

        meter = _Meter()
        token = _meter.set(meter)
        try:
            await served.asgi(dict(scope, path="/score"), receive, watched)
        finally:
            _meter.reset(token)
            usage = meter.usage
            code = status["code"] or 499  # the client left before any answer (nginx's "client closed")
            self.record(
                {
                    "endpoint_id": auth.endpoint_id,
                    "deployment_id": deployment.id,
                    "time": when,
                    "status": code,
                    "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
                    "streamed": bool(status["streamed"]),
                    "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                    "completion_tokens": int(usage.get("completion_tokens") or 0),
                    "total_tokens": int(usage.get("total_tokens") or 0),
                    "error_code": meter.error_code
                    or ("" if code < 400 else "UserError" if code < 500 else "SystemError"),
                }
            )


_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EndpointServer] = weakref.WeakKeyDictionary()


def endpoint_server() -> EndpointServer:
    """The serving state of the running event loop."""
    loop = asyncio.get_running_loop()
    server = _servers.get(loop)
    if server is None:
        server = _servers[loop] = EndpointServer()
    return server


async def endpoints_close() -> None:
    """Stop this loop's endpoint runners and write pending request rows (tests, shutdown)."""
    server = _servers.pop(asyncio.get_running_loop(), None)
    if server is not None:
        await server.close()


async def endpoints_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app of `/endpoints/<name>/...` (HTTP only)."""
    match = ENDPOINT_PATH.match(scope.get("path", ""))
    if scope["type"] != "http" or match is None:
        await _answer(send, 404, "UserError", "No such endpoint path.")
        return
    rest = match.group("rest") or "/"
    await endpoint_server().handle(scope, receive, send, match.group("name"), rest)


def with_endpoints(django_app: ASGIApp) -> ASGIApp:
    """An ASGI app sending `/endpoints/...` to the endpoint server and every other path to `django_app`."""

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/endpoints/"):
            await endpoints_app(scope, receive, send)
            return
        await django_app(scope, receive, send)

    return application
