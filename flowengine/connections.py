"""Connections: the model, prompt flow's connection YAML, a local encrypted store, and the process-wide provider."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

ConnectionType = Literal["open_ai", "azure_open_ai", "custom", "openai_compatible"]
CONNECTION_TYPES: tuple[str, ...] = ("open_ai", "azure_open_ai", "custom", "openai_compatible")
SCRUBBED = "******"
DEFAULT_AZURE_API_VERSION = "2024-02-01"  # prompt flow's ConnectionDefaultApiVersion.AZURE_OPEN_AI
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_ENV_RE = re.compile(r"^\$\{env:([^{}]+)\}$")

# Spellings of `type:` seen in prompt flow YAML files, class names and model configurations.
_TYPE_ALIASES = {
    "open_ai": "open_ai",
    "openai": "open_ai",
    "openaiconnection": "open_ai",
    "azure_open_ai": "azure_open_ai",
    "azure_openai": "azure_open_ai",
    "azureopenai": "azure_open_ai",
    "azureopenaiconnection": "azure_open_ai",
    "custom": "custom",
    "customconnection": "custom",
    "openai_compatible": "openai_compatible",
    "serverless": "openai_compatible",
    "serverlessconnection": "openai_compatible",
}
# Top-level YAML keys that are not connection values.
_META_KEYS = {"$schema", "name", "type", "module", "created_date", "last_modified_date", "expiry_time"}


class ConnectionConfigError(Exception):
    """A connection could not be read, found or stored; the message names the file or connection."""


class ConnectionNotFound(ConnectionConfigError, KeyError):
    """No connection has that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "connection not found"


def normalize_type(value: Any) -> str:
    """The canonical connection type for any prompt flow spelling; raises ValueError for others."""
    key = str(value or "").strip().lower()
    if key not in _TYPE_ALIASES:
        raise ValueError(f"unsupported connection type '{value}' (use one of {', '.join(CONNECTION_TYPES)})")
    return _TYPE_ALIASES[key]


@dataclass(frozen=True)
class Connection:
    """A named connection: plain `configs` and secret `secrets` (api_key lives in secrets)."""

    name: str
    type: ConnectionType
    configs: Mapping[str, Any] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", normalize_type(self.type))
        object.__setattr__(self, "configs", MappingProxyType(dict(self.configs or {})))
        object.__setattr__(self, "secrets", MappingProxyType(dict(self.secrets or {})))

    def __repr__(self) -> str:
        # Never show secrets in logs or tracebacks.
        return f"Connection(name={self.name!r}, type={self.type!r}, configs={dict(self.configs)!r}, secrets=<{len(self.secrets)} hidden>)"

    @property
    def api_key(self) -> str | None:
        """The API key, if any."""
        return self.secrets.get("api_key")

    @property
    def base_url(self) -> str | None:
        """The OpenAI base URL (open_ai / openai_compatible)."""
        return self.configs.get("base_url") or None

    @property
    def api_base(self) -> str | None:
        """The Azure endpoint (azure_open_ai)."""
        return self.configs.get("api_base") or None

    @property
    def api_version(self) -> str | None:
        """The Azure API version."""
        return self.configs.get("api_version") or None

    @property
    def organization(self) -> str | None:
        """The OpenAI organization."""
        return self.configs.get("organization") or None

    @property
    def is_llm(self) -> bool:
        """Whether an llm node can use this connection."""
        return self.type in ("open_ai", "azure_open_ai", "openai_compatible")

    def to_dict(self, *, reveal: bool = False) -> dict[str, Any]:
        """A JSON-safe dict; secret values are "******" unless reveal."""
        return {
            "name": self.name,
            "type": self.type,
            "configs": dict(self.configs),
            "secrets": {k: (v if reveal else SCRUBBED) for k, v in self.secrets.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Connection:
        """The inverse of `to_dict(reveal=True)`."""
        return cls(
            name=str(d["name"]),
            type=d["type"],
            configs=dict(d.get("configs") or {}),
            secrets={k: str(v) for k, v in (d.get("secrets") or {}).items() if v is not None},
        )

    @classmethod
    def open_ai(
        cls, name: str, *, api_key: str | None, base_url: str | None = None, organization: str | None = None
    ) -> Connection:
        """An OpenAI (or OpenAI-compatible base URL) connection."""
        configs = {"base_url": base_url or None, "organization": organization or None}
        return cls(
            name=name, type="open_ai", configs=configs, secrets={"api_key": api_key} if api_key else {}
        )

    @classmethod
    def azure_open_ai(
        cls,
        name: str,
        *,
        api_base: str,
        api_key: str | None,
        api_version: str | None = None,
        api_type: str = "azure",
    ) -> Connection:
        """An Azure OpenAI connection."""
        configs = {
            "api_base": api_base,
            "api_type": api_type,
            "api_version": api_version or DEFAULT_AZURE_API_VERSION,
            "auth_mode": "key",
        }
        return cls(
            name=name, type="azure_open_ai", configs=configs, secrets={"api_key": api_key} if api_key else {}
        )


def resolve_env(value: Any, *, where: str = "") -> Any:
    """Resolve a `${env:VAR}` string from the environment; raises ConnectionConfigError when VAR is not set."""
    if not isinstance(value, str):
        return value
    match = _ENV_RE.match(value.strip())
    if not match:
        return value
    var = match.group(1)
    if var not in os.environ:
        raise ConnectionConfigError(f"{where}environment variable {var} is not set (referenced as {value})")
    return os.environ[var]


def _from_mapping(data: Mapping[str, Any], *, where: str) -> Connection:
    """Build a Connection from prompt flow's connection fields (YAML shape)."""
    name = data.get("name")
    if not name or not isinstance(name, str):
        raise ConnectionConfigError(f"{where}'name' is required")
    if not _NAME_RE.match(name):
        raise ConnectionConfigError(f"{where}invalid connection name '{name}' (letters, digits, _ . - only)")
    try:
        ctype = normalize_type(data.get("type"))
    except ValueError as exc:
        raise ConnectionConfigError(f"{where}{exc}") from None

    def value(key: str) -> Any:
        return resolve_env(data.get(key), where=f"{where}'{key}': ")

    if ctype == "custom":
        configs_raw, secrets_raw = data.get("configs") or {}, data.get("secrets") or {}
        if not isinstance(configs_raw, Mapping) or not isinstance(secrets_raw, Mapping):
            raise ConnectionConfigError(f"{where}'configs' and 'secrets' must be mappings")
        configs = {str(k): resolve_env(v, where=f"{where}'configs.{k}': ") for k, v in configs_raw.items()}
        secrets = {}
        for k, v in secrets_raw.items():
            v = resolve_env(v, where=f"{where}'secrets.{k}': ")
            if v is None or str(v) == "<user-input>":
                raise ConnectionConfigError(f"{where}secret '{k}' has no value")
            secrets[str(k)] = str(v)
        return Connection(name=name, type="custom", configs=configs, secrets=secrets)

    api_key = value("api_key")
    if api_key is not None and str(api_key) == "<user-input>":
        raise ConnectionConfigError(
            f"{where}'api_key' has no value (replace <user-input> or pass --set api_key=...)"
        )
    secrets = {"api_key": str(api_key)} if api_key else {}
    if ctype == "azure_open_ai":
        api_base = value("api_base") or value("azure_endpoint") or value("endpoint")
        if not api_base:
            raise ConnectionConfigError(f"{where}'api_base' is required for an azure_open_ai connection")
        configs: dict[str, Any] = {
            "api_base": str(api_base),
            "api_type": value("api_type") or "azure",
            "api_version": str(value("api_version") or DEFAULT_AZURE_API_VERSION),
            "auth_mode": value("auth_mode") or "key",
        }
        if data.get("resource_id"):
            configs["resource_id"] = value("resource_id")
        if configs["auth_mode"] == "key" and not secrets:
            raise ConnectionConfigError(f"{where}'api_key' is required for an azure_open_ai connection")
        return Connection(name=name, type="azure_open_ai", configs=configs, secrets=secrets)

    base_url = value("base_url") or value("api_base")
    if base_url in ("", "_"):
        base_url = None
    if ctype == "openai_compatible" and data.get("type", "").lower().startswith("serverless") and base_url:
        # prompt flow appends /v1 to a serverless api_base so the OpenAI SDK can use it.
        base_url = base_url if str(base_url).endswith("/v1") else str(base_url) + "/v1"
    configs = {"base_url": str(base_url) if base_url else None, "organization": value("organization") or None}
    if ctype == "open_ai" and not secrets:
        raise ConnectionConfigError(f"{where}'api_key' is required for an open_ai connection")
    return Connection(name=name, type=ctype, configs=configs, secrets=secrets)  # type: ignore[arg-type]


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply `--set key=value` overrides; `configs.k` / `secrets.k` reach into custom connections."""
    result = dict(data)
    for key, val in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest and head in ("configs", "secrets"):
            section = dict(result.get(head) or {})
            section[rest] = val
            result[head] = section
        else:
            result[str(key)] = val
    return result


def connection_from_yaml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Connection:
    """Read prompt flow's connection YAML (with `${env:VAR}` values) plus `--set k=v` overrides."""
    file = Path(path)
    where = f"{file.name}: "
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConnectionConfigError(f"{file}: cannot read the file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConnectionConfigError(f"{file.name}{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConnectionConfigError(f"{where}invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConnectionConfigError(f"{where}the connection file must be a YAML mapping")
    return _from_mapping(_apply_overrides(dict(data), overrides or {}), where=where)


def connection_from_fields(fields: Mapping[str, Any]) -> Connection:
    """Build a Connection from prompt flow's flat fields (`name`, `type`, `api_key`, `configs`...)."""
    return _from_mapping(fields, where="")


# -- the local encrypted store ---------------------------------------------------------------------------


def flowstudio_home() -> Path:
    """The local Flow Studio directory: $FLOWSTUDIO_HOME or ~/.flowstudio."""
    return Path(os.environ.get("FLOWSTUDIO_HOME") or Path.home() / ".flowstudio")


class LocalConnectionStore:
    """Connections on this machine, secrets encrypted with Fernet.

    The key comes from $FLOWSTUDIO_CONNECTION_KEY or a 0600 key file kept apart from the data
    (`<home>/keys/connection.key`, or $FLOWSTUDIO_CONNECTION_KEY_FILE); the data lives in
    `<home>/connections/connections.json` and holds only ciphertext for secret values.
    """

    def __init__(self, home: str | Path | None = None, *, key_file: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else flowstudio_home()
        self.data_file = self.home / "connections" / "connections.json"
        env_key_file = os.environ.get("FLOWSTUDIO_CONNECTION_KEY_FILE")
        self.key_file = Path(key_file or env_key_file or self.home / "keys" / "connection.key")
        self._lock = threading.Lock()
        self._fernet: Any = None

    # key handling

    def _get_fernet(self) -> Any:
        from cryptography.fernet import Fernet

        if self._fernet is not None:
            return self._fernet
        env_key = os.environ.get("FLOWSTUDIO_CONNECTION_KEY")
        if env_key:
            try:
                self._fernet = Fernet(env_key.strip().encode("ascii"))
            except (ValueError, UnicodeEncodeError):
                raise ConnectionConfigError(
                    "FLOWSTUDIO_CONNECTION_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes)"
                ) from None
            return self._fernet
        if self.key_file.exists():
            mode = self.key_file.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConnectionConfigError(
                    f"{self.key_file}: the key file is readable by others (mode {oct(mode)}); run chmod 600 on it"
                )
            key = self.key_file.read_bytes().strip()
        else:
            key = Fernet.generate_key()
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(self.key_file.parent, 0o700)
            # O_EXCL: two processes creating the first key at once must not end with different keys.
            try:
                fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                key = self.key_file.read_bytes().strip()
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key + b"\n")
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise ConnectionConfigError(f"{self.key_file}: not a valid Fernet key") from None
        return self._fernet

    def _encrypt(self, secrets: Mapping[str, str]) -> str:
        return self._get_fernet().encrypt(json.dumps(dict(secrets)).encode("utf-8")).decode("ascii")

    def _decrypt(self, token: str, name: str) -> dict[str, str]:
        from cryptography.fernet import InvalidToken

        try:
            return json.loads(self._get_fernet().decrypt(token.encode("ascii")).decode("utf-8"))
        except InvalidToken:
            raise ConnectionConfigError(
                f"connection '{name}': its secrets cannot be decrypted with the current key "
                f"({'FLOWSTUDIO_CONNECTION_KEY' if os.environ.get('FLOWSTUDIO_CONNECTION_KEY') else self.key_file})"
            ) from None

    # data file

    def _read(self) -> dict[str, Any]:
        try:
            text = self.data_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConnectionConfigError(f"{self.data_file}: corrupt connection store ({exc})") from None
        return data.get("connections", {}) if isinstance(data, dict) else {}

    def _write(self, records: Mapping[str, Any]) -> None:
        self.data_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.data_file.parent, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=".connections-", dir=self.data_file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "connections": dict(records)}, fh, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.data_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A file lock as well as the thread lock: two CLI processes may write at once.
        import fcntl

        self.data_file.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.data_file.parent / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _to_record(self, conn: Connection) -> dict[str, Any]:
        return {
            "name": conn.name,
            "type": conn.type,
            "configs": dict(conn.configs),
            "secret_keys": sorted(conn.secrets),
            "secrets": self._encrypt(conn.secrets),
        }

    def _from_record(self, record: Mapping[str, Any]) -> Connection:
        return Connection(
            name=record["name"],
            type=record["type"],
            configs=record.get("configs") or {},
            secrets=self._decrypt(record.get("secrets") or "", record["name"])
            if record.get("secrets")
            else {},
        )

    # public API

    def create(self, conn: Connection, *, replace: bool = False) -> Connection:
        """Store a connection; an existing name is an error unless replace (secrets "******" keep their old value)."""
        with self._locked():
            records = self._read()
            old = records.get(conn.name)
            if old is not None and not replace:
                raise ConnectionConfigError(f"connection '{conn.name}' already exists")
            if old is not None and any(v == SCRUBBED for v in conn.secrets.values()):
                previous = self._from_record(old).secrets
                merged = {k: (previous.get(k, "") if v == SCRUBBED else v) for k, v in conn.secrets.items()}
                conn = Connection(name=conn.name, type=conn.type, configs=conn.configs, secrets=merged)
            records[conn.name] = self._to_record(conn)
            self._write(records)
        return conn

    def get(self, name: str) -> Connection:
        """The connection with its secrets decrypted; raises ConnectionNotFound."""
        record = self._read().get(name)
        if record is None:
            raise ConnectionNotFound(f"connection '{name}' not found in {self.data_file}")
        return self._from_record(record)

    def list(self) -> list[Connection]:
        """Every connection, sorted by name, secrets decrypted (mask them with to_dict())."""
        return [self._from_record(r) for _, r in sorted(self._read().items())]

    def delete(self, name: str) -> None:
        """Remove a connection; raises ConnectionNotFound."""
        with self._locked():
            records = self._read()
            if name not in records:
                raise ConnectionNotFound(f"connection '{name}' not found in {self.data_file}")
            del records[name]
            self._write(records)

    def as_mapping(self) -> dict[str, Connection]:
        """All connections by name."""
        return {c.name: c for c in self.list()}


# -- the process-wide connection provider (set by the runner, read by Prompty and compat code) -----------

_current: dict[str, Connection] = {}
_current_lock = threading.Lock()


def set_current_connections(mapping: Mapping[str, Connection | Mapping[str, Any]] | None) -> None:
    """Install the connections user code in this process may resolve by name."""
    resolved = {}
    for name, conn in (mapping or {}).items():
        resolved[name] = (
            conn if isinstance(conn, Connection) else Connection.from_dict({"name": name, **conn})
        )
    with _current_lock:
        _current.clear()
        _current.update(resolved)


def current_connections() -> dict[str, Connection]:
    """A copy of the installed connections."""
    with _current_lock:
        return dict(_current)


def get_connection(name: str) -> Connection:
    """The installed connection by name, else the local store's; raises ConnectionNotFound."""
    with _current_lock:
        conn = _current.get(name)
    if conn is not None:
        return conn
    try:
        return LocalConnectionStore().get(name)
    except ConnectionNotFound:
        known = sorted(current_connections())
        hint = f" (known: {', '.join(known)})" if known else ""
        raise ConnectionNotFound(f"connection '{name}' not found{hint}") from None
