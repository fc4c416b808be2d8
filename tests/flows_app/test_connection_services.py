"""Connection services and selectors: encryption at rest, secret merging, sharing and visibility."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection as db
from django.http import Http404

from flowengine.connections import Connection as EngineConnection
from flows_app.models import Connection
from flows_app.selectors import connection_get_for, connection_list_for, connection_map_for_runner
from flows_app.services import (
    SECRET_MASK,
    connection_create,
    connection_delete,
    connection_secrets_for_runner,
    connection_share,
    connection_test,
    connection_update,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _team(name: str = "core"):
    from accounts_app.models import Team

    return Team.objects.get(name=name)


@pytest.fixture
def openai_conn(owner) -> Connection:
    """An OpenAI connection with a key and a custom secret."""
    return connection_create(
        owner=owner,
        name="my_openai",
        type="open_ai",
        configs={"organization": "org-1", "model": "gpt-4o-mini"},
        secrets={"api_key": "sk-original-key-123", "extra": "extra-secret-456"},
    )


def test_secrets_are_stored_only_as_a_fernet_token(openai_conn):
    with db.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {Connection._meta.db_table}")
        row = " ".join(str(value) for value in cursor.fetchone())
    assert "sk-original-key-123" not in row
    assert "extra-secret-456" not in row
    assert openai_conn.encrypted_secrets.startswith("gAAAA")
    assert openai_conn.secret_names == ["api_key", "extra"]


def test_secrets_for_runner_returns_an_engine_connection_with_decrypted_secrets(openai_conn):
    engine = connection_secrets_for_runner(openai_conn)
    assert isinstance(engine, EngineConnection)
    assert engine.name == "my_openai"
    assert engine.type == "open_ai"
    assert dict(engine.secrets) == {"api_key": "sk-original-key-123", "extra": "extra-secret-456"}
    assert engine.configs["organization"] == "org-1"
    assert "sk-original" not in repr(engine)


def test_blank_or_masked_secret_keeps_the_stored_value(openai_conn, owner):
    connection_update(connection=openai_conn, by=owner, secrets={"api_key": "", "extra": SECRET_MASK})
    openai_conn.refresh_from_db()
    assert connection_secrets_for_runner(openai_conn).secrets == {
        "api_key": "sk-original-key-123",
        "extra": "extra-secret-456",
    }


def test_update_sets_new_secret_and_none_removes_one(openai_conn, owner):
    connection_update(connection=openai_conn, by=owner, secrets={"api_key": "sk-new", "extra": None})
    openai_conn.refresh_from_db()
    assert dict(connection_secrets_for_runner(openai_conn).secrets) == {"api_key": "sk-new"}
    assert openai_conn.secret_names == ["api_key"]
    assert openai_conn.updated_by == owner


def test_a_masked_value_for_a_new_secret_is_refused(openai_conn, owner):
    with pytest.raises(ValidationError) as error:
        connection_update(connection=openai_conn, by=owner, secrets={"brand_new": SECRET_MASK})
    assert "brand_new" in str(error.value)


def test_names_are_unique_per_owner_but_not_across_owners(openai_conn, owner, outsider):
    with pytest.raises(ValidationError) as error:
        connection_create(owner=owner, name="my_openai", type="custom")
    assert "already have a connection named 'my_openai'" in str(error.value)
    other = connection_create(owner=outsider, name="my_openai", type="custom")
    assert other.owner == outsider


@pytest.mark.parametrize("name", ["", "-dash-first", "has space", "x" * 129, "${inject}", "a/b"])
def test_invalid_names_are_refused_with_the_rule(owner, name):
    with pytest.raises(ValidationError) as error:
        connection_create(owner=owner, name=name, type="custom")
    assert "name" in error.value.message_dict


@pytest.mark.parametrize(
    ("type", "configs", "secrets", "field"),
    [
        ("open_ai", {}, {}, "api_key"),
        ("azure_open_ai", {}, {"api_key": "k"}, "api_base"),
        ("openai_compatible", {}, {}, "base_url"),
        ("openai_compatible", {"base_url": "ftp://x"}, {}, "base_url"),
        ("nope", {}, {}, "type"),
    ],
)
def test_each_type_names_the_missing_or_bad_field(owner, type, configs, secrets, field):
    with pytest.raises(ValidationError) as error:
        connection_create(owner=owner, name="c", type=type, configs=configs, secrets=secrets)
    assert field in error.value.message_dict


def test_azure_gets_api_type_and_default_api_version(owner):
    conn = connection_create(
        owner=owner,
        name="az",
        type="azure_open_ai",
        configs={"api_base": "https://res.openai.azure.com/"},
        secrets={"api_key": "k"},
    )
    assert conn.configs["api_type"] == "azure"
    assert conn.configs["api_version"]


def test_openai_compatible_needs_no_key(owner):
    conn = connection_create(
        owner=owner,
        name="ollama",
        type="openai_compatible",
        configs={"base_url": "http://localhost:11434/v1"},
    )
    assert conn.secret_names == []
    assert dict(connection_secrets_for_runner(conn).secrets) == {}


def test_shared_connection_is_visible_to_teammates_only(openai_conn, owner, teammate, outsider):
    assert list(connection_list_for(teammate)) == []
    connection_share(connection=openai_conn, team=_team(), by=owner)
    assert list(connection_list_for(teammate)) == [openai_conn]
    assert connection_get_for(teammate, name="my_openai") == openai_conn
    assert list(connection_list_for(outsider)) == []
    with pytest.raises(Http404):
        connection_get_for(outsider, name="my_openai")
    with pytest.raises(Http404):
        connection_get_for(outsider, pk=openai_conn.pk)


def test_teammate_cannot_get_a_shared_connection_for_editing(openai_conn, owner, teammate):
    connection_share(connection=openai_conn, team=_team(), by=owner)
    with pytest.raises(PermissionDenied):
        connection_get_for(teammate, pk=openai_conn.pk, editable=True)
    assert connection_get_for(owner, pk=openai_conn.pk, editable=True) == openai_conn


def test_sharing_with_a_team_the_owner_is_not_in_is_refused(openai_conn, outsider, teammate):
    from accounts_app.services import team_create

    foreign = team_create(name="elsewhere", created_by=outsider)
    with pytest.raises(ValidationError) as error:
        connection_share(connection=openai_conn, team=foreign, by=openai_conn.owner)
    assert "elsewhere" in str(error.value)


def test_unsharing_hides_it_again(openai_conn, owner, teammate):
    connection_share(connection=openai_conn, team=_team(), by=owner)
    connection_share(connection=openai_conn, team=None, by=owner)
    assert list(connection_list_for(teammate)) == []


def test_by_name_own_connection_wins_over_a_shared_one(openai_conn, owner, teammate):
    connection_share(connection=openai_conn, team=_team(), by=owner)
    mine = connection_create(owner=teammate, name="my_openai", type="custom", secrets={"k": "v"})
    assert connection_get_for(teammate, name="my_openai") == mine
    assert connection_map_for_runner(teammate, names={"my_openai", "missing"}) == {"my_openai": mine}
    assert connection_map_for_runner(owner, names=["my_openai"]) == {"my_openai": openai_conn}


def test_malformed_pk_is_404_not_an_error(owner):
    with pytest.raises(Http404):
        connection_get_for(owner, pk="not-a-uuid")


def test_delete_is_idempotent(openai_conn, owner):
    connection_delete(connection=openai_conn, by=owner)
    connection_delete(connection=openai_conn, by=owner)
    assert not Connection.objects.exists()


def test_unreadable_secrets_give_a_clear_test_error(openai_conn, settings):
    settings.STUDIO_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    result = connection_test(connection=openai_conn)
    assert not result.ok
    assert "my_openai" in result.message
    assert "STUDIO_ENCRYPTION_KEYS" in result.message


def test_updating_a_connection_whose_secrets_cannot_be_read_is_a_clear_error(openai_conn, owner, settings):
    settings.STUDIO_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(ValidationError) as error:
        connection_update(connection=openai_conn, by=owner, configs={"model": "x"})
    assert "my_openai" in str(error.value)
    assert "create it again" in str(error.value)
