"""LLM calls through the `openai` SDK: one client per connection and event loop, our own bounded retries.

Chat and completion calls take a direct path (see docs/adr/0005-llm-direct-transport.md): the SDK builds the
request (URL, auth and SDK headers, Azure deployment routing), turns error responses into its own exceptions,
decodes server-sent events and types the response models; the bytes travel over one aiohttp session per event
loop instead of the SDK's layered HTTP client, whose CPU per call caps a process at about 0.7x the throughput
that 128 calls in flight allow. `FLOWSTUDIO_LLM_TRANSPORT=sdk` sends every call through the SDK's client.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import importlib
import json
import os
import random
import threading
import time
import urllib.request
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import openai
import pydantic
from openai._models import FinalRequestOptions, construct_type
from openai._streaming import SSEDecoder
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from flowengine.connections import Connection

T = TypeVar("T")
Api = Literal["chat", "completion"]


@dataclass(frozen=True)
class RetryPolicy:
    """How LLM calls retry 429 / 5xx / 422 / timeouts: exponential backoff honouring Retry-After, within a budget."""

    max_attempts: int = 10
    max_total_seconds: float = 600.0
    base_delay: float = 1.0
    max_delay: float = 60.0
    timeout: float = 600.0  # per request, seconds
    max_consecutive_422: int = 3  # prompt flow's limit: 422 rarely heals by retrying

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy, adjusted by FLOWSTUDIO_LLM_MAX_ATTEMPTS / _MAX_RETRY_SECONDS / _TIMEOUT."""
        env = os.environ
        return cls(
            max_attempts=int(env.get("FLOWSTUDIO_LLM_MAX_ATTEMPTS", cls.max_attempts)),
            max_total_seconds=float(env.get("FLOWSTUDIO_LLM_MAX_RETRY_SECONDS", cls.max_total_seconds)),
            timeout=float(env.get("FLOWSTUDIO_LLM_TIMEOUT", cls.timeout)),
        )

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based) when the server gives no Retry-After."""
        delay = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        # Jitter spreads out many lines that hit the same rate limit at the same moment.
        return delay * (0.9 + 0.2 * random.random())


_default_policy: RetryPolicy | None = None


def default_retry_policy() -> RetryPolicy:
    """The process-wide retry policy (RetryPolicy.from_env() unless set)."""
    global _default_policy
    if _default_policy is None:
        _default_policy = RetryPolicy.from_env()
    return _default_policy


def set_default_retry_policy(policy: RetryPolicy | None) -> None:
    """Replace the process-wide retry policy (None: back to the environment's)."""
    global _default_policy
    _default_policy = policy


class LLMError(Exception):
    """An LLM call failed; the message names the provider, status and provider message, never the API key."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        provider_message: str | None = None,
        retriable: bool = False,
        attempts: int = 1,
        user_error: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider_message = provider_message
        self.retriable = retriable
        self.attempts = attempts
        self.user_error = user_error


class LLMRetriesExhausted(LLMError):
    """A retriable failure kept happening until the retry policy's attempts or time budget ran out."""


# -- clients --------------------------------------------------------------------------------------------

# httpx connection pools belong to the event loop that opened them, so clients are cached per loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_clients_lock = threading.Lock()


def _client_key(conn: Connection, timeout: float) -> tuple[Any, ...]:
    return (
        conn.type,
        conn.base_url,
        conn.api_base,
        conn.api_version,
        conn.organization,
        conn.api_key,
        timeout,
    )


def get_client(conn: Connection, *, timeout: float | None = None) -> openai.AsyncOpenAI:
    """The AsyncOpenAI / AsyncAzureOpenAI client for this connection on the running loop (SDK retries off)."""
    if not conn.is_llm:
        raise LLMError(
            f"connection '{conn.name}' has type '{conn.type}'; an LLM call needs an open_ai, azure_open_ai "
            "or openai_compatible connection"
        )
    loop = asyncio.get_running_loop()
    timeout = default_retry_policy().timeout if timeout is None else timeout
    key = _client_key(conn, timeout)
    with _clients_lock:
        per_loop = _clients.setdefault(loop, {})
        client = per_loop.get(key)
        if client is None:
            client = _make_client(conn, timeout)
            per_loop[key] = client
    return client


def _http_client() -> Any:
    """The SDK's aiohttp-based HTTP client, or None (the SDK's httpx default) without the `aiohttp` extra.

    With many calls in flight the httpx connection pool re-checks every open connection on each request,
    which costs more CPU than the call itself at a hundred lines in flight; aiohttp's pool does not.
    """
    factory = getattr(openai, "DefaultAioHttpClient", None)
    if factory is None:
        return None
    try:
        return factory(verify=_ssl_context())
    except RuntimeError:  # the SDK raises this when aiohttp is not installed
        return None


def _ssl_context() -> Any:
    """The TLS context of the SDK's HTTP clients, built as the SDK builds it but once per CA setting: building
    one reads the CA bundle, tens of milliseconds that would otherwise fall on each connection's first call."""
    # The SDK's HTTP library reads these two variables; a flow may set them in its environment_variables.
    return _ssl_context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _ssl_context_for(cafile: str | None, capath: str | None) -> Any:
    """One context per pair of CA settings (the SDK's library reads them from the environment itself)."""
    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if not c.__module__.startswith("openai"))
    return importlib.import_module(base.__module__.split(".")[0]).create_ssl_context()


def _make_client(conn: Connection, timeout: float) -> openai.AsyncOpenAI:
    if conn.type == "azure_open_ai":
        if not conn.api_base:
            raise LLMError(f"connection '{conn.name}' has no api_base (the Azure OpenAI endpoint)")
        return openai.AsyncAzureOpenAI(
            api_key=conn.api_key or "",
            api_version=conn.api_version or "2024-02-01",
            azure_endpoint=conn.api_base,
            max_retries=0,
            timeout=timeout,
            http_client=_http_client(),
        )
    # Local OpenAI-compatible servers (Ollama, vLLM) often need no key, but the SDK insists on one.
    return openai.AsyncOpenAI(
        api_key=conn.api_key or "EMPTY",
        base_url=conn.base_url or None,
        organization=conn.organization or None,
        max_retries=0,
        timeout=timeout,
        http_client=_http_client(),
    )


def warm_up() -> None:
    """Do the SDK's one-time set-up now: its lazily imported chat and completions resources and the modules
    of its HTTP client. The fork server calls this so that the runners it forks start their first call sooner."""
    client = openai.AsyncOpenAI(
        api_key="warm-up", base_url="http://127.0.0.1:9/v1", max_retries=0, http_client=_http_client()
    )
    _ = client.chat.completions, client.completions


async def close_clients() -> None:
    """Close the cached clients and the direct path's HTTP session of the running loop."""
    loop = asyncio.get_running_loop()
    with _clients_lock:
        per_loop = _clients.pop(loop, {})
        found = _sessions.pop(loop, None)
    for client in per_loop.values():
        await client.close()
    if found is not None:
        await found[1].aclose()


# -- errors and retries ---------------------------------------------------------------------------------


def _host(conn: Connection) -> str:
    url = conn.api_base if conn.type == "azure_open_ai" else (conn.base_url or "https://api.openai.com/v1")
    parts = urlsplit(str(url))
    return parts.netloc or str(url)


def _provider(conn: Connection) -> str:
    return {"azure_open_ai": "Azure OpenAI", "open_ai": "OpenAI"}.get(conn.type, "OpenAI-compatible server")


def _scrub(text: str, conn: Connection) -> str:
    for secret in conn.secrets.values():
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def provider_message(exc: BaseException) -> str:
    """The provider's own error message from an SDK exception."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error") if isinstance(body.get("error"), Mapping) else body
        msg = inner.get("message")
        if msg:
            return str(msg)
    message = getattr(exc, "message", None) or str(exc)
    return str(message)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's Retry-After (or retry-after-ms) in seconds, if it sent one."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The OSError beneath an SDK error when the connection itself failed (refused, unreachable, reset).

    The aiohttp transport reports every connection failure as a connect timeout; a refused connection
    must still read as one and not be retried as if the server were slow.
    """
    cause = exc.__cause__ or exc.__context__
    for _ in range(10):
        if cause is None:
            return None
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _is_retriable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APITimeoutError) and _connection_failure(exc) is None:
        return True
    if isinstance(exc, openai.APIStatusError):
        status = exc.response.status_code
        if status == 429:
            # An exhausted quota does not refill by waiting a few seconds.
            code = getattr(exc, "code", None) or getattr(exc, "type", None)
            return code != "insufficient_quota"
        return status >= 500 or status == 422
    if isinstance(exc, openai.APIConnectionError):
        text = f"{exc} {_connection_failure(exc) or exc.__cause__}".lower()
        return any(
            m in text
            for m in (
                "connection aborted",
                "server disconnected",
                "reset by peer",
                "response payload is not completed",
            )
        )
    return False


def to_llm_error(
    exc: BaseException, conn: Connection, *, api: str, attempts: int, exhausted: bool = False
) -> LLMError:
    """A clear LLMError for an SDK exception: provider, endpoint host, HTTP status and the provider's message."""
    status = exc.response.status_code if isinstance(exc, openai.APIStatusError) else None
    pmsg = _scrub(provider_message(exc), conn)
    where = f"{_provider(conn)} {api} call to {_host(conn)} (connection '{conn.name}')"
    if status is not None:
        what = f"failed with HTTP {status}: {pmsg}"
    elif isinstance(exc, openai.APITimeoutError) and _connection_failure(exc) is None:
        what = "timed out"
    elif isinstance(exc, openai.APIConnectionError):
        cause = _connection_failure(exc) or exc.__cause__
        what = f"could not connect: {_scrub(str(cause or pmsg), conn)}"
    else:
        what = f"failed: {type(exc).__name__}: {pmsg}"
    message = f"{where} {what}"
    if exhausted:
        message += f" (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"
    cls = LLMRetriesExhausted if exhausted else LLMError
    return cls(
        message,
        status=status,
        provider_message=pmsg,
        retriable=_is_retriable(exc),
        attempts=attempts,
        user_error=status is None or status < 500,
    )


async def with_retries(
    call: Callable[[], Awaitable[T]],
    conn: Connection,
    *,
    api: str,
    policy: RetryPolicy | None = None,
    on_retry: Callable[[int, float, LLMError], None] | None = None,
) -> T:
    """Run `call`, retrying retriable failures per the policy; raises LLMError."""
    policy = policy or default_retry_policy()
    start = time.monotonic()
    attempt = 0
    consecutive_422 = 0
    while True:
        attempt += 1
        try:
            return await call()
        except openai.OpenAIError as exc:
            if not _is_retriable(exc):
                raise to_llm_error(exc, conn, api=api, attempts=attempt) from None
            is_422 = isinstance(exc, openai.APIStatusError) and exc.response.status_code == 422
            consecutive_422 = consecutive_422 + 1 if is_422 else 0
            if attempt >= policy.max_attempts or consecutive_422 >= policy.max_consecutive_422:
                raise to_llm_error(exc, conn, api=api, attempts=attempt, exhausted=True) from None
            wait = retry_after_seconds(exc)
            if wait is None:
                wait = policy.backoff(attempt)
            if time.monotonic() - start + wait > policy.max_total_seconds:
                raise to_llm_error(exc, conn, api=api, attempts=attempt, exhausted=True) from None
            if on_retry is not None:
                on_retry(attempt, wait, to_llm_error(exc, conn, api=api, attempts=attempt))
            await asyncio.sleep(wait)


# -- calls ----------------------------------------------------------------------------------------------


def usage_dict(usage: Any) -> dict[str, int]:
    """prompt/completion/total token counts from an SDK usage object ({} when the server sent none)."""
    if usage is None:
        return {}
    data = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
    return {
        k: int(data[k])
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        if data.get(k) is not None
    }


def _wants_usage_option(conn: Connection) -> bool:
    # Azure accepts stream_options from api-version 2024-09-01 on; older versions reject the field.
    if conn.type != "azure_open_ai":
        return True
    return (conn.api_version or "") >= "2024-09-01"


@dataclass
class LLMCall:
    """One finished or streaming call: the SDK response (or stream) and the token usage once known."""

    response: Any
    usage: dict[str, int] = field(default_factory=dict)
    attempts: int = 1


async def create(
    conn: Connection,
    api: Api,
    params: Mapping[str, Any],
    *,
    policy: RetryPolicy | None = None,
) -> Any:
    """Call chat.completions.create or completions.create with retries; returns the SDK response or a stream."""
    policy = policy or default_retry_policy()
    client = get_client(conn, timeout=policy.timeout)
    body = dict(params)
    endpoint = client.completions if api == "completion" else client.chat.completions
    api_name = "completion" if api == "completion" else "chat"
    direct = _direct_transport()

    async def call() -> Any:
        if direct:
            return await _direct_create(client, api, body, policy.timeout)
        return await endpoint.create(**body)

    try:
        return await with_retries(call, conn, api=api_name, policy=policy)
    except LLMError as exc:
        # Some OpenAI-compatible servers reject stream_options; ask once more without it.
        if (
            exc.status == 400
            and "stream_options" in body
            and "stream_options" in (exc.provider_message or "")
        ):
            body.pop("stream_options")
            return await with_retries(call, conn, api=api_name, policy=policy)
        raise


# -- the direct path: SDK-built requests over an aiohttp session ------------------------------------------

# aiohttp sessions, like httpx pools, belong to the loop that opened them.
_sessions: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, AsyncGenerator[None, None]]
] = weakref.WeakKeyDictionary()
# What a client's requests to one path and model share (they differ only in their body).
_templates: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], _Template]] = weakref.WeakKeyDictionary()
_direct: bool | None = None


def _direct_transport() -> bool:
    """Whether chat and completion calls take the direct path (FLOWSTUDIO_LLM_TRANSPORT=sdk turns it off)."""
    global _direct
    if _direct is None:
        _direct = os.environ.get("FLOWSTUDIO_LLM_TRANSPORT", "direct") != "sdk"
    return _direct


@dataclass(frozen=True)
class _Template:
    url: str
    headers: dict[str, str]
    proxy: str | None
    request: Any  # the SDK's request object, which its exceptions carry
    http: Any  # the SDK's HTTP library, for its Response type


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for this URL (HTTPS_PROXY, NO_PROXY, ...), read once per template."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


# Keyword arguments of the SDK's create() that are not part of the JSON body.
_REQUEST_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")


async def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    with _clients_lock:
        found = _sessions.get(loop)
        if found is not None and not found[0].closed:
            return found[0]
        # The engine bounds concurrency itself: the connector must not queue calls behind a pool limit.
        # Proxies come from the templates: trust_env would look them up in a thread on every request.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True))
        closer = _close_at_loop_end(session)
        _sessions[loop] = (session, closer)
    # A loop closes its open async generators before it closes (asyncio.run does), so the session closes with
    # the loop that owns it even when nobody calls close_clients().
    await closer.__anext__()
    return session


async def _close_at_loop_end(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await session.close()


async def _request_template(client: Any, path: str, model: str) -> _Template:
    """The URL and headers the SDK would send for `path` and `model` (Azure routes deployments by model)."""
    per_client = _templates.setdefault(client, {})
    found = per_client.get((path, model))
    if found is not None:
        return found
    options = FinalRequestOptions.construct(method="post", url=path, json_data={"model": model})
    options = await client._prepare_options(options)
    request = client._build_request(options)
    await client._prepare_request(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "host")}
    http = importlib.import_module(type(request).__module__.split(".")[0])
    found = _Template(str(request.url), headers, _env_proxy(str(request.url)), request, http)
    per_client[(path, model)] = found
    return found


def _parse(cls: type[pydantic.BaseModel], raw: bytes | str) -> Any:
    """The SDK model of a response body: validated when it conforms, else built leniently as the SDK does."""
    try:
        return cls.model_validate_json(raw)
    except pydantic.ValidationError:
        return construct_type(type_=cls, value=json.loads(raw))


async def _direct_create(client: Any, api: str, params: Mapping[str, Any], timeout: float) -> Any:
    """One chat or completion request over the loop's aiohttp session; errors are the SDK's exceptions."""
    body = {k: v for k, v in params.items() if k not in _REQUEST_OPTIONS}
    body.update(params.get("extra_body") or {})
    path = "/completions" if api == "completion" else "/chat/completions"
    template = await _request_template(client, path, str(body.get("model") or ""))
    url, headers, http = template.url, template.headers, template.http
    if params.get("extra_headers"):
        headers = {**headers, **params["extra_headers"]}
    request = template.request
    if params.get("extra_query"):
        url = str(http.URL(url).copy_merge_params(params["extra_query"]))
        request = http.Request("POST", url)
    stream = bool(body.get("stream"))
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    try:
        response = await (await _session()).post(
            url, data=payload, headers=headers, timeout=limits, proxy=template.proxy
        )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise openai.APITimeoutError(request=request) from exc
    except aiohttp.ClientError as exc:
        raise openai.APIConnectionError(message=f"Connection error: {exc}", request=request) from exc
    try:
        if response.status >= 400 or not stream:
            raw = await response.read()
            if response.status >= 400:
                error = http.Response(
                    status_code=response.status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
                    content=raw,
                    request=request,
                )
                raise client._make_status_error_from_response(error)
            response.release()
            cls = Completion if api == "completion" else ChatCompletion
            try:
                return _parse(cls, raw)
            except ValueError as exc:
                raise openai.APIResponseValidationError(
                    response=http.Response(status_code=response.status, content=raw, request=request),
                    body=raw.decode("utf-8", "replace")[:500],
                    message=f"The server's answer is not JSON: {exc}",
                ) from None
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        response.close()
        raise openai.APITimeoutError(request=request) from exc
    except aiohttp.ClientError as exc:
        response.close()
        raise openai.APIConnectionError(message=f"Connection error: {exc}", request=request) from exc
    except BaseException:
        response.close()
        raise
    return DirectStream(response, Completion if api == "completion" else ChatCompletionChunk, request)


class DirectStream:
    """The chunks of a streamed answer, decoded with the SDK's SSE decoder, as the SDK's AsyncStream yields them."""

    def __init__(self, response: aiohttp.ClientResponse, cls: type[pydantic.BaseModel], request: Any) -> None:
        self.response = response
        self._cls = cls
        self._request = request

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for sse in SSEDecoder().aiter_bytes(self.response.content.iter_any()):
                if sse.data.startswith("[DONE]"):
                    break
                data = sse.json()
                if isinstance(data, Mapping) and data.get("error"):
                    error = data["error"]
                    message = error.get("message") if isinstance(error, Mapping) else None
                    raise openai.APIError(
                        message=message
                        if isinstance(message, str) and message
                        else "An error occurred during streaming",
                        request=self._request,
                        body=error,
                    )
                yield _parse(self._cls, sse.data)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise openai.APITimeoutError(request=self._request) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(
                message=f"Connection error: {exc}", request=self._request
            ) from exc
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop reading; the connection is dropped unless the answer was read to its end."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


def stream_usage_option(conn: Connection, params: dict[str, Any]) -> None:
    """Ask for a final usage chunk when streaming, where the provider supports it."""
    if params.get("stream") and "stream_options" not in params and _wants_usage_option(conn):
        params["stream_options"] = {"include_usage": True}


async def iterate_stream(
    stream: Any, conn: Connection, *, api: str, pick: Callable[[Any], str | None], usage: dict[str, int]
) -> AsyncIterator[str]:
    """Yield text pieces from an SDK stream (via `pick`), filling `usage` from the final usage chunk."""
    try:
        async for chunk in stream:
            if getattr(chunk, "usage", None):
                usage.clear()
                usage.update(usage_dict(chunk.usage))
            if chunk.choices:
                piece = pick(chunk)
                yield piece if piece is not None else ""
    except openai.OpenAIError as exc:
        raise to_llm_error(exc, conn, api=api, attempts=1) from None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            await close()


async def list_models(conn: Connection, *, policy: RetryPolicy | None = None) -> list[str]:
    """The model ids the server lists: a connection test."""
    policy = policy or RetryPolicy(max_attempts=1, timeout=15.0)
    client = get_client(conn, timeout=policy.timeout)

    async def call() -> list[str]:
        return [m.id async for m in client.models.list()]

    return await with_retries(call, conn, api="models", policy=policy)


# -- a private loop for synchronous callers (user code calling a Prompty from a sync tool) ---------------

_sync_loop: asyncio.AbstractEventLoop | None = None
_sync_lock = threading.Lock()


def _loop_for_sync() -> asyncio.AbstractEventLoop:
    global _sync_loop
    with _sync_lock:
        if _sync_loop is None or _sync_loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="flowengine-llm-sync", daemon=True)
            thread.start()
            _sync_loop = loop
        return _sync_loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, on a long-lived private loop (clients are reused)."""
    return asyncio.run_coroutine_threadsafe(coro, _loop_for_sync()).result()


def iterate_sync(aiter: AsyncIterator[T]) -> Any:
    """A synchronous generator over an async iterator created for the private loop (see run_sync)."""
    loop = _loop_for_sync()
    iterator = aiter.__aiter__()

    def generator() -> Any:
        while True:
            try:
                item = asyncio.run_coroutine_threadsafe(iterator.__anext__(), loop).result()
            except StopAsyncIteration:
                return
            yield item

    return generator()
