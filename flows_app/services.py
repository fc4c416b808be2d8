"""Writes of the flows app: connections and their encrypted secrets; flow storage, versions, zips, sharing."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db import connection as db_connection
from django.utils import timezone

from flowengine.connections import DEFAULT_AZURE_API_VERSION
from flowengine.connections import Connection as EngineConnection
from flows_app.models import (
    CONNECTION_NAME_PATTERN,
    CONNECTION_NAME_RULE,
    Blob,
    Connection,
    Flow,
    FlowShare,
    FlowTest,
    FlowVersion,
    Snapshot,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from accounts_app.models import Team

SECRET_MASK: Final = "******"
TEST_TIMEOUT_SECONDS: Final = 10.0
ENCRYPTION_KEY_FILE: Final = "encryption.key"


class _Keep:
    """Marker for 'leave this field as it is' in connection_update."""


KEEP: Final = _Keep()

# Config keys that each type reads from its own form field; other keys are free-form custom configs.
URL_CONFIG_KEYS: Final = ("base_url", "api_base")
KNOWN_CONFIG_KEYS: Final = ("base_url", "api_base", "api_version", "organization", "model", "api_type")


class ConnectionSecretsUnreadable(Exception):
    """The stored secrets of a connection cannot be decrypted with the configured keys."""


@dataclass(frozen=True)
class ConnectionTestResult:
    """The outcome of connection_test: ok plus a message that never contains a secret."""

    ok: bool
    message: str


# --- storable values --------------------------------------------------------------------------------

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE_OR_NUL = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """`value` with the characters this database cannot store replaced by U+FFFD, in its strings and keys.

    A lone surrogate cannot be encoded as UTF-8 (nor shown on a page), and PostgreSQL's text and jsonb refuse
    NUL as well. Flow code's outputs, errors and logs, and datasets, may hold both; refused once, a write
    would be refused on every retry.
    """
    unstorable = _LONE_SURROGATE_OR_NUL if db_connection.vendor == "postgresql" else _LONE_SURROGATE
    return _replace_unstorable(value, unstorable)


def _replace_unstorable(value: Any, unstorable: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return unstorable.sub("\ufffd", value)
    if isinstance(value, dict):
        return {
            _replace_unstorable(k, unstorable): _replace_unstorable(v, unstorable) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_replace_unstorable(v, unstorable) for v in value]
    return value


# --- encryption -------------------------------------------------------------------------------------


def _encryption_keys() -> list[str]:
    # The data-dir key file holds one key per line after a rotation, so an entry may carry several keys.
    return [key for entry in settings.STUDIO_ENCRYPTION_KEYS for key in str(entry).split()]


def _multifernet(keys: list[str] | None = None) -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in (keys or _encryption_keys())])


def _secrets_encrypt(secrets: Mapping[str, str]) -> str:
    payload = json.dumps(dict(secrets), sort_keys=True).encode()
    return _multifernet().encrypt(payload).decode()


def _secrets_decrypt(connection: Connection) -> dict[str, str]:
    if not connection.encrypted_secrets:
        return {}
    try:
        payload = _multifernet().decrypt(connection.encrypted_secrets.encode())
    except InvalidToken:
        raise ConnectionSecretsUnreadable(
            f"Connection '{connection.name}': its secrets cannot be decrypted with the keys in "
            "STUDIO_ENCRYPTION_KEYS (was a key removed before `manage.py rotate_encryption_key --reencrypt`?)."
        ) from None
    return dict(json.loads(payload))


def is_masked(value: str) -> bool:
    """True when a submitted secret is the mask (or only asterisks), which means 'keep the stored value'."""
    return bool(value) and set(value) == {"*"}


# --- validation -------------------------------------------------------------------------------------


def _validate(*, name: str, type: str, configs: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    errors: dict[str, str] = {}
    if not re.match(CONNECTION_NAME_PATTERN, name or ""):
        errors["name"] = f"Connection name '{name}' is invalid: use {CONNECTION_NAME_RULE}."
    if type not in Connection.Type.values:
        errors["type"] = f"Unknown connection type '{type}': use one of {', '.join(Connection.Type.values)}."
    for key, value in configs.items():
        if not key or not isinstance(key, str):
            errors["configs"] = "Every config needs a name."
        elif value is not None and not isinstance(value, str | int | float | bool):
            errors["configs"] = f"Config '{key}' must be a string, number or boolean."
    for key in URL_CONFIG_KEYS:
        url = configs.get(key)
        if url:
            parts = urlsplit(str(url))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                errors[key] = f"{key} '{url}' is not an http(s) URL."
    for key, value in secrets.items():
        if not key or not isinstance(key, str):
            errors["secrets"] = "Every secret needs a name."
        elif not isinstance(value, str) or not value:
            errors["secrets"] = f"Secret '{key}' needs a value."
        elif is_masked(value):
            errors["secrets"] = f"Secret '{key}' is only asterisks: give its real value."
    if type == Connection.Type.AZURE_OPEN_AI:
        if not configs.get("api_base"):
            errors["api_base"] = (
                "An Azure OpenAI connection needs api_base (https://<resource>.openai.azure.com/)."
            )
        if not secrets.get("api_key"):
            errors["api_key"] = "An Azure OpenAI connection needs an api_key."
    elif type == Connection.Type.OPEN_AI:
        if not secrets.get("api_key"):
            errors["api_key"] = "An OpenAI connection needs an api_key."
    elif type == Connection.Type.OPENAI_COMPATIBLE:
        if not configs.get("base_url"):
            errors["base_url"] = (
                "An OpenAI-compatible connection needs base_url (for example http://localhost:11434/v1)."
            )
    if errors:
        raise ValidationError(errors)


def _check_team(*, owner: AbstractBaseUser, team: Team | None) -> None:
    from accounts_app.selectors import user_team_ids

    if team is not None and team.pk not in set(user_team_ids(owner)):
        raise ValidationError(
            {"team": f"You are not a member of team '{team}', so you cannot share with it."}
        )


def _clean_configs(configs: Mapping[str, Any]) -> dict[str, Any]:
    # Blank optional configs are dropped so that "not set" has one representation.
    return {str(key).strip(): value for key, value in configs.items() if value not in (None, "")}


# --- connection services ----------------------------------------------------------------------------


@transaction.atomic
def connection_create(
    *,
    owner: AbstractBaseUser,
    name: str,
    type: str,
    configs: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
    team: Team | None = None,
) -> Connection:
    """Create a connection owned by `owner`; secrets are encrypted before they reach the database."""
    configs = _clean_configs(configs or {})
    secrets = {str(key).strip(): value for key, value in (secrets or {}).items() if value != ""}
    name = (name or "").strip()
    _validate(name=name, type=type, configs=configs, secrets=secrets)
    _check_team(owner=owner, team=team)
    if Connection.objects.filter(owner=owner, name=name).exists():
        raise ValidationError({"name": f"You already have a connection named '{name}'."})
    if type == Connection.Type.AZURE_OPEN_AI:
        configs.setdefault("api_type", "azure")
        configs.setdefault("api_version", DEFAULT_AZURE_API_VERSION)
    try:
        with transaction.atomic():
            return Connection.objects.create(
                owner=owner,
                team=team,
                name=name,
                type=type,
                configs=configs,
                encrypted_secrets=_secrets_encrypt(secrets),
                secret_names=sorted(secrets),
                created_by=owner,
                updated_by=owner,
            )
    except IntegrityError:
        # Two concurrent creates with the same name: the unique constraint decides.
        raise ValidationError({"name": f"You already have a connection named '{name}'."}) from None


@transaction.atomic
def connection_update(
    *,
    connection: Connection,
    by: AbstractBaseUser,
    name: str | None = None,
    type: str | None = None,
    configs: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str | None] | None = None,
    team: Team | None | _Keep = KEEP,
) -> Connection:
    """Update a connection: configs are replaced; secrets merge (blank or '******' keeps, None removes)."""
    connection = Connection.objects.select_for_update().get(pk=connection.pk)
    new_name = connection.name if name is None else name.strip()
    new_type = connection.type if type is None else type
    new_configs = dict(connection.configs) if configs is None else _clean_configs(configs)
    try:
        merged = _secrets_decrypt(connection)
    except ConnectionSecretsUnreadable as error:
        raise ValidationError({"secrets": f"{error} Delete the connection and create it again."}) from None
    for key, value in (secrets or {}).items():
        key = str(key).strip()
        if value is None:
            merged.pop(key, None)
        elif value == "" or is_masked(value):
            if key not in merged:
                raise ValidationError({"secrets": f"Secret '{key}' is new: give its value."})
        else:
            merged[key] = value
    _validate(name=new_name, type=new_type, configs=new_configs, secrets=merged)
    if new_type == Connection.Type.AZURE_OPEN_AI:
        new_configs.setdefault("api_type", "azure")
        new_configs.setdefault("api_version", DEFAULT_AZURE_API_VERSION)
    if new_name != connection.name and (
        Connection.objects.filter(owner=connection.owner, name=new_name).exclude(pk=connection.pk).exists()
    ):
        raise ValidationError({"name": f"You already have a connection named '{new_name}'."})
    if not isinstance(team, _Keep):
        _check_team(owner=connection.owner, team=team)
        connection.team = team
    connection.name = new_name
    connection.type = new_type
    connection.configs = new_configs
    connection.encrypted_secrets = _secrets_encrypt(merged)
    connection.secret_names = sorted(merged)
    connection.updated_by = by
    try:
        with transaction.atomic():
            connection.save()
    except IntegrityError:
        # A concurrent create or rename took the name first.
        raise ValidationError({"name": f"You already have a connection named '{new_name}'."}) from None
    return connection


def connection_share(*, connection: Connection, team: Team | None, by: AbstractBaseUser) -> Connection:
    """Share a connection read-only with one of its owner's teams, or stop sharing it (team=None)."""
    _check_team(owner=connection.owner, team=team)
    connection.team = team
    connection.updated_by = by
    connection.save(update_fields=["team", "updated_by", "updated_at"])
    return connection


def connection_delete(*, connection: Connection, by: AbstractBaseUser) -> None:
    """Delete a connection; deleting one that is already gone is not an error."""
    Connection.objects.filter(pk=connection.pk).delete()


def connection_secrets_for_runner(connection: Connection) -> EngineConnection:
    """The connection with its decrypted secrets, shaped for the flow engine: only for handing to a runner."""
    return EngineConnection(
        name=connection.name,
        type=connection.type,
        configs=dict(connection.configs),
        secrets=_secrets_decrypt(connection),
    )


def _scrub(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value:
            text = text.replace(value, SECRET_MASK)
    return text


def connection_test(*, connection: Connection, timeout: float = TEST_TIMEOUT_SECONDS) -> ConnectionTestResult:
    """Make one minimal real call (a 1-token chat when a model is set, else list models); never echoes a secret."""
    import openai

    try:
        engine_connection = connection_secrets_for_runner(connection)
    except ConnectionSecretsUnreadable as error:
        return ConnectionTestResult(ok=False, message=str(error))
    configs, secrets = engine_connection.configs, engine_connection.secrets
    api_key = secrets.get("api_key") or ""
    model = str(configs.get("model") or "")
    # Empty strings, not None: the SDK fills None from the server's own OPENAI_* environment variables,
    # which must never be sent to a URL a user typed.
    if connection.type == Connection.Type.AZURE_OPEN_AI:
        target = str(configs.get("api_base") or "")
        client: openai.OpenAI = openai.AzureOpenAI(
            azure_endpoint=target,
            api_version=str(configs.get("api_version") or ""),
            api_key=api_key or "none",
            organization=str(configs.get("organization") or ""),
            project="",
            timeout=timeout,
            max_retries=0,
        )
    else:
        target = str(configs.get("base_url") or configs.get("api_base") or "https://api.openai.com/v1")
        client = openai.OpenAI(
            base_url=target,
            api_key=api_key or "none",
            organization=str(configs.get("organization") or ""),
            project="",
            timeout=timeout,
            max_retries=0,
        )
    try:
        with client:
            if model:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1
                )
                return ConnectionTestResult(ok=True, message=f"Model '{model}' answered at {target}.")
            count = len(client.models.list().data)
            return ConnectionTestResult(
                ok=True, message=f"Connected to {target}: {count} model(s) available."
            )
    except openai.APITimeoutError:
        message = f"No answer from {target} within {timeout:g} seconds."
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        message = f"Could not connect to {target}: {cause.__class__.__name__}: {cause}"
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
        # The provider's text quotes part of the key, so none of it is shown.
        message = f"{target} refused the API key (HTTP {error.status_code})."
    except openai.APIStatusError as error:
        body = error.body
        detail = str(
            body.get("message") if isinstance(body, dict) and body.get("message") else error.message
        )[:300]
        message = f"{target} answered HTTP {error.status_code}: {detail}"
    except openai.OpenAIError as error:
        message = f"The call to {target} failed: {str(error)[:300]}"
    return ConnectionTestResult(ok=False, message=_scrub(message, secrets))


# --- encryption key rotation ------------------------------------------------------------------------


def encryption_key_new() -> str:
    """A fresh Fernet key."""
    return Fernet.generate_key().decode()


def encryption_key_file_path() -> Path:
    """Where the studio keeps its encryption keys when STUDIO_ENCRYPTION_KEYS is not set."""
    return Path(settings.DATA_DIR) / ENCRYPTION_KEY_FILE


def encryption_keys_from_file() -> bool:
    """True when the configured keys are exactly the ones in the data-dir key file."""
    path = encryption_key_file_path()
    return path.exists() and path.read_text().split() == _encryption_keys()


def encryption_key_file_prepend(*, key: str) -> list[str]:
    """Put `key` first in the data-dir key file (atomically, mode 0600) and return the new key list."""
    path = encryption_key_file_path()
    keys = [key, *[old for old in path.read_text().split() if old != key]]
    Fernet(key.encode())  # refuse a malformed key before touching the file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".encryption.key.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(keys) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return keys


@transaction.atomic
def connection_secrets_reencrypt(*, keys: list[str] | None = None) -> int:
    """Re-encrypt every connection's secrets under the first key (MultiFernet.rotate); returns the row count.

    Idempotent: running it twice leaves every row under the same first key.
    """
    fernet = _multifernet(keys)
    count = 0
    for connection in (
        Connection.objects.select_for_update()
        .exclude(encrypted_secrets="")
        .only("pk", "name", "encrypted_secrets")
    ):
        try:
            token = fernet.rotate(connection.encrypted_secrets.encode()).decode()
        except InvalidToken:
            raise ConnectionSecretsUnreadable(
                f"Connection '{connection.name}' ({connection.pk}) cannot be decrypted with any configured key; "
                "nothing was re-encrypted."
            ) from None
        Connection.objects.filter(pk=connection.pk).update(encrypted_secrets=token)
        count += 1
    return count


# --- flow storage: paths ----------------------------------------------------------------------------

MAX_PATH_CHARS: Final = 255
MAX_PATH_DEPTH: Final = 16
MAX_SEGMENT_BYTES: Final = 255
FLOW_TEMPLATES: Final = ("standard", "chat", "evaluation", "flex", "prompty")
# Bidirectional overrides and isolates make a name display differently from what it is.
_BIDI_CONTROLS: Final = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_DRIVE_RE: Final = re.compile(r"^[A-Za-z]:")


class FlowPathError(ValueError):
    """A file path that is not a plain relative path inside the flow folder; `reason` is a stable code."""

    def __init__(self, message: str, *, reason: str = "invalid", path: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


class FlowConflict(Exception):
    """A save based on an older version than the head: nothing was written; `head` is the newer version."""

    def __init__(self, *, flow: Flow, head: FlowVersion | None, based_on: int | None) -> None:
        head_number = head.number if head else 0
        author = head.author.get_username() if head and head.author else "someone"
        super().__init__(
            f"Flow '{flow.name}' is at version {head_number} (saved by {author}); your change was based on "
            f"version {based_on}. Reload, merge the other change, and save again."
        )
        self.flow = flow
        self.head = head
        self.based_on = based_on


class FlowImportError(ValueError):
    """An archive refused before anything was written; the message names the entry and `reason` the attack."""

    def __init__(self, message: str, *, reason: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.entry = entry


def flow_path_clean(path: str) -> str:
    """Return `path` unchanged if it is a safe relative POSIX path inside a flow folder; else FlowPathError.

    The one check behind every file operation, snapshot and zip entry: refuses NUL and control characters,
    backslashes, absolute and drive paths, empty, '.' and '..' segments (also in look-alike Unicode),
    trailing spaces or dots, over-long names and over-deep paths. It rejects rather than rewrites.
    """
    if not isinstance(path, str):
        raise FlowPathError(f"A file path must be text, not {type(path).__name__}.", reason="invalid")
    shown = repr(path)
    if path == "":
        raise FlowPathError("The file path is empty.", reason="empty_segment", path=path)
    if "\x00" in path:
        raise FlowPathError(f"File path {shown} contains a NUL byte.", reason="nul", path=path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise FlowPathError(f"File path {shown} is not valid UTF-8.", reason="encoding", path=path) from None
    for char in path:
        if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS:
            raise FlowPathError(
                f"File path {shown} contains the control character U+{ord(char):04X}.",
                reason="control",
                path=path,
            )
    if "\\" in path:
        # Name the attack a Windows reader would see: an absolute path, a climb out, or just a bad separator.
        windows = path.replace("\\", "/")
        if windows.startswith("/") or _DRIVE_RE.match(windows):
            raise FlowPathError(
                f"File path {shown} is an absolute Windows path: give a path relative to the flow folder.",
                reason="absolute",
                path=path,
            )
        if ".." in windows.split("/"):
            raise FlowPathError(
                f"File path {shown} climbs out of its folder with '..\\'.", reason="traversal", path=path
            )
        raise FlowPathError(
            f"File path {shown} contains a backslash: use '/' between folders.", reason="backslash", path=path
        )
    if path.startswith("/") or _DRIVE_RE.match(path):
        raise FlowPathError(
            f"File path {shown} is absolute: give a path relative to the flow folder.",
            reason="absolute",
            path=path,
        )
    segments = path.split("/")
    for segment in segments:
        if segment == "":
            raise FlowPathError(
                f"File path {shown} has an empty segment ('//' or a trailing '/').",
                reason="empty_segment",
                path=path,
            )
        folded = unicodedata.normalize("NFKC", segment)
        if segment in (".", "..") or folded in (".", "..") or "/" in folded or "\\" in folded:
            raise FlowPathError(
                f"File path {shown} contains a '{segment}' segment, which would leave its folder.",
                reason="traversal",
                path=path,
            )
        if segment.endswith((" ", ".")):
            raise FlowPathError(
                f"File path {shown}: the name '{segment}' ends with a space or a dot.",
                reason="name",
                path=path,
            )
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise FlowPathError(
                f"File path {shown}: the name '{segment[:40]}…' is longer than {MAX_SEGMENT_BYTES} bytes.",
                reason="too_long",
                path=path,
            )
    if len(segments) > MAX_PATH_DEPTH:
        raise FlowPathError(
            f"File path {shown} is nested deeper than {MAX_PATH_DEPTH} folders.", reason="too_deep", path=path
        )
    if len(path) > MAX_PATH_CHARS:
        raise FlowPathError(
            f"File path {shown} is longer than {MAX_PATH_CHARS} characters.", reason="too_long", path=path
        )
    return path


def _check_tree(paths: Iterable[str]) -> None:
    # A folder tree must be one a filesystem can hold on every OS we export to: no name both a file and a
    # folder, no two names equal but for case (they would overwrite each other on macOS and Windows).
    seen: dict[str, tuple[str, bool]] = {}
    for path in sorted(set(paths)):
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            is_file = depth == len(parts)
            prior = seen.get(sub.casefold())
            if prior is None:
                seen[sub.casefold()] = (sub, is_file)
                continue
            if prior[0] != sub:
                raise FlowPathError(
                    f"'{prior[0]}' and '{sub}' differ only in case.", reason="duplicate", path=path
                )
            if prior[1] or is_file:
                raise FlowPathError(
                    f"'{sub}' is both a file and a folder.", reason="file_is_folder", path=path
                )


def files_from_folder(*, root: Path) -> dict[str, bytes]:
    """Read a flow folder from disk as {path: bytes}; refuses symlinks and special files instead of following."""
    root = Path(root)
    files: dict[str, bytes] = {}
    for current, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _DROPPED_FOLDERS)
        for name in [*dirnames, *filenames]:
            full = Path(current) / name
            relative = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise FlowPathError(
                    f"'{relative}' is a symbolic link; flows hold only regular files.",
                    reason="link",
                    path=relative,
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FlowPathError(
                    f"'{relative}' is a device, pipe or socket, not a regular file.",
                    reason="device",
                    path=relative,
                )
        for name in sorted(filenames):
            relative = (Path(current) / name).relative_to(root).as_posix()
            if name in _DROPPED_FILES:
                continue
            flow_path_clean(relative)
            fd = os.open(Path(current) / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                files[relative] = handle.read()
    return files


# --- flow storage: blobs and snapshots --------------------------------------------------------------

_DROPPED_FOLDERS: Final = frozenset({".promptflow", "__pycache__", "__MACOSX", ".git"})
_DROPPED_FILES: Final = frozenset({".DS_Store", "Thumbs.db"})
# Fixed zip metadata, so the same snapshot always exports to the same bytes.
_ZIP_DATE: Final = (1980, 1, 1, 0, 0, 0)
_ZIP_FILE_MODE: Final = 0o100644


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_json(manifest: Mapping[str, str]) -> bytes:
    """The canonical JSON of a manifest (sorted keys, no spaces, UTF-8): its sha256 names the snapshot."""
    return json.dumps(dict(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _blobs_store(blobs: Mapping[str, bytes]) -> None:
    # Only contents the database lacks are sent; a concurrent writer of the same content is harmless because
    # the primary key is the content hash (ignore_conflicts).
    wanted = list(blobs)
    existing: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        existing.update(Blob.objects.filter(sha256__in=chunk).values_list("sha256", flat=True))
    missing = [
        Blob(sha256=sha, size=len(data), data=data) for sha, data in blobs.items() if sha not in existing
    ]
    if missing:
        Blob.objects.bulk_create(missing, ignore_conflicts=True, batch_size=100)


def _snapshot_store(manifest: Mapping[str, str], sizes: Mapping[str, int]) -> Snapshot:
    ordered = dict(sorted(manifest.items()))
    sha = _sha256(manifest_json(ordered))
    snapshot, _ = Snapshot.objects.get_or_create(
        sha256=sha,
        defaults={
            "manifest": ordered,
            "total_size": sum(sizes[blob] for blob in ordered.values()),
            "file_count": len(ordered),
        },
    )
    return snapshot


def _clean_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    clean: dict[str, bytes] = {}
    for path, data in files.items():
        flow_path_clean(path)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"File '{path}': content must be bytes, not {type(data).__name__}.")
        clean[path] = bytes(data)
    _check_tree(clean)
    return clean


@transaction.atomic
def snapshot_from_files(*, files: Mapping[str, bytes]) -> Snapshot:
    """Store a folder's files as deduplicated blobs plus one manifest; raises FlowPathError on a bad path.

    Idempotent: the same files always give the same Snapshot row and add no blob twice.
    """
    clean = _clean_files(files)
    blobs = {_sha256(data): data for data in clean.values()}
    manifest = {path: _sha256(data) for path, data in clean.items()}
    existing = Snapshot.objects.filter(sha256=_sha256(manifest_json(dict(sorted(manifest.items()))))).first()
    if existing is not None:
        return existing
    _blobs_store(blobs)
    return _snapshot_store(manifest, {sha: len(data) for sha, data in blobs.items()})


def _snapshot_from_manifest(manifest: Mapping[str, str], new_blobs: Mapping[str, bytes]) -> Snapshot:
    # For edits of a stored snapshot: unchanged files keep their blob, only new contents are stored.
    _check_tree(manifest)
    _blobs_store(new_blobs)
    sizes = dict(Blob.objects.filter(sha256__in=set(manifest.values())).values_list("sha256", "size"))
    return _snapshot_store(manifest, sizes)


def snapshot_files(*, snapshot: Snapshot) -> dict[str, bytes]:
    """Every file of a snapshot as {path: bytes}, read from the database in one query."""
    wanted = set(snapshot.manifest.values())
    data = dict(Blob.objects.filter(sha256__in=wanted).values_list("sha256", "data"))
    return {path: bytes(data[sha]) for path, sha in snapshot.manifest.items()}


def snapshot_file_read(*, snapshot: Snapshot, path: str) -> bytes:
    """One file of a snapshot; FlowPathError (reason 'not_found') when the snapshot has no such file."""
    sha = snapshot.manifest.get(flow_path_clean(path))
    if sha is None:
        raise FlowPathError(f"There is no file '{path}' in this version.", reason="not_found", path=path)
    return bytes(Blob.objects.values_list("data", flat=True).get(sha256=sha))


def snapshot_materialize(*, snapshot_sha: str, root: Path | None = None) -> Path:
    """A read-only folder holding the snapshot's files, cached by hash under <DATA_DIR>/snapshots/<sha>.

    Built in a temporary sibling folder and renamed into place, so a concurrent caller sees either no
    folder or a complete one; reads blobs from the database only, so any host can build it.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", snapshot_sha or ""):
        raise ValueError(f"'{snapshot_sha}' is not a snapshot hash.")
    base = Path(root) if root is not None else Path(settings.DATA_DIR) / "snapshots"
    target = base / snapshot_sha
    if target.is_dir():
        return target
    snapshot = Snapshot.objects.get(sha256=snapshot_sha)
    base.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=base, prefix=f".{snapshot_sha[:12]}-"))
    try:
        for path, data in snapshot_files(snapshot=snapshot).items():
            flow_path_clean(path)
            file = building / path
            file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(file, 0o444)
        for folder in sorted((p for p in building.rglob("*") if p.is_dir()), reverse=True):
            os.chmod(folder, 0o555)
        os.chmod(building, 0o555)
        try:
            os.rename(building, target)
        except OSError:
            if not target.is_dir():
                raise
            _remove_tree(building)  # another caller finished first: theirs is identical
    except BaseException:
        if building.exists():
            _remove_tree(building)
        raise
    return target


def _remove_tree(path: Path) -> None:
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o755)
    shutil.rmtree(path)


def snapshot_zip(*, snapshot: Snapshot) -> bytes:
    """The snapshot as a zip: sorted entries, fixed times and permissions, so the bytes never vary."""
    buffer = io.BytesIO()
    files = snapshot_files(snapshot=snapshot)
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = _ZIP_FILE_MODE << 16
            archive.writestr(info, files[path], compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    return buffer.getvalue()


# --- flow storage: zip import -----------------------------------------------------------------------

# Small files may compress far beyond any ratio harmlessly (a file of blank lines); the ratio limit only
# bites once an entry, or the whole archive, expands past this many bytes.
RATIO_FLOOR_BYTES: Final = 1024 * 1024
_ZIP_STREAM_CHUNK: Final = 64 * 1024
_FLOW_FILE_NAMES: Final = ("flow.dag.yaml", "flow.flex.yaml")
_PATH_REASONS_IN_ZIPS: Final = {"file_is_folder": "duplicate"}


def zip_limits() -> tuple[int, int, int]:
    """(max uncompressed bytes, max entries, max compression ratio) from settings."""
    return (
        int(getattr(settings, "STUDIO_ZIP_MAX_BYTES", 50 * 1024 * 1024)),
        int(getattr(settings, "STUDIO_ZIP_MAX_FILES", 5000)),
        int(getattr(settings, "STUDIO_ZIP_MAX_RATIO", 100)),
    )


def _refuse(entry: str | None, reason: str, why: str) -> FlowImportError:
    where = f"entry {entry!r}: " if entry is not None else ""
    return FlowImportError(
        f"Refused the archive, nothing was imported: {where}{why}", reason=reason, entry=entry
    )


def _zip_entry_check(info: zipfile.ZipInfo, offsets: dict[int, str]) -> str | None:
    # Returns the entry's folder-relative path, or None for a folder entry; raises on anything unsafe.
    name = info.orig_filename
    if info.flag_bits & 0x1:
        raise _refuse(name, "encrypted", "it is encrypted; export the flow without a password.")
    if not info.flag_bits & 0x800 and any(ord(char) > 127 for char in name):
        raise _refuse(
            name,
            "encoding",
            "its name is not marked as UTF-8 (zip flag bit 11), so its characters are ambiguous.",
        )
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK or (info.create_system == 0 and info.external_attr & 0x400):
        raise _refuse(name, "link", "it is a symbolic link; flows hold only regular files.")
    if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        raise _refuse(name, "device", "it is a device, pipe or socket, not a regular file.")
    if info.header_offset in offsets:
        raise _refuse(
            name,
            "link",
            f"it shares its data with entry {offsets[info.header_offset]!r} (a hard link or overlapping entries).",
        )
    offsets[info.header_offset] = name
    is_folder = name.endswith("/") or kind == stat.S_IFDIR
    path = name[:-1] if name.endswith("/") else name
    try:
        flow_path_clean(path)
    except FlowPathError as error:
        raise _refuse(name, _PATH_REASONS_IN_ZIPS.get(error.reason, error.reason), str(error)) from None
    return None if is_folder else path


def _zip_entry_read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, total: int) -> bytes:
    max_bytes, _, max_ratio = zip_limits()
    name = info.orig_filename
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as handle:
            # Counted here as well as from the headers: this is what actually gets decompressed.
            while chunk := handle.read(_ZIP_STREAM_CHUNK):
                size += len(chunk)
                if total + size > max_bytes:
                    raise _refuse(
                        name, "too_large", f"the archive expands past the limit of {max_bytes:,} bytes."
                    )
                if size > RATIO_FLOOR_BYTES and size > max_ratio * max(info.compress_size, 1):
                    raise _refuse(
                        name,
                        "ratio",
                        f"it expands more than {max_ratio} times its compressed size "
                        f"({info.compress_size:,} bytes), the mark of a zip bomb.",
                    )
                chunks.append(chunk)
    except FlowImportError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as error:
        raise _refuse(name, "corrupt", f"it cannot be read ({error}).") from None
    return b"".join(chunks)


def _unwrap(files: dict[str, bytes]) -> tuple[dict[str, bytes], str | None]:
    # `zip -r flow.zip my_flow/` puts everything under one folder: strip it when it holds the flow file.
    tops = {path.split("/", 1)[0] for path in files}
    if len(tops) != 1 or any("/" not in path for path in files):
        return files, None
    top = tops.pop()
    inner = {path[len(top) + 1 :]: data for path, data in files.items()}
    if not any(name in inner for name in _FLOW_FILE_NAMES) and not any(
        "/" not in path and path.endswith(".prompty") for path in inner
    ):
        return files, None
    return inner, top


def _dropped(path: str) -> bool:
    parts = path.split("/")
    return any(part in _DROPPED_FOLDERS for part in parts[:-1]) or parts[-1] in _DROPPED_FILES


def zip_read_checked(*, data: bytes) -> tuple[dict[str, bytes], str | None]:
    """Read an uploaded zip into {path: bytes} and the unwrapped top folder's name, or raise FlowImportError.

    Every entry is inspected before any content is read, and sizes are counted while decompressing (headers
    are not trusted); nothing is written anywhere. prompt flow's `.promptflow/` and `__pycache__/` are dropped.
    """
    max_bytes, max_files, _ = zip_limits()
    if len(data) > max_bytes:
        raise _refuse(None, "too_large", f"the upload is larger than the limit of {max_bytes:,} bytes.")
    if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise _refuse(None, "corrupt", "it is not a zip archive (it does not start with a zip header).")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError, ValueError, OSError) as error:
        raise _refuse(None, "corrupt", f"it is not a readable zip archive ({error}).") from None
    if len(infos) > max_files:
        raise _refuse(None, "too_many_files", f"it has {len(infos):,} entries; the limit is {max_files:,}.")
    offsets: dict[int, str] = {}
    names: set[str] = set()
    wanted: list[tuple[zipfile.ZipInfo, str]] = []
    folders: set[str] = set()
    for info in infos:
        if info.orig_filename in names:
            raise _refuse(info.orig_filename, "duplicate", "the archive holds two entries with this name.")
        names.add(info.orig_filename)
        path = _zip_entry_check(info, offsets)
        if path is None:
            folders.add(info.orig_filename.rstrip("/"))
        else:
            wanted.append((info, path))
    paths = [path for _, path in wanted]
    try:
        _check_tree(paths)
    except FlowPathError as error:
        raise _refuse(error.path, "duplicate", str(error)) from None
    lowered = {path.casefold() for path in paths}
    for folder in folders:
        if folder.casefold() in lowered:
            raise _refuse(folder + "/", "duplicate", "a folder and a file have this name.")
    declared = sum(info.file_size for info, _ in wanted)
    if declared > max_bytes:
        raise _refuse(None, "too_large", f"it declares {declared:,} bytes; the limit is {max_bytes:,}.")
    files: dict[str, bytes] = {}
    total = 0
    for info, path in wanted:
        content = _zip_entry_read(archive, info, total=total)
        total += len(content)
        if not _dropped(path):
            files[path] = content
    _, _, max_ratio = zip_limits()
    if total > RATIO_FLOOR_BYTES and total > max_ratio * len(data):
        raise _refuse(
            None, "ratio", f"it expands more than {max_ratio} times its size, the mark of a zip bomb."
        )
    return _unwrap(files)


# --- flows ------------------------------------------------------------------------------------------


def _flow_kind(paths: Iterable[str]) -> str:
    paths = set(paths)
    if "flow.dag.yaml" in paths:
        return Flow.Kind.DAG
    if "flow.flex.yaml" in paths:
        return Flow.Kind.FLEX
    if len([p for p in paths if "/" not in p and p.endswith(".prompty")]) == 1:
        return Flow.Kind.PROMPTY
    return Flow.Kind.UNKNOWN


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "A flow needs a name."})
    if len(name) > 200:
        raise ValidationError({"name": f"The flow name is {len(name)} characters long; the limit is 200."})
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise ValidationError({"name": "The flow name contains a control character."})
    return name


def _name_taken(owner: Any, name: str, *, exclude: int | None = None) -> bool:
    return Flow.objects.filter(owner=owner, name=name, deleted_at__isnull=True).exclude(pk=exclude).exists()


def _free_name(owner: Any, name: str) -> str:
    candidate, counter = name, 2
    while _name_taken(owner, candidate):
        candidate = f"{name} ({counter})"
        counter += 1
    return candidate


def _require_role(user: Any, flow: Flow, roles: tuple[str, ...], action: str) -> None:
    from flows_app.selectors import flow_role_for

    role = flow_role_for(user, flow)
    if role not in roles:
        raise PermissionDenied(
            f"You cannot {action} flow '{flow.name}': "
            + ("it is shared with you read-only." if role else "it is not shared with you.")
        )
    if flow.deleted_at is not None and action != "restore":
        raise ValidationError({"flow": f"Flow '{flow.name}' is in the trash: restore it first."})


def _locked(flow: Flow) -> Flow:
    return Flow.objects.select_for_update().select_related("head", "head__author").get(pk=flow.pk)


def _add_version(
    *, flow: Flow, user: Any, snapshot: Snapshot, message: str, based_on: FlowVersion | None
) -> FlowVersion:
    # The caller holds the flow's row lock; the unique (flow, number) constraint backs it up.
    number = (flow.head.number if flow.head else 0) + 1
    try:
        with transaction.atomic():
            version = FlowVersion.objects.create(
                flow=flow, number=number, snapshot=snapshot, author=user, message=message, based_on=based_on
            )
    except IntegrityError:
        raise FlowConflict(flow=flow, head=Flow.objects.get(pk=flow.pk).head, based_on=number - 1) from None
    flow.head = version
    flow.kind = _flow_kind(snapshot.manifest)
    flow.save(update_fields=["head", "kind", "updated_at"])
    return version


@transaction.atomic
def flow_create(
    *,
    owner: AbstractBaseUser,
    name: str,
    files: Mapping[str, bytes],
    message: str = "",
    team: Team | None = None,
    description: str = "",
) -> Flow:
    """Create a flow owned by `owner` with version 1 holding `files`; the name is unique among live flows."""
    name = _clean_name(name)
    _check_team(owner=owner, team=team)
    if _name_taken(owner, name):
        raise ValidationError({"name": f"You already have a flow named '{name}'."})
    snapshot = snapshot_from_files(files=files)
    try:
        with transaction.atomic():
            flow = Flow.objects.create(owner=owner, name=name, description=description, team=team)
    except IntegrityError:
        raise ValidationError({"name": f"You already have a flow named '{name}'."}) from None
    _add_version(
        flow=flow, user=owner, snapshot=snapshot, message=message or "Create the flow", based_on=None
    )
    return flow


def template_files(*, template: str) -> dict[str, bytes]:
    """The files of one `flowstudio flow init` template, read from flowengine/templates_init/."""
    import flowengine

    if template not in FLOW_TEMPLATES:
        raise ValidationError(
            {"template": f"Unknown template '{template}': use one of {', '.join(FLOW_TEMPLATES)}."}
        )
    return files_from_folder(root=Path(flowengine.__file__).parent / "templates_init" / template)


def flow_create_from_template(
    *, owner: AbstractBaseUser, name: str, template: str, team: Team | None = None
) -> Flow:
    """Create a flow from one of the templates: standard, chat, evaluation, flex or prompty."""
    return flow_create(
        owner=owner,
        name=name,
        files=template_files(template=template),
        message=f"Create from the {template} template",
        team=team,
    )


def _based_on_version(flow: Flow, based_on: int | None) -> FlowVersion | None:
    if based_on is None:
        return None
    return FlowVersion.objects.filter(flow=flow, number=based_on).first()


@transaction.atomic
def flow_save(
    *, flow: Flow, user: AbstractBaseUser, files: Mapping[str, bytes], based_on: int, message: str = ""
) -> FlowVersion:
    """Save the whole folder as a new version; FlowConflict (nothing written) when `based_on` is not the head."""
    _require_role(user, flow, ("owner", "editor"), "save")
    flow = _locked(flow)
    head_number = flow.head.number if flow.head else 0
    if based_on != head_number:
        raise FlowConflict(flow=flow, head=flow.head, based_on=based_on)
    snapshot = snapshot_from_files(files=files)
    return _add_version(
        flow=flow,
        user=user,
        snapshot=snapshot,
        message=message or "Save",
        based_on=_based_on_version(flow, based_on),
    )


def _subtree(manifest: Mapping[str, str], path: str) -> dict[str, str]:
    prefix = path + "/"
    return {key: sha for key, sha in manifest.items() if key == path or key.startswith(prefix)}


@transaction.atomic
def _edit(
    *,
    flow: Flow,
    user: AbstractBaseUser,
    based_on: int,
    touched: Iterable[str],
    message: str,
    change: Callable[[dict[str, str]], dict[str, bytes]],
) -> FlowVersion:
    # A file operation based on an older version still applies when none of the paths it touches changed
    # since then (two people editing different files); otherwise FlowConflict, and nothing is written.
    _require_role(user, flow, ("owner", "editor"), "change")
    flow = _locked(flow)
    head = flow.head
    manifest: dict[str, str] = dict(head.snapshot.manifest) if head else {}
    base = _based_on_version(flow, based_on)
    if head is None or base is None:
        raise FlowConflict(flow=flow, head=head, based_on=based_on)
    if base.pk != head.pk:
        old = base.snapshot.manifest
        if any(_subtree(old, path) != _subtree(manifest, path) for path in touched):
            raise FlowConflict(flow=flow, head=head, based_on=based_on)
    new_blobs = change(manifest)
    snapshot = _snapshot_from_manifest(manifest, new_blobs)
    return _add_version(flow=flow, user=user, snapshot=snapshot, message=message, based_on=base)


def flow_file_save(
    *, flow: Flow, user: AbstractBaseUser, path: str, content: bytes, based_on: int, message: str = ""
) -> FlowVersion:
    """Save one file (new or changed) as a new version; FlowConflict if someone changed it since `based_on`."""
    flow_path_clean(path)

    def change(manifest: dict[str, str]) -> dict[str, bytes]:
        if _subtree(manifest, path).keys() - {path}:
            raise FlowPathError(
                f"'{path}' is a folder; give a file path.", reason="file_is_folder", path=path
            )
        sha = _sha256(bytes(content))
        manifest[path] = sha
        return {sha: bytes(content)}

    return _edit(
        flow=flow,
        user=user,
        based_on=based_on,
        touched=[path],
        message=message or f"Save {path}",
        change=change,
    )


def flow_files_upload(
    *,
    flow: Flow,
    user: AbstractBaseUser,
    files: Mapping[str, bytes],
    based_on: int,
    folder: str = "",
    message: str = "",
) -> FlowVersion:
    """Add or replace several files (and folders, by their paths) under `folder` as one new version."""
    prefix = flow_path_clean(folder) + "/" if folder else ""
    clean = _clean_files({prefix + path: data for path, data in files.items()})
    if not clean:
        raise ValidationError({"files": "Choose at least one file to upload."})

    def change(manifest: dict[str, str]) -> dict[str, bytes]:
        blobs: dict[str, bytes] = {}
        for path, data in clean.items():
            if _subtree(manifest, path).keys() - {path}:
                raise FlowPathError(
                    f"'{path}' is a folder; it cannot become a file.", reason="file_is_folder", path=path
                )
            manifest[path] = _sha256(data)
            blobs[manifest[path]] = data
        return blobs

    names = ", ".join(sorted(clean)[:3]) + (" …" if len(clean) > 3 else "")
    return _edit(
        flow=flow,
        user=user,
        based_on=based_on,
        touched=list(clean),
        message=message or f"Upload {names}",
        change=change,
    )


def flow_file_rename(
    *, flow: Flow, user: AbstractBaseUser, path: str, new_path: str, based_on: int, message: str = ""
) -> FlowVersion:
    """Rename or move a file or a whole folder as a new version."""
    flow_path_clean(path)
    flow_path_clean(new_path)
    if new_path == path:
        raise FlowPathError(f"'{path}' already has that name.", reason="exists", path=new_path)
    if new_path.startswith(path + "/"):
        raise FlowPathError(
            f"Cannot move folder '{path}' into itself.", reason="file_is_folder", path=new_path
        )

    def change(manifest: dict[str, str]) -> dict[str, bytes]:
        moving = _subtree(manifest, path)
        if not moving:
            raise FlowPathError(f"There is no file or folder '{path}'.", reason="not_found", path=path)
        if _subtree(manifest, new_path):
            raise FlowPathError(f"'{new_path}' already exists.", reason="exists", path=new_path)
        for old, sha in moving.items():
            del manifest[old]
            moved = new_path + old[len(path) :]
            manifest[flow_path_clean(moved)] = sha
        return {}

    return _edit(
        flow=flow,
        user=user,
        based_on=based_on,
        touched=[path, new_path],
        message=message or f"Rename {path} to {new_path}",
        change=change,
    )


def flow_file_delete(
    *, flow: Flow, user: AbstractBaseUser, path: str, based_on: int, message: str = ""
) -> FlowVersion:
    """Delete a file or a whole folder as a new version."""
    flow_path_clean(path)

    def change(manifest: dict[str, str]) -> dict[str, bytes]:
        doomed = _subtree(manifest, path)
        if not doomed:
            raise FlowPathError(f"There is no file or folder '{path}'.", reason="not_found", path=path)
        for key in doomed:
            del manifest[key]
        return {}

    return _edit(
        flow=flow,
        user=user,
        based_on=based_on,
        touched=[path],
        message=message or f"Delete {path}",
        change=change,
    )


@transaction.atomic
def flow_restore_version(
    *, flow: Flow, user: AbstractBaseUser, number: int, based_on: int | None = None, message: str = ""
) -> FlowVersion:
    """Make a new version whose files equal version `number`'s; history before it is kept."""
    _require_role(user, flow, ("owner", "editor"), "restore a version of")
    flow = _locked(flow)
    old = FlowVersion.objects.select_related("snapshot").filter(flow=flow, number=number).first()
    if old is None:
        raise ValidationError({"number": f"Flow '{flow.name}' has no version {number}."})
    if based_on is not None and based_on != (flow.head.number if flow.head else 0):
        raise FlowConflict(flow=flow, head=flow.head, based_on=based_on)
    return _add_version(
        flow=flow,
        user=user,
        snapshot=old.snapshot,
        message=message or f"Restore version {number}",
        based_on=flow.head,
    )


def flow_import_zip(
    *,
    owner: AbstractBaseUser,
    data: bytes,
    name: str | None = None,
    into: Flow | None = None,
    based_on: int | None = None,
    message: str = "",
    team: Team | None = None,
) -> FlowVersion:
    """Import a zip as a new flow (`into` None) or as a new version of `into`; hostile archives are refused
    with FlowImportError before any row is written.

    For a new version, `based_on` None means "on top of the current head" (a push); a number is checked like
    any save.
    """
    if into is not None:
        _require_role(owner, into, ("owner", "editor"), "import into")
    # The archive is read and checked before the transaction: decompressing must not hold the write lock.
    files, folder = zip_read_checked(data=data)
    if not files:
        raise FlowImportError("Refused the archive: it holds no files.", reason="empty")
    if into is None:
        with transaction.atomic():
            flow_name = (
                _clean_name(name) if name else _free_name(owner, _clean_name(folder or "Imported flow"))
            )
            flow = flow_create(
                owner=owner, name=flow_name, files=files, message=message or "Import from a zip", team=team
            )
        assert flow.head is not None
        return flow.head
    with transaction.atomic():
        flow = _locked(into)
        head_number = flow.head.number if flow.head else 0
        if based_on is not None and based_on != head_number:
            raise FlowConflict(flow=flow, head=flow.head, based_on=based_on)
        snapshot = snapshot_from_files(files=files)
        return _add_version(
            flow=flow,
            user=owner,
            snapshot=snapshot,
            message=message or "Import from a zip",
            based_on=flow.head,
        )


@transaction.atomic
def flow_clone(
    *, flow: Flow, user: AbstractBaseUser, name: str | None = None, number: int | None = None
) -> Flow:
    """Copy a flow the user can see (its head, or version `number`) into a new flow the user owns.

    No file is copied: the new version points at the same snapshot.
    """
    _require_role(user, flow, ("owner", "editor", "viewer"), "clone")
    source = flow.head if number is None else FlowVersion.objects.filter(flow=flow, number=number).first()
    if source is None:
        raise ValidationError({"number": f"Flow '{flow.name}' has no version {number}."})
    new_name = _clean_name(name) if name else _free_name(user, f"{flow.name} (copy)")
    if _name_taken(user, new_name):
        raise ValidationError({"name": f"You already have a flow named '{new_name}'."})
    clone = Flow.objects.create(owner=user, name=new_name, description=flow.description)
    _add_version(
        flow=clone,
        user=user,
        snapshot=source.snapshot,
        message=f"Clone of '{flow.name}' version {source.number}",
        based_on=None,
    )
    return clone


def flow_update(
    *, flow: Flow, user: AbstractBaseUser, name: str | None = None, description: str | None = None
) -> Flow:
    """Rename a flow or change its description (owner or editor)."""
    _require_role(user, flow, ("owner", "editor"), "rename")
    if name is not None:
        name = _clean_name(name)
        if _name_taken(flow.owner, name, exclude=flow.pk):
            raise ValidationError({"name": f"There is already a flow named '{name}'."})
        flow.name = name
    if description is not None:
        flow.description = description
    try:
        with transaction.atomic():
            flow.save(update_fields=["name", "description", "updated_at"])
    except IntegrityError:
        raise ValidationError({"name": f"There is already a flow named '{name}'."}) from None
    return flow


def flow_delete(*, flow: Flow, user: AbstractBaseUser) -> Flow:
    """Move a flow to its owner's trash (owner only); idempotent."""
    _require_role(user, flow, ("owner",), "delete")
    if flow.deleted_at is None:
        flow.deleted_at = timezone.now()
        flow.save(update_fields=["deleted_at", "updated_at"])
    return flow


@transaction.atomic
def flow_restore(*, flow: Flow, user: AbstractBaseUser) -> Flow:
    """Bring a flow back from the trash; renamed '<name> (restored)' if a live flow took its name meanwhile."""
    _require_role(user, flow, ("owner",), "restore")
    if flow.deleted_at is None:
        return flow
    if _name_taken(flow.owner, flow.name, exclude=flow.pk):
        flow.name = _free_name(flow.owner, f"{flow.name} (restored)")
    flow.deleted_at = None
    flow.save(update_fields=["name", "deleted_at", "updated_at"])
    return flow


def flow_purge(*, flow: Flow, user: AbstractBaseUser) -> None:
    """Delete a trashed flow for good (owner only); its snapshots stay for the runs that used them."""
    _require_role(user, flow, ("owner",), "restore")
    if flow.deleted_at is None:
        raise ValidationError({"flow": f"Flow '{flow.name}' is not in the trash: delete it first."})
    Flow.objects.filter(pk=flow.pk).update(head=None)
    Flow.objects.filter(pk=flow.pk).delete()


def flow_share(
    *,
    flow: Flow,
    by: AbstractBaseUser,
    user: AbstractBaseUser | None = None,
    team: Team | None = None,
    role: str = FlowShare.Role.VIEWER,
) -> FlowShare:
    """Share a flow with one user or one team as viewer or editor (owner only); sharing again changes the role."""
    _require_role(by, flow, ("owner",), "share")
    if (user is None) == (team is None):
        raise ValidationError({"user": "Share with exactly one user or one team."})
    if role not in FlowShare.Role.values:
        raise ValidationError({"role": f"Unknown role '{role}': use viewer or editor."})
    if user is not None and user.pk == flow.owner_id:
        raise ValidationError({"user": "The owner already has every right on the flow."})
    if team is not None:
        _check_team(owner=by, team=team)
    lookup = {"user": user} if user is not None else {"team": team}
    share, _ = FlowShare.objects.update_or_create(flow=flow, **lookup, defaults={"role": role})
    return share


def flow_unshare(
    *, flow: Flow, by: AbstractBaseUser, user: AbstractBaseUser | None = None, team: Team | None = None
) -> None:
    """Stop sharing a flow with a user or a team (owner only); idempotent."""
    _require_role(by, flow, ("owner",), "share")
    if user is not None:
        FlowShare.objects.filter(flow=flow, user=user).delete()
    if team is not None:
        FlowShare.objects.filter(flow=flow, team=team).delete()


# --- diffs ------------------------------------------------------------------------------------------

_NODE_FIELDS_SKIPPED: Final = frozenset({"line"})
DAG_FILE_NAME: Final = "flow.dag.yaml"


def _as_snapshot(item: FlowVersion | Snapshot) -> Snapshot:
    return item.snapshot if isinstance(item, FlowVersion) else item


def _text(data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _dag_nodes(snapshot: Snapshot) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    # Snapshots never change, so a parse is cached by hash: a history page diffing the same versions
    # again (or the next pair sharing one side) parses each flow file once per process.
    return _dag_nodes_cached(snapshot.sha256)


@functools.lru_cache(maxsize=64)
def _dag_nodes_cached(snapshot_sha: str) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    from flowengine import FlowValidationError, load_flow

    try:
        flow = load_flow(snapshot_materialize(snapshot_sha=snapshot_sha))
    except FlowValidationError as error:
        return None, str(error)
    nodes: dict[str, dict[str, Any]] = {}
    for node in flow.nodes:
        fields = {
            field.name: getattr(node, field.name)
            for field in dataclasses.fields(node)
            if field.name not in _NODE_FIELDS_SKIPPED
        }
        fields["variants"] = flow.node_variants.get(node.name)
        nodes[node.name] = fields
    return nodes, None


def flow_version_diff(*, a: FlowVersion | Snapshot, b: FlowVersion | Snapshot) -> dict[str, Any]:
    """What changed from `a` to `b`: per-file unified diffs and the DAG's nodes added, removed and changed.

    {"files": [{path, status: added|removed|changed, unified_diff, binary}],
     "dag": {"nodes_added", "nodes_removed", "nodes_changed": [{name, fields}], "error"}}
    """
    old, new = _as_snapshot(a), _as_snapshot(b)
    old_manifest, new_manifest = old.manifest, new.manifest
    changed_paths = sorted(
        path
        for path in old_manifest.keys() | new_manifest.keys()
        if old_manifest.get(path) != new_manifest.get(path)
    )
    wanted = {old_manifest.get(p) for p in changed_paths} | {new_manifest.get(p) for p in changed_paths}
    blobs = dict(Blob.objects.filter(sha256__in=wanted - {None}).values_list("sha256", "data"))
    files = []
    for path in changed_paths:
        before = bytes(blobs[old_manifest[path]]) if path in old_manifest else b""
        after = bytes(blobs[new_manifest[path]]) if path in new_manifest else b""
        status = "added" if path not in old_manifest else "removed" if path not in new_manifest else "changed"
        before_text, after_text = _text(before), _text(after)
        binary = before_text is None or after_text is None
        diff = ""
        if not binary:
            diff = "".join(
                difflib.unified_diff(
                    before_text.splitlines(keepends=True),
                    after_text.splitlines(keepends=True),
                    fromfile=f"a/{path}" if status != "added" else "/dev/null",
                    tofile=f"b/{path}" if status != "removed" else "/dev/null",
                )
            )
        files.append({"path": path, "status": status, "unified_diff": diff, "binary": binary})
    dag: dict[str, Any] = {"nodes_added": [], "nodes_removed": [], "nodes_changed": [], "error": None}
    # Nodes come from flow.dag.yaml alone: when its content is the same on both sides, so are they.
    if old_manifest.get(DAG_FILE_NAME) != new_manifest.get(DAG_FILE_NAME):
        old_nodes, old_error = _dag_nodes(old)
        new_nodes, new_error = _dag_nodes(new)
        if old_nodes is None or new_nodes is None:
            dag["error"] = old_error or new_error
        else:
            dag["nodes_added"] = [name for name in new_nodes if name not in old_nodes]
            dag["nodes_removed"] = [name for name in old_nodes if name not in new_nodes]
            dag["nodes_changed"] = [
                {
                    "name": name,
                    "fields": [k for k in new_nodes[name] if new_nodes[name][k] != old_nodes[name].get(k)],
                }
                for name in new_nodes
                if name in old_nodes and new_nodes[name] != old_nodes[name]
            ]
    return {"files": files, "dag": dag}


# --- single tests (the test pane of the authoring page) ----------------------------------------------
# flowtest_start checks a test request and records it; FlowTestSession runs it in a runner process that
# flows_app.consumers relays straight to the browser; flowtest_finish records how it ended.

FLOWTEST_KEEP: Final = 50
# A Running row older than this is a test whose server died: it no longer blocks the next test.
FLOWTEST_STALE_SECONDS: Final = 900
# How long a cancelled runner may take to exit on its own before its process group is killed.
FLOWTEST_KILL_GRACE_SECONDS: Final = 0.25
# A runner kept warm between the turns of a chat is closed after this long without a test.
FLOWTEST_IDLE_SECONDS: Final = 300.0


class FlowTestBusy(Exception):
    """A test of this flow by this user is still running."""


class FlowTestRequestError(ValueError):
    """A test request the flow cannot run: unknown variant or node, inputs that are not an object."""


@dataclass(frozen=True)
class FlowTestPlan:
    """What one test runs: the materialised folder, the user's decrypted connections (runner only), options."""

    flow_dir: Path
    snapshot_sha: str
    connections: Mapping[str, EngineConnection]
    variant: str | None
    node: str | None
    init: Mapping[str, Any]
    environment_variables: Mapping[str, str]

    def runner_key(self) -> str:
        """Tests with the same key can share a warm runner: same files, variant, init and connections."""
        connections = {
            name: {"type": c.type, "configs": dict(c.configs), "secrets": dict(c.secrets)}
            for name, c in sorted(self.connections.items())
        }
        text = json.dumps(
            [self.snapshot_sha, self.variant, self.init, self.environment_variables, connections],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flowtest_connection_names(flow: Any, init: Mapping[str, Any]) -> set[str]:
    """The connection names a flow refers to; "*" when its code may name any (flex, prompty)."""
    names: set[str] = set()
    variants = [v.node for nv in flow.node_variants.values() for v in nv.variants.values()]
    for node in [*flow.nodes, *variants]:
        if node.connection:
            names.add(node.connection)
        for value in node.inputs.values():
            if isinstance(value, str) and not value.startswith("${"):
                names.add(value)
    names.update(value for value in init.values() if isinstance(value, str))
    if flow.kind != "dag":
        names.add("*")
    return names


def _flowtest_check(flow: Any, *, variant: str | None, node: str | None, inputs: Any, init: Any) -> None:
    if not isinstance(inputs, Mapping):
        raise FlowTestRequestError("The test inputs must be a JSON object of input name to value.")
    if not isinstance(init, Mapping):
        raise FlowTestRequestError("The init values must be a JSON object of parameter name to value.")
    if variant:
        from flowengine.model import parse_variant

        try:
            node_name, variant_id = parse_variant(variant)
        except Exception:  # noqa: BLE001 - any unparsable text gets the same message
            raise FlowTestRequestError(
                f"Variant '{variant}' is not of the form '${{node.variant_id}}'."
            ) from None
        if variant_id not in flow.variant_ids(node_name):
            raise FlowTestRequestError(f"Node '{node_name}' has no variant '{variant_id}' in {flow.file}.")
    if node and (flow.kind != "dag" or flow.node(node) is None):
        raise FlowTestRequestError(f"{flow.file} has no node '{node}' to test on its own.")


def flowtest_start(
    *,
    user: AbstractBaseUser,
    flow_id: int,
    inputs: Mapping[str, Any],
    variant: str | None = None,
    node: str | None = None,
    init: Mapping[str, Any] | None = None,
) -> tuple[FlowTest, FlowTestPlan]:
    """Record a Running test of the flow's saved head and prepare its runner; anyone who can view may test.

    Raises Http404 for a flow the user may not see, FlowTestBusy while the user's previous test of this
    flow still runs, FlowTestRequestError for a request the flow cannot run. Keeps the newest
    FLOWTEST_KEEP tests of the flow.
    """
    from flowengine import FlowValidationError, load_flow
    from flows_app.selectors import connection_list_for, connection_map_for_runner, flow_version_get_for

    version = flow_version_get_for(user, flow_id)
    folder = snapshot_materialize(snapshot_sha=version.snapshot_id)
    try:
        engine_flow = load_flow(folder)
    except FlowValidationError as error:
        first = error.problems[0] if error.problems else error
        raise FlowTestRequestError(f"The flow does not load: {first}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise FlowTestRequestError("The flow has no flow file to test.") from None
    init = {} if init is None else init
    _flowtest_check(engine_flow, variant=variant, node=node, inputs=inputs, init=init)
    names = _flowtest_connection_names(engine_flow, init)
    if "*" in names:
        names = set(connection_list_for(user).values_list("name", flat=True))
    found = connection_map_for_runner(user, names=names)
    plan = FlowTestPlan(
        flow_dir=Path(folder),
        snapshot_sha=version.snapshot_id,
        connections={name: connection_secrets_for_runner(conn) for name, conn in found.items()},
        variant=variant or None,
        node=node or None,
        init=dict(init),
        environment_variables={},
    )
    with transaction.atomic():
        import datetime

        fresh = timezone.now() - datetime.timedelta(seconds=FLOWTEST_STALE_SECONDS)
        running = FlowTest.objects.filter(
            flow_id=version.flow_id, user=user, status=FlowTest.Status.RUNNING, created_at__gte=fresh
        )
        if running.exists():
            raise FlowTestBusy(
                f"A test of '{version.flow.name}' is still running: wait for it to finish or cancel it first."
            )
        test = FlowTest.objects.create(
            flow_id=version.flow_id,
            version=version,
            user=user,
            inputs=dict(inputs),
            variant=variant or "",
            node=node or "",
        )
        old = FlowTest.objects.filter(flow_id=version.flow_id).order_by("-created_at", "-id")[FLOWTEST_KEEP:]
        FlowTest.objects.filter(pk__in=list(old.values_list("pk", flat=True))).delete()
    return test, plan


def flowtest_finish(
    *,
    test_id: int,
    status: str,
    outputs: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    logs: list[dict[str, Any]] | None = None,
    trace: list[dict[str, Any]] | None = None,
    node_runs: Mapping[str, Any] | None = None,
    usage: Mapping[str, Any] | None = None,
    duration_ms: float | None = None,
) -> bool:
    """Record how a test ended; only a Running test changes, so a second call has no effect."""
    if status not in (FlowTest.Status.COMPLETED, FlowTest.Status.FAILED, FlowTest.Status.CANCELED):
        raise ValueError(f"'{status}' is not a final test status.")
    changed = FlowTest.objects.filter(pk=test_id, status=FlowTest.Status.RUNNING).update(
        status=status,
        outputs=storable(dict(outputs or {})),
        error=storable(dict(error)) if error else None,
        logs=storable(list(logs or [])),
        trace=storable(list(trace or [])),
        node_runs=storable(dict(node_runs or {})),
        usage=dict(usage or {}),
        duration_ms=duration_ms,
        finished_at=timezone.now(),
    )
    return bool(changed)


class FlowTestSession:
    """The runner process behind one test socket.

    Started by the first test, kept warm for the next ones (the turns of a chat) while the plan's files,
    variant and connections stay the same, closed after FLOWTEST_IDLE_SECONDS without a test. `cancel`
    and `close` kill its whole process group at once.
    """

    def __init__(self, *, idle_seconds: float = FLOWTEST_IDLE_SECONDS) -> None:
        self.runner: Any = None
        self.key: str | None = None
        self.canceled = False
        self.idle_seconds = idle_seconds
        self._idle: Any = None

    @property
    def pid(self) -> int | None:
        """The runner's process id while it runs."""
        proc = getattr(self.runner, "proc", None)
        return None if proc is None or proc.returncode is not None else proc.pid

    def _new_runner(self) -> Any:
        from flowengine.runner import Limits
        from flowengine.runner_client import RunnerProcess

        limits = Limits(
            memory_mb=int(getattr(settings, "STUDIO_RUNNER_MEMORY_MB", 1024)),
            cpu_seconds=int(getattr(settings, "STUDIO_RUNNER_CPU_SECONDS", 600)),
            open_files=1024,
            file_size_mb=1024,
        )
        return RunnerProcess(
            env_mode="scrubbed",
            limits=limits,
            line_timeout=float(getattr(settings, "STUDIO_RUNNER_TIMEOUT_SECONDS", 600)),
            kill_grace=FLOWTEST_KILL_GRACE_SECONDS,
        )

    async def events(self, *, plan: FlowTestPlan, inputs: Mapping[str, Any]) -> Any:
        """Run one line of the plan and yield its engine events as they happen; the last is LineCompleted."""
        import contextlib

        from flowengine import events
        from flowengine.runner_client import RunnerError

        self.canceled = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        key = plan.runner_key()
        if self.runner is not None and self.key is not None and (self.key != key or self.pid is None):
            await self.close()
        if self.runner is None or self.key is None:
            # A runner spawned ahead by `prewarm` has started Python and its imports but loaded no flow yet.
            self.runner = self.runner or self._new_runner()
            self.key = key
            try:
                await self.runner.start(
                    plan.flow_dir,
                    dict(plan.connections),
                    plan.variant,
                    dict(plan.init),
                    environment_variables=dict(plan.environment_variables),
                )
            except RunnerError as error:
                await self.close()
                info = error.error or events.ErrorInfo(
                    code="SystemError", type="RunnerError", message=str(error)
                )
                if self.canceled:
                    info = _canceled_info()
                yield events.ErrorEvent(error=info)
                yield events.LineCompleted(line_number=0, status="Failed", error=info)
                return
        runner = self.runner
        async with contextlib.aclosing(
            runner.run_line(dict(inputs), line_number=0, stream=True, node=plan.node)
        ) as stream:
            async for event in stream:
                yield event
        self._arm_idle()

    async def prewarm(self) -> None:
        """Start a runner process before the first test asks for it, so that test skips the start-up."""
        if self.runner is not None:
            return
        self.runner = self._new_runner()
        try:
            await self.runner.spawn()
        except OSError:
            await self.close()
            return
        self._arm_idle()

    def _arm_idle(self) -> None:
        import asyncio

        if self.runner is None or self.idle_seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.idle_seconds, lambda: loop.create_task(self.close()))

    async def cancel(self) -> None:
        """Stop the running test: its runner's process group is killed (a new runner serves the next test)."""
        self.canceled = True
        await self.close()

    async def close(self) -> None:
        """Kill the runner, if any, and forget it."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        runner, self.runner, self.key = self.runner, None, None
        if runner is not None:
            await runner.close()


def _canceled_info() -> Any:
    from flowengine import events

    return events.ErrorInfo(code="UserError", type="Canceled", message="The test was canceled.")
