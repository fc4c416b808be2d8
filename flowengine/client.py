"""An HTTP client for a Flow Studio server's REST API (`/api/v1/`), used by `flowstudio --server`.

Pure Python over httpx: it never imports Django. Every failure becomes a StudioError whose message says what
to do about it (a revoked token, a server that is not listening, a 404 naming the run or flow).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVER_ENV = "FLOWSTUDIO_SERVER"
TOKEN_ENV = "FLOWSTUDIO_TOKEN"
API_PREFIX = "/api/v1"
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Canceled"})
REVOKED_MESSAGE = "the token was revoked in the studio; create a new one under Settings"
# Files a flow folder holds that are never part of a flow: caches, VCS data and prompt flow's local state.
IGNORED_NAMES = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", ".venv", ".promptflow", ".mypy_cache", ".runs"}
)
IGNORED_SUFFIXES = (".pyc", ".pyo")
# A fixed timestamp keeps zips of the same files byte-identical (the studio deduplicates snapshots anyway).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class StudioError(Exception):
    """A failed call to the studio, with a message meant for the person at the terminal."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class StudioConfig:
    """Where the studio is and the personal access token to present."""

    server: str
    token: str

    @classmethod
    def resolve(cls, server: str | None = None, token: str | None = None) -> StudioConfig | None:
        """From the arguments, else FLOWSTUDIO_SERVER / FLOWSTUDIO_TOKEN; None when no server is set."""
        server = (server or os.environ.get(SERVER_ENV) or "").strip()
        if not server:
            return None
        token = (token or os.environ.get(TOKEN_ENV) or "").strip()
        if not token:
            raise StudioError(
                f"{TOKEN_ENV} is not set: create a personal access token under Settings in the studio at "
                f"{server} and export it as {TOKEN_ENV}"
            )
        if any(char.isspace() for char in token):
            raise StudioError(f"{TOKEN_ENV} holds whitespace: set it to the token alone (fst_...)")
        if not server.startswith(("http://", "https://")):
            raise StudioError(f"--server {server!r} must be an http:// or https:// URL")
        return cls(server=server.rstrip("/"), token=token)


def _detail(response: httpx.Response) -> tuple[str, Any]:
    """The studio's error message out of a JSON error body (ninja's `detail`, or our `error.message`)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:300] if text else response.reason_phrase), None
    if isinstance(body, Mapping):
        detail = body.get("detail")
        if isinstance(detail, list):
            # Pydantic validation errors: name the field of each.
            parts = []
            for item in detail:
                if isinstance(item, Mapping):
                    where = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query"))
                    parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
            return "; ".join(parts) or str(detail), body
        if isinstance(detail, str):
            return detail, body
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"]), body
    return str(body)[:300], body


class StudioClient:
    """Calls to one studio with one token; a context manager that closes its connection pool."""

    def __init__(
        self, config: StudioConfig, *, timeout: float = 60.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.server + API_PREFIX,
            headers={"Authorization": f"Bearer {config.token}", "User-Agent": "flowstudio-cli"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> StudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- plumbing ----------------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call; any non-2xx answer or transport failure raises StudioError."""
        url = self.config.server + API_PREFIX + path
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise StudioError(
                f"cannot reach the studio at {self.config.server}: {_reason(exc)}; is it running, and is "
                f"--server / {SERVER_ENV} right?"
            ) from None
        except httpx.TimeoutException:
            raise StudioError(
                f"the studio at {self.config.server} did not answer {method} {url} in time"
            ) from None
        except httpx.HTTPError as exc:
            raise StudioError(f"{method} {url} failed: {exc}") from None
        if response.is_success:
            return response
        message, body = _detail(response)
        status = response.status_code
        if status == 401:
            if "revoked" in message.lower():
                raise StudioError(f"{REVOKED_MESSAGE} ({message})", status=status, body=body)
            raise StudioError(
                f"the studio at {self.config.server} does not accept this token ({message}); check "
                f"{TOKEN_ENV} or create a new token under Settings",
                status=status,
                body=body,
            )
        if status >= 500:
            raise StudioError(
                f"the studio failed on {method} {url} (HTTP {status}); its log has the details",
                status=status,
                body=body,
            )
        if status == 404 and message in ("Not Found", "Not Found."):
            message = f"not found: {method} {url} (it does not exist, or it is not shared with you)"
        raise StudioError(message, status=status, body=body)

    def get_json(self, path: str, **params: Any) -> Any:
        """GET returning the decoded JSON body."""
        return self.request("GET", path, params=_clean(params)).json()

    def post_json(self, path: str, payload: Any = None, **kwargs: Any) -> Any:
        """POST with a JSON body, returning the decoded JSON answer."""
        return self.request("POST", path, json=payload, **kwargs).json()

    # -- links -------------------------------------------------------------------------------------------

    def flow_url(self, flow_id: int, version: int | None = None) -> str:
        """The studio page of a flow (at a version)."""
        suffix = f"?version={version}" if version is not None else ""
        return f"{self.config.server}/flows/{flow_id}/{suffix}"

    def run_url(self, run_id: str) -> str:
        """The studio page of a run."""
        return f"{self.config.server}/runs/{run_id}/"

    def compare_url(self, names: list[str]) -> str:
        """The studio's side-by-side comparison of runs."""
        return f"{self.config.server}/runs/compare?" + str(httpx.QueryParams({"runs": ",".join(names)}))

    # -- account -----------------------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """The user the token belongs to."""
        return self.get_json("/me")

    # -- flows -------------------------------------------------------------------------------------------

    def flow_find(self, name: str) -> dict[str, Any] | None:
        """The flow of that exact name the caller sees: their own first, then one they may edit, then any."""
        flows = [f for f in self.get_json("/flows", q=name) if f.get("name") == name]
        rank = {"owner": 0, "editor": 1, "viewer": 2}
        flows.sort(key=lambda f: (rank.get(str(f.get("role")), 3), f.get("id", 0)))
        return flows[0] if flows else None

    def flow_push(
        self, folder: Path, *, name: str, message: str = ""
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Upload a flow folder as a new version of the flow `name` (created when missing): (flow, version)."""
        data = zip_folder(folder)
        existing = self.flow_find(name)
        upload = {"file": (f"{name}.zip", data, "application/zip")}
        if existing is None:
            answer = self.post_json("/flows/import", files=upload, data={"name": name})
            return answer["flow"], answer["version"]
        if existing.get("role") not in ("owner", "editor"):
            raise StudioError(f"flow '{name}' is shared with you as a viewer: you cannot push new versions")
        version = self.post_json(f"/flows/{existing['id']}/import", files=upload, data={"message": message})
        return self.get_json(f"/flows/{existing['id']}"), version

    def flow_export(self, flow_id: int, version: int | None = None) -> bytes:
        """A version (the head when None) of a flow as zip bytes."""
        return self.request("GET", f"/flows/{flow_id}/export", params=_clean({"version": version})).content

    # -- runs --------------------------------------------------------------------------------------------

    def run_create_from_yaml(self, run_yml: bytes, folder_zip: bytes | None) -> dict[str, Any]:
        """Submit a run.yml, with a zip of the local files it refers to."""
        files: dict[str, Any] = {"run_yml": ("run.yml", run_yml, "application/yaml")}
        if folder_zip is not None:
            files["folder"] = ("folder.zip", folder_zip, "application/zip")
        return self.post_json("/runs/yaml", files=files)

    def run_get(self, name: str) -> dict[str, Any]:
        """One run by name or id."""
        return self.get_json(f"/runs/{_seg(name)}")

    def run_progress(self, name: str) -> dict[str, Any]:
        """Status, line counts and tokens of a run."""
        return self.get_json(f"/runs/{_seg(name)}/progress")

    def run_list(self, *, limit: int, archived: str = "exclude") -> list[dict[str, Any]]:
        """The newest runs the caller sees."""
        return self.get_json("/runs", limit=limit, archived=archived)

    def run_lines(self, name: str, *, max_results: int | None) -> Iterator[dict[str, Any]]:
        """Every line of a run in line order (up to `max_results`), page by page."""
        page, seen = 1, 0
        while True:
            answer = self.get_json(f"/runs/{_seg(name)}/details", page=page, per_page=100)
            for line in answer["lines"]:
                if max_results is not None and seen >= max_results:
                    return
                seen += 1
                yield line
            if page >= int(answer.get("pages") or 1):
                return
            page += 1

    def run_metrics(self, name: str) -> dict[str, Any]:
        """`{run, status, metrics, system}` of a run."""
        return self.get_json(f"/runs/{_seg(name)}/metrics")

    def run_logs(self, name: str, *, after: int) -> dict[str, Any]:
        """Log lines after position `after`, with the run's status."""
        return self.get_json(f"/runs/{_seg(name)}/logs", after=after, limit=500)

    def run_cancel(self, name: str) -> dict[str, Any]:
        """Ask the studio to cancel a run."""
        return self.post_json(f"/runs/{_seg(name)}/cancel")

    # -- deployments ---------------------------------------------------------------------------------------

    def deploy(self, *, run: str, endpoint: str, deployment: str | None) -> dict[str, Any]:
        """Deploy the snapshot a run ran to an endpoint (created when missing, with keys shown this once)."""
        payload = _clean({"run": run, "endpoint": endpoint, "deployment": deployment})
        return self.post_json("/deployments", payload)

    def endpoint_traffic(self, endpoint: str, traffic: Mapping[str, int]) -> dict[str, Any]:
        """Set an endpoint's traffic split; deployments left out get 0%."""
        return self.request("PATCH", f"/endpoints/{_seg(endpoint)}", json={"traffic": dict(traffic)}).json()


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _seg(value: str) -> str:
    """A run name or id as one URL path segment."""
    from urllib.parse import quote

    return quote(value, safe="")


def _reason(exc: httpx.ConnectError) -> str:
    text = str(exc)
    if "refused" in text.lower() or "errno 111" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


def _ignored(path: Path) -> bool:
    return any(part in IGNORED_NAMES for part in path.parts) or path.name.endswith(IGNORED_SUFFIXES)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a flow folder by its relative POSIX path, without caches and VCS data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudioError(f"{folder}: not a folder")
    files: dict[str, bytes] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if _ignored(rel) or path.is_dir():
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            raise StudioError(f"{path}: a link to a file outside the flow folder cannot be pushed")
        files[rel.as_posix()] = path.read_bytes()
    if not files:
        raise StudioError(f"{folder}: the folder holds no files")
    return files


def zip_files(files: Mapping[str, bytes]) -> bytes:
    """A deterministic zip of {relative path: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[path])
    return buffer.getvalue()


def zip_folder(folder: Path) -> bytes:
    """A flow folder as a deterministic zip, its files at the archive's root."""
    return zip_files(folder_files(folder))


def unzip_into(data: bytes, target: Path) -> list[str]:
    """Extract a zip the studio sent into `target`, refusing any entry that would land outside it."""
    target = Path(target)
    root = target.resolve()
    written = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            dest = (target / info.filename).resolve()
            if not dest.is_relative_to(root) or Path(info.filename).is_absolute():
                raise StudioError(f"refused the archive entry {info.filename!r}: it points outside {target}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.read(info))
            written.append(info.filename)
    return written
