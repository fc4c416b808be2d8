"""Online endpoint serving: prompt flow's `/score` contract over a warm pool of runner processes.

`ScoreApp` is framework-free: it is built from a flow folder, its connections and a `RunnerPool`, and answers
`handle(method, path, headers, body)` with a `Response` (status, headers, and bytes or an async iterator of
bytes). The studio mounts it behind its own authentication through `asgi_app` (ASGI); `serve` runs it for
`flowstudio flow serve` on aiohttp's low-level HTTP server through `http_handler`.

The contract is prompt flow's (`promptflow/core/_serving`): `POST /score` with the flow inputs as JSON; SSE
(`data: {json}\\n\\n`, the non-stream outputs first, then one event per chunk) when `Accept` names
`text/event-stream` and an output streams; one JSON object otherwise; errors as
`{"error": {"code": "UserError"|"SystemError", "message": ...}}` with 400 / 500. Two deliberate differences:
an `Accept` that can be served neither as JSON nor as SSE is refused with `424` (naming status 406, as Azure
online endpoints surface it) before the flow runs, where prompt flow runs the flow first and answers 406; and a
missing-input message does not echo the request body back.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowengine import events
from flowengine.model import Flow, parse_reference

SSE = "text/event-stream"
JSON_TYPES = frozenset({"application/json", "application/*", "*/*"})
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
MAX_BODY = 32 * 1024 * 1024
# Lines in flight per runner process, and threads per runner for sync tools (both bounded, both configurable);
# each thread reserves a stack in the address space that the runner's memory limit counts.
DEFAULT_CONCURRENCY = 512
DEFAULT_SYNC_THREADS = 32
JSON_CONTENT_TYPE = "application/json"
# What the runner sends for a served line: nothing else crosses the pipe (trace spans are large).
SERVED_EVENTS = ("stream_started", "output_chunk", "line_completed")
SWAGGER_TYPES = {
    "int": "integer",
    "double": "number",
    "float": "number",
    "bool": "boolean",
    "string": "string",
    "list": "array",
    "object": "object",
    "image": "object",
}
FLEX_ANNOTATIONS = {
    "int": "int",
    "float": "double",
    "bool": "bool",
    "str": "string",
    "list": "list",
    "dict": "object",
}

__all__ = [
    "FlowInterface",
    "Response",
    "RunnerPool",
    "ScoreApp",
    "add_serve_parser",
    "asgi_app",
    "error_body",
    "serve",
]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("flowstudio")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# -- responses -------------------------------------------------------------------------------------------------


@dataclass
class Response:
    """An HTTP answer: `body` bytes, or `stream` (an async iterator of bytes) for SSE."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    @property
    def content_type(self) -> str:
        """The Content-Type header value ('' when none)."""
        return next((v for k, v in self.headers if k.lower() == "content-type"), "")

    async def cancel(self) -> None:
        """The client went away: stop the stream, which cancels its line in the runner."""
        if self.stream is not None:
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def error_body(code: str, message: str) -> dict[str, Any]:
    """Prompt flow's simplified error body."""
    return {"error": {"code": code, "message": message}}


def _dumps(value: Any) -> bytes:
    # The separators and escaping of FastAPI's JSONResponse, which prompt flow's serving app uses.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def format_event(data: Any) -> bytes:
    """One SSE event exactly as prompt flow formats it."""
    return f"data: {json.dumps(data, default=str)}\n\n".encode()


def json_response(status: int, value: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A JSON response."""
    body = _dumps(value)
    return Response(status, [("content-type", JSON_CONTENT_TYPE), *headers], body)


def _error(status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return json_response(status, error_body(code, message), headers)


def parse_accept(values: Iterable[str]) -> set[str]:
    """The media types of Accept header values, parameters (`;q=`) dropped; `*/*` when there are none."""
    types = set()
    for value in values:
        for part in value.split(","):
            media = part.split(";", 1)[0].strip().lower()
            if media:
                types.add(media)
    return types or {"*/*"}


# -- what the endpoint needs to know about the flow, read without running its code ------------------------------


@dataclass(frozen=True)
class ServedInput:
    """One flow input as the endpoint sees it."""

    name: str
    type: str = "string"
    default: Any = None
    description: str = ""
    is_chat_input: bool = False
    is_chat_history: bool = False


@dataclass(frozen=True)
class ServedOutput:
    """One flow output as the endpoint sees it."""

    name: str
    type: str = "string"
    description: str = ""
    is_chat_output: bool = False
    evaluation_only: bool = False


@dataclass(frozen=True)
class FlowInterface:
    """A flow's inputs, outputs and whether any output can stream, as prompt flow's serving app sees them.

    Built in the web process from the flow's files only: flex signatures and generator functions are read with
    `ast`, so no flow code runs outside the runner.
    """

    name: str
    kind: str
    inputs: tuple[ServedInput, ...]
    outputs: tuple[ServedOutput, ...]
    may_stream: bool
    sample: Any = None

    @classmethod
    def from_flow(cls, flow: Flow) -> FlowInterface:
        """Describe a loaded flow."""
        name = flow.path.name
        sample = _samples(flow.path)
        if flow.kind == "flex":
            inputs, generator = _flex_signature(flow)
            outputs = tuple(ServedOutput(o.name, o.type, o.description) for o in flow.outputs.values())
            return cls(name, "flex", inputs, outputs, generator, sample)
        inputs = tuple(
            ServedInput(i.name, i.type, i.default, i.description, i.is_chat_input, i.is_chat_history)
            for i in flow.inputs.values()
        )
        if flow.kind == "prompty":
            spec = flow.prompty
            declared = dict(getattr(spec, "outputs", None) or {})
            outputs = tuple(
                ServedOutput(n, str((o or {}).get("type", "string")) if isinstance(o, Mapping) else "string")
                for n, o in declared.items()
            )
            params = dict(getattr(spec, "parameters", None) or {})
            return cls(name, "prompty", inputs, outputs, bool(params.get("stream")), sample)
        outputs = tuple(
            ServedOutput(
                o.name, o.type, o.description, o.is_chat_output, bool(getattr(o, "evaluation_only", False))
            )
            for o in flow.outputs.values()
        )
        return cls(name, "dag", inputs, outputs, _dag_may_stream(flow), sample)

    @property
    def required(self) -> list[str]:
        """Inputs a request must carry: prompt flow treats a default of null as no default."""
        return [i.name for i in self.inputs if i.default is None]


def _samples(folder: Path) -> Any:
    path = folder / "samples.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _parse_module(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None


def _is_generator(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the function's own body yields (nested functions and classes do not count)."""
    todo: list[ast.AST] = list(func.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Yield | ast.YieldFrom):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return False


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _python_node_may_stream(flow: Flow, path: str | None) -> bool:
    if not path:
        return True
    tree = _parse_module(flow.path / path)
    if tree is None:
        return True  # unreadable here: let the runner decide
    funcs = _functions(tree)
    tools = [f for f in funcs if any("tool" in ast.unparse(d) for d in f.decorator_list)] or funcs
    return any(_is_generator(f) for f in tools)


def _dag_may_stream(flow: Flow) -> bool:
    """Prompt flow streams an llm or generator node's output when a flow output, and no other node, reads it."""
    readers: dict[str, int] = {}
    for node in flow.nodes:
        for dep in node.node_dependencies():
            readers[dep] = readers.get(dep, 0) + 1
    nodes = {n.name: n for n in flow.nodes}
    for output in flow.outputs.values():
        ref = parse_reference(output.reference)
        if ref is None or ref.kind != "node" or ref.property or readers.get(ref.name):
            continue
        node = nodes.get(ref.name)
        if node is None:
            continue
        if node.type == "llm" or (node.type == "python" and _python_node_may_stream(flow, node.source.path)):
            return True
        if node.type not in ("llm", "python", "prompt"):
            return True  # a package tool: only running it tells
    return False


def _flex_signature(flow: Flow) -> tuple[tuple[ServedInput, ...], bool]:
    """The flex entry's inputs (declared ones win) and whether it can return a stream."""
    declared = tuple(
        ServedInput(i.name, i.type, i.default, i.description, i.is_chat_input, i.is_chat_history)
        for i in flow.inputs.values()
    )
    module, _, attr = (flow.entry or "").partition(":")
    tree = _parse_module(flow.path / (module.replace(".", "/") + ".py")) if module else None
    if tree is None:
        return declared, True
    target: ast.FunctionDef | ast.AsyncFunctionDef | None = None
    skip_self = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == attr:
            target = node
        elif isinstance(node, ast.ClassDef) and node.name == attr:
            target = next((f for f in _functions(node) if f.name == "__call__"), None)  # type: ignore[arg-type]
            skip_self = True
    if target is None:
        return declared, True
    if declared:
        return declared, _is_generator(target)
    args = target.args
    params = list(args.posonlyargs) + list(args.args)
    if skip_self and params:
        params = params[1:]
    defaults: list[ast.expr | None] = [None] * (len(params) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(params, defaults, strict=True))
    pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    inputs = []
    for arg, default in pairs:
        value: Any = None
        if default is not None:
            try:
                literal = ast.literal_eval(default)
            except ValueError:
                literal = ast.unparse(default)
            # Prompt flow keeps a flex default as text.
            value = None if literal is None else str(literal)
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        kind = FLEX_ANNOTATIONS.get(annotation.split("[", 1)[0], "object" if not annotation else "string")
        inputs.append(ServedInput(arg.arg, kind, value))
    return tuple(inputs), _is_generator(target)


def generate_swagger(interface: FlowInterface, outputs_to_remove: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI document prompt flow's serving app publishes at /swagger.json (without its /feedback path)."""
    swagger: dict[str, Any] = {"openapi": "3.0.0"}
    name = interface.name
    swagger["info"] = {"title": f"Promptflow[{name}] API", "version": "1.0.0", "x-flow-name": name}
    swagger["components"] = {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}}
    swagger["security"] = [{"bearerAuth": []}]
    input_schema: dict[str, Any] = {"type": "object"}
    if interface.inputs:
        input_schema["properties"] = {}
        input_schema["required"] = []
        for spec in interface.inputs:
            if spec.is_chat_input:
                swagger["info"]["x-chat-input"] = spec.name
                swagger["info"]["x-flow-type"] = "chat"
            if spec.is_chat_history:
                swagger["info"]["x-chat-history"] = spec.name
            schema: dict[str, Any] = {"type": SWAGGER_TYPES.get(spec.type, "string")}
            if spec.description:
                schema["description"] = spec.description
            if spec.default:
                schema["default"] = spec.default
            _container_schema(schema)
            input_schema["properties"][spec.name] = schema
            input_schema["required"].append(spec.name)
    output_schema: dict[str, Any] = {"type": "object"}
    if interface.outputs:
        output_schema["properties"] = {}
        for out in interface.outputs:
            if out.evaluation_only:
                continue
            if out.is_chat_output:
                swagger["info"]["x-chat-output"] = out.name
            if out.name in outputs_to_remove:
                continue
            schema = {"type": SWAGGER_TYPES.get(out.type, "string")}
            if out.description:
                schema["description"] = out.description
            _container_schema(schema)
            output_schema["properties"][out.name] = schema
    example = interface.sample[0] if isinstance(interface.sample, list) and interface.sample else {}
    swagger["paths"] = {
        "/score": {
            "post": {
                "summary": f"run promptflow: {name} with an given input",
                "requestBody": {
                    "description": "promptflow input data",
                    "required": bool(interface.inputs),
                    "content": {"application/json": {"schema": input_schema, "example": example}},
                },
                "responses": {
                    "200": {
                        "description": "successful operation",
                        "content": {"application/json": {"schema": output_schema}},
                    },
                    "400": {"description": "Invalid input"},
                    "default": {"description": "unexpected error"},
                },
            }
        }
    }
    return swagger


def _container_schema(schema: dict[str, Any]) -> None:
    if schema["type"] == "object":
        schema["additionalProperties"] = {}
    elif schema["type"] == "array":
        schema["items"] = {"type": "object", "additionalProperties": {}}


# -- the warm runner pool --------------------------------------------------------------------------------------


class RunnerPool:
    """N warm runner processes of one flow, started once; each line goes to the least busy runner.

    Every runner runs many lines at once on its own event loop (up to `concurrency`; more wait in the runner),
    so a few processes serve hundreds of concurrent requests: serving is I/O-bound, a line mostly waits for
    its LLM call. Sync tools run in a thread pool per runner of `sync_threads` threads. A runner that dies is
    restarted by its `RunnerProcess` on the next line.
    """

    def __init__(
        self,
        flow_dir: str | Path,
        *,
        connections: Mapping[str, Any] | None = None,
        size: int = 1,
        variant: str | None = None,
        init: Mapping[str, Any] | None = None,
        environment_variables: Mapping[str, str] | None = None,
        env_mode: str = "scrubbed",
        concurrency: int = DEFAULT_CONCURRENCY,
        sync_threads: int = DEFAULT_SYNC_THREADS,
        line_timeout: float | None = 300.0,
        **runner_kw: Any,
    ) -> None:
        self.flow_dir = Path(flow_dir)
        self.connections = dict(connections or {})
        self.size = max(1, int(size))
        self.variant = variant
        self.init = dict(init or {})
        self.environment_variables = dict(environment_variables or {})
        self.env_mode = env_mode
        self.concurrency = max(1, int(concurrency))
        self.line_timeout = line_timeout
        # Threads are started only as sync tools need them; a line blocked in one (a sync HTTP call) holds one.
        runner_kw.setdefault("max_concurrency", max(1, min(int(sync_threads), self.concurrency)))
        self.runner_kw = runner_kw
        self.runners: list[Any] = []
        self._load: list[int] = []
        self._started = False
        self._lock: asyncio.Lock | None = None

    async def start(self) -> None:
        """Start every runner and load the flow in each (idempotent); raises RunnerError on a broken flow."""
        if self._started:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._started:
                return
            from flowengine.runner_client import RunnerProcess

            runners = [
                RunnerProcess(
                    env_mode=self.env_mode,  # type: ignore[arg-type]
                    concurrency=self.concurrency,
                    line_timeout=self.line_timeout,
                    **self.runner_kw,
                )
                for _ in range(self.size)
            ]
            try:
                await asyncio.gather(*(r.spawn() for r in runners))
                await asyncio.gather(
                    *(
                        r.start(
                            self.flow_dir,
                            self.connections,
                            self.variant,
                            self.init,
                            environment_variables=self.environment_variables,
                        )
                        for r in runners
                    )
                )
            except BaseException:
                await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)
                raise
            self.runners = runners
            self._load = [0] * len(runners)
            self._started = True

    async def close(self) -> None:
        """Stop every runner."""
        runners, self.runners = self.runners, []
        self._started = False
        await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)

    @property
    def in_flight(self) -> int:
        """Lines running now, over all runners."""
        return sum(self._load)

    async def run_line(
        self,
        inputs: Mapping[str, Any],
        *,
        stream: bool = False,
        request_id: str | None = None,
        event_types: Iterable[str] | None = SERVED_EVENTS,
    ) -> AsyncIterator[Any]:
        """Run one line on the least busy runner; yields its events, the last a LineCompleted.

        Closing the iterator early (a client that went away) cancels the line in its runner.
        """
        await self.start()
        index = min(range(len(self.runners)), key=self._load.__getitem__)
        self._load[index] += 1
        line = self.runners[index].run_line(
            inputs, stream=stream, request_id=request_id, event_types=event_types
        )
        try:
            # aclosing: an early close reaches the runner's iterator at once, which sends the cancel.
            async with contextlib.aclosing(line):
                async for ev in line:
                    yield ev
        finally:
            self._load[index] -= 1


# -- the endpoint ----------------------------------------------------------------------------------------------


class ScoreApp:
    """One served flow: `handle(method, path, headers, body)` answers `/score`, `/health`, `/swagger.json`.

    `path` is relative to where the app is mounted (the studio strips `/endpoints/<name>`). `headers` are
    (name, value) pairs (str or bytes). Every response carries `extra_headers`, plus `x-flowstudio-deployment`
    and `x-flowstudio-snapshot` when `deployment` / `snapshot` are given. `included_outputs` limits the outputs
    an endpoint returns (prompt flow's PROMPTFLOW_RESPONSE_INCLUDED_FIELDS); evaluation-only outputs never are.
    """

    def __init__(
        self,
        flow_dir: str | Path,
        *,
        pool: RunnerPool | None = None,
        connections: Mapping[str, Any] | None = None,
        workers: int = 1,
        deployment: str | None = None,
        snapshot: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        included_outputs: Sequence[str] | None = None,
        env_mode: str = "scrubbed",
        **pool_kw: Any,
    ) -> None:
        from flowengine import load_flow

        self.flow = load_flow(flow_dir)
        self.interface = FlowInterface.from_flow(self.flow)
        self.pool = pool or RunnerPool(
            self.flow.path, connections=connections, size=workers, env_mode=env_mode, **pool_kw
        )
        headers = [(k.lower(), str(v)) for k, v in (extra_headers or {}).items()]
        if deployment:
            headers.append(("x-flowstudio-deployment", deployment))
        if snapshot:
            headers.append(("x-flowstudio-snapshot", snapshot))
        self.headers = headers
        names = [o.name for o in self.interface.outputs]
        if included_outputs is not None:
            remove = [n for n in names if n not in set(included_outputs)]
        else:
            remove = [o.name for o in self.interface.outputs if o.evaluation_only]
        self.outputs_to_remove = frozenset(remove)
        self.swagger = generate_swagger(self.interface, sorted(self.outputs_to_remove))
        self.version = _version()

    async def start(self) -> None:
        """Warm the runner pool (the first request does it otherwise)."""
        await self.pool.start()

    async def close(self) -> None:
        """Stop the runner pool."""
        await self.pool.close()

    # -- routing ---------------------------------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, headers: Iterable[tuple[Any, Any]], body: bytes
    ) -> Response:
        """Answer one request."""
        method = method.upper()
        path = "/" + path.strip("/")
        routes: dict[str, tuple[str, Callable[..., Awaitable[Response]]]] = {
            "/score": ("POST", self.score),
            "/health": ("GET", self.health),
            "/swagger.json": ("GET", self.get_swagger),
            "/version": ("GET", self.get_version),
        }
        route = routes.get(path)
        if route is None:
            message = f"The requested api {path} with {method} is not supported by current app."
            return _error(404, "UserError", message, self.headers)
        allowed, handler = route
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            return _error(405, "UserError", f"{path} accepts {allowed} only, not {method}.", self.headers)
        if handler == self.score:
            return await self.score(headers, body)
        return await handler()

    async def health(self) -> Response:
        """`GET /health`."""
        return json_response(200, {"status": "Healthy", "version": self.version}, self.headers)

    async def get_version(self) -> Response:
        """`GET /version`."""
        build_info = os.environ.get("BUILD_INFO", "")
        return json_response(
            200, {"status": "Healthy", "build_info": build_info, "version": self.version}, self.headers
        )

    async def get_swagger(self) -> Response:
        """`GET /swagger.json`."""
        return json_response(200, self.swagger, self.headers)

    # -- /score ----------------------------------------------------------------------------------------------

    def parse_body(self, body: bytes) -> dict[str, Any] | Response:
        """The flow inputs of a request body, or the error response prompt flow gives for it."""
        names = [i.name for i in self.interface.inputs]
        if not names and self.interface.kind != "flex":
            return {}
        try:
            data: Any = json.loads(body)
        except ValueError:
            if len(names) > 1:
                message = (
                    "Promptflow executor received non json data, but there's more than 1 input fields, "
                    "please use json request data instead."
                )
                return _error(400, "UserError", message, self.headers)
            if not names:
                return {}
            data = {names[0]: body.decode("utf-8", "replace")}
        if not isinstance(data, dict | list | str):
            kind = type(data).__name__ if data is not None else "null"
            message = f"The request body must be a JSON object of flow inputs, not a JSON {kind}."
            return _error(400, "UserError", message, self.headers)
        missing = [name for name in self.interface.required if name not in data]
        if missing:
            return _error(
                400,
                "UserError",
                f"Required input fields {missing} are missing in request data.",
                self.headers,
            )
        # A JSON array or string that passes the check names no inputs: the flow runs on its defaults.
        return data if isinstance(data, dict) else {}

    def not_acceptable(self, accept: set[str], supported: str) -> Response:
        """The refusal of an Accept header: 424 whose body names the runtime status 406."""
        message = (
            f"Media type {','.join(sorted(accept))} in Accept header is not acceptable. "
            f"Supported media type(s) - {supported} (status 406 Not Acceptable)"
        )
        headers = [*self.headers, ("ms-azureml-model-error-statuscode", "406")]
        return _error(424, "UserError", message, headers)

    async def score(self, headers: Iterable[tuple[Any, Any]], body: bytes) -> Response:
        """`POST /score`: run one line and answer as JSON or SSE."""
        accept = parse_accept(_header_values(headers, "accept"))
        wants_sse = SSE in accept
        takes_json = bool(JSON_TYPES & accept)
        inputs = self.parse_body(body)
        if isinstance(inputs, Response):
            return inputs
        if not takes_json and not (wants_sse and self.interface.may_stream):
            return self.not_acceptable(accept, "application/json")
        request_id = _header_values(headers, "x-request-id")
        rid = (request_id[0] if request_id else "") or uuid.uuid4().hex
        line = self.pool.run_line(inputs, stream=wants_sse, request_id=f"{rid}-{uuid.uuid4().hex[:8]}")
        try:
            async for ev in line:
                if isinstance(ev, events.StreamStarted):
                    streams = [s for s in ev.streams if s not in self.outputs_to_remove]
                    if len(streams) > 1:
                        await line.aclose()
                        return _error(
                            400, "UserError", "Multiple stream output fields not supported.", self.headers
                        )
                    if streams:
                        return self._sse(ev, streams[0], line)
                elif isinstance(ev, events.LineCompleted):
                    return self._completed(ev, wants_sse and not takes_json, accept)
        except BaseException:
            await line.aclose()
            raise
        return _error(500, "SystemError", "Flow execution failed without error message.", self.headers)

    def _visible(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in outputs.items() if k not in self.outputs_to_remove}

    def _completed(self, ev: events.LineCompleted, sse_only: bool, accept: set[str]) -> Response:
        if ev.status != "Completed":
            error = ev.error
            if error is None:
                return _error(
                    500, "SystemError", "Flow execution failed without error message.", self.headers
                )
            status = 400 if error.code == "UserError" else 500
            return _error(status, error.code, error.message, self.headers)
        if sse_only:
            # Only the run could tell that no output streams.
            return self.not_acceptable(accept, "application/json")
        outputs = self._visible(ev.outputs)
        if self._bare_value(ev) and "output" in outputs:
            return json_response(200, outputs["output"], self.headers)
        return json_response(200, outputs, self.headers)

    def _bare_value(self, ev: events.LineCompleted) -> bool:
        """Whether the flow returned a bare value, which prompt flow answers as is rather than as {"output": ...}."""
        if self.interface.kind == "flex":
            return not isinstance((ev.aggregation_inputs or {}).get("line_result"), dict)
        if self.interface.kind == "prompty":
            return set(ev.outputs) == {"output"} and not self.interface.outputs
        return False

    def _sse(self, started: events.StreamStarted, name: str, line: AsyncIterator[Any]) -> Response:
        first = self._visible(started.outputs)

        async def events_out() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield format_event(first)
                async for ev in line:
                    if isinstance(ev, events.OutputChunk):
                        if ev.output == name:
                            yield format_event({name: ev.delta})
                    elif isinstance(ev, events.LineCompleted):
                        if ev.status != "Completed" and ev.error is not None:
                            # The status line is gone already: the error travels as the last event.
                            yield format_event(error_body(ev.error.code, ev.error.message))
                        return
            finally:
                aclose = getattr(line, "aclose", None)
                if aclose is not None:
                    await aclose()

        headers = [
            ("content-type", SSE_CONTENT_TYPE),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
            *self.headers,
        ]
        return Response(200, headers, stream=events_out())


def _header_values(headers: Iterable[tuple[Any, Any]], name: str) -> list[str]:
    wanted = name.lower()
    out = []
    for key, value in headers:
        key = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        if key.lower() == wanted:
            out.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return out


# -- ASGI ------------------------------------------------------------------------------------------------------

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def asgi_app(app: ScoreApp, *, max_body: int = MAX_BODY) -> Callable[..., Awaitable[None]]:
    """A plain ASGI 3 application around `app`; a client that disconnects cancels its line."""

    async def application(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(app, receive, send)
            return
        if scope["type"] != "http":
            return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body:
                await _send_response(send, _body_too_large(max_body))
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        handler = asyncio.ensure_future(app.handle(scope["method"], scope["path"], scope["headers"], body))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({handler, gone}, return_when=asyncio.FIRST_COMPLETED)
            if handler not in done:
                handler.cancel()  # the client left before the answer: stop the line
                with contextlib.suppress(BaseException):
                    await handler
                return
            response = handler.result()
            if response.stream is None:
                await _send_response(send, response, head_only=scope["method"] == "HEAD")
                return
            await _send_stream(send, response, gone)
        finally:
            gone.cancel()
            if not handler.done():
                handler.cancel()

    return application


async def _lifespan(app: ScoreApp, receive: ASGIReceive, send: ASGISend) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await app.start()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await app.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _wait_disconnect(receive: ASGIReceive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _raw_headers(response: Response) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]


async def _send_response(send: ASGISend, response: Response, *, head_only: bool = False) -> None:
    headers = [*_raw_headers(response), (b"content-length", str(len(response.body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else response.body})


async def _send_stream(send: ASGISend, response: Response, gone: asyncio.Future[None]) -> None:
    assert response.stream is not None
    await send({"type": "http.response.start", "status": response.status, "headers": _raw_headers(response)})
    iterator = response.stream.__aiter__()
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
                return  # the client left: the finally below stops the line
            try:
                chunk = step.result()
            except StopAsyncIteration:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.cancel()


# -- `flowstudio flow serve` -----------------------------------------------------------------------------------


def http_handler(app: ScoreApp, *, max_body: int = MAX_BODY) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp low-level request handler around `app`; `serve` runs it with handler cancellation on, so a
    client that disconnects cancels its line."""
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_body:
            return _aiohttp_response(_body_too_large(max_body))
        chunks = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > max_body:
                return _aiohttp_response(_body_too_large(max_body))
            chunks.append(chunk)
        body = b"".join(chunks)
        response = await app.handle(request.method, request.path, request.raw_headers, body)
        if response.stream is None:
            return _aiohttp_response(response)
        out = web.StreamResponse(status=response.status, headers=response.headers)
        try:
            await out.prepare(request)
            async for chunk in response.stream:
                await out.write(chunk)
            await out.write_eof()
        finally:
            # Also when the client left mid-stream (a failed write or the handler's cancellation).
            await response.cancel()
        return out

    return handler


def _body_too_large(max_body: int) -> Response:
    return _error(413, "UserError", f"The request body exceeds {max_body} bytes.")


def _aiohttp_response(response: Response) -> Any:
    from aiohttp import web

    return web.Response(status=response.status, body=response.body, headers=response.headers)


def serve(
    flow: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    connections: Mapping[str, Any] | None = None,
    env_mode: str = "inherit",
    on_ready: Callable[[], None] | None = None,
    backlog: int = 1024,
    **app_kw: Any,
) -> None:
    """Serve one flow until interrupted (SIGINT or SIGTERM); the runner pool starts before the port opens.

    The HTTP server is aiohttp's low-level one (C request parser, no per-request framework work): at a few
    hundred requests in flight the web process then costs a fraction of a millisecond of CPU per request.
    """
    import signal

    from aiohttp import web

    async def main() -> None:
        score_app = ScoreApp(flow, connections=connections, workers=workers, env_mode=env_mode, **app_kw)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = web.Server(http_handler(score_app), handler_cancellation=True, access_log=None)
        listener = None
        try:
            await score_app.start()
            listener = await loop.create_server(server, host, port, backlog=backlog, reuse_address=True)
            if on_ready is not None:
                on_ready()
            await stop.wait()
        finally:
            if listener is not None:
                listener.close()
                await server.shutdown(2.0)
            await score_app.close()

    asyncio.run(main())


def cmd_flow_serve(args: argparse.Namespace) -> int:
    """`flowstudio flow serve`: serve a flow locally at /score, /health and /swagger.json."""
    import sys

    from flowengine.cli import CLIError, _load_flow, _load_values, _local_connections, _parse_pairs
    from flowengine.runner_client import RunnerError

    for option, value in (("--workers", args.workers), ("--concurrency", args.concurrency)):
        if value < 1:
            raise CLIError(f"{option} must be at least 1, not {value}")
    flow = _load_flow(args.flow)
    init = _load_values(args.init, "init")
    env = _parse_pairs(args.environment_variables, "--environment-variables")
    url = f"http://{args.host}:{args.port}"

    def ready() -> None:
        sys.stderr.write(f"Serving {flow.path.name} at {url}/score (workers: {args.workers})\n")
        sys.stderr.flush()

    try:
        serve(
            flow.path,
            host=args.host,
            port=args.port,
            workers=args.workers,
            connections=_local_connections(),
            init=init,
            environment_variables=env,
            line_timeout=args.line_timeout,
            concurrency=args.concurrency,
            on_ready=ready,
        )
    except RunnerError as exc:
        raise CLIError(f"the flow could not be served: {exc}") from None
    return 0


def add_serve_parser(flow_commands: Any) -> None:
    """Register `flow serve` under the CLI's `flow` sub-commands."""
    p = flow_commands.add_parser(
        "serve", help="serve a flow as a local endpoint (/score, /health, /swagger.json)"
    )
    p.add_argument("--flow", "--source", dest="flow", required=True, help="flow folder or file")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=1, help="warm runner processes (default 1)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight per runner process; more wait for a free slot (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument("--init", nargs="+", help="flex init: name=value ... or a .json file")
    p.add_argument("--environment-variables", nargs="+", help="NAME=value ...")
    p.add_argument("--line-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.set_defaults(func=cmd_flow_serve)
