"""Writes of the flows app: connections and their encrypted secrets."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from flowengine.connections import DEFAULT_AZURE_API_VERSION
from flowengine.connections import Connection as EngineConnection
from flows_app.models import CONNECTION_NAME_PATTERN, CONNECTION_NAME_RULE, Connection

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
