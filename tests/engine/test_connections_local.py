"""Connections: prompt flow's YAML, the local encrypted store and the process-wide provider."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from flowengine.connections import (
    SCRUBBED,
    Connection,
    ConnectionConfigError,
    ConnectionNotFound,
    LocalConnectionStore,
    connection_from_yaml,
    get_connection,
    set_current_connections,
)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSTUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLOWSTUDIO_CONNECTION_KEY", raising=False)
    monkeypatch.delenv("FLOWSTUDIO_CONNECTION_KEY_FILE", raising=False)
    return tmp_path / "home"


def test_openai_yaml_with_env_value_and_set_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-from-env")
    path = write(
        tmp_path / "openai.yaml",
        """
        $schema: https://azuremlschemas.azureedge.net/promptflow/latest/OpenAIConnection.schema.json
        name: open_ai_connection
        type: open_ai
        api_key: ${env:MY_OPENAI_KEY}
        organization: ""
        """,
    )
    conn = connection_from_yaml(path, {"base_url": "http://localhost:11434/v1"})
    assert conn.name == "open_ai_connection" and conn.type == "open_ai"
    assert conn.api_key == "sk-from-env"
    assert conn.base_url == "http://localhost:11434/v1"
    assert conn.to_dict()["secrets"] == {"api_key": SCRUBBED}
    assert conn.to_dict(reveal=True)["secrets"] == {"api_key": "sk-from-env"}
    assert "sk-from-env" not in repr(conn)


def test_azure_and_custom_yaml(tmp_path):
    azure = connection_from_yaml(
        write(
            tmp_path / "azure.yaml",
            """
            name: azure_open_ai_connection
            type: azure_open_ai
            api_key: aoai-key
            api_base: https://example.openai.azure.com/
            api_type: azure
            api_version: 2024-06-01
            """,
        )
    )
    assert (azure.api_base, azure.api_version, azure.api_key) == (
        "https://example.openai.azure.com/",
        "2024-06-01",
        "aoai-key",
    )
    custom = connection_from_yaml(
        write(
            tmp_path / "custom.yaml",
            """
            name: search
            type: custom
            configs:
              endpoint: https://search.example
            secrets:
              token: t0ken
            """,
        ),
        {"configs.region": "eu", "secrets.token": "replaced"},
    )
    assert dict(custom.configs) == {"endpoint": "https://search.example", "region": "eu"}
    assert dict(custom.secrets) == {"token": "replaced"}


def test_yaml_problems_name_the_file_and_field(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(
        ConnectionConfigError, match=r"c\.yaml: 'api_key': environment variable NOT_SET_ANYWHERE"
    ):
        connection_from_yaml(
            write(tmp_path / "c.yaml", "name: c\ntype: open_ai\napi_key: ${env:NOT_SET_ANYWHERE}\n")
        )
    with pytest.raises(ConnectionConfigError, match="unsupported connection type 'qdrant'"):
        connection_from_yaml(write(tmp_path / "q.yaml", "name: q\ntype: qdrant\napi_key: k\n"))
    with pytest.raises(ConnectionConfigError, match=r"y\.yaml:2: invalid YAML"):
        connection_from_yaml(write(tmp_path / "y.yaml", "name: y\n  type: [\n"))


def test_store_encrypts_secrets_with_a_private_key_file(home):
    store = LocalConnectionStore()
    store.create(Connection.open_ai("main", api_key="sk-very-secret-value", base_url="http://h/v1"))
    key_mode = stat.S_IMODE(os.stat(store.key_file).st_mode)
    assert key_mode == 0o600
    assert store.key_file.parent != store.data_file.parent
    raw = store.data_file.read_text()
    assert "sk-very-secret-value" not in raw and "http://h/v1" in raw
    again = LocalConnectionStore()
    assert again.get("main").api_key == "sk-very-secret-value"
    assert [c.name for c in again.list()] == ["main"]


def test_store_refuses_duplicates_and_keeps_masked_secrets_on_replace(home):
    store = LocalConnectionStore()
    store.create(Connection.open_ai("main", api_key="first-key"))
    with pytest.raises(ConnectionConfigError, match="already exists"):
        store.create(Connection.open_ai("main", api_key="other"))
    store.create(Connection.open_ai("main", api_key=SCRUBBED, base_url="http://new/v1"), replace=True)
    updated = store.get("main")
    assert (updated.api_key, updated.base_url) == ("first-key", "http://new/v1")
    store.delete("main")
    with pytest.raises(ConnectionNotFound):
        store.get("main")


def test_store_key_from_environment_and_wrong_key_is_reported(home, monkeypatch):
    monkeypatch.setenv("FLOWSTUDIO_CONNECTION_KEY", Fernet.generate_key().decode())
    LocalConnectionStore().create(Connection.open_ai("main", api_key="k1"))
    assert not (home / "keys").exists()
    monkeypatch.setenv("FLOWSTUDIO_CONNECTION_KEY", Fernet.generate_key().decode())
    with pytest.raises(ConnectionConfigError, match="cannot be decrypted"):
        LocalConnectionStore().get("main")


def test_key_file_readable_by_others_is_refused(home):
    store = LocalConnectionStore()
    store.create(Connection.open_ai("main", api_key="k1"))
    os.chmod(store.key_file, 0o644)
    with pytest.raises(ConnectionConfigError, match="readable by others"):
        LocalConnectionStore().get("main")


def test_process_provider_resolves_installed_connections_first(home):
    LocalConnectionStore().create(Connection.open_ai("stored", api_key="from-store"))
    set_current_connections({"live": Connection.open_ai("live", api_key="from-runner").to_dict(reveal=True)})
    try:
        assert get_connection("live").api_key == "from-runner"
        assert get_connection("stored").api_key == "from-store"
        with pytest.raises(ConnectionNotFound, match="'nope' not found"):
            get_connection("nope")
    finally:
        set_current_connections({})


def test_dict_round_trip():
    conn = Connection.azure_open_ai("a", api_key="k", api_base="https://x")
    assert Connection.from_dict(conn.to_dict(reveal=True)) == conn
