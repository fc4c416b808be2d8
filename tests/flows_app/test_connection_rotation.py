"""manage.py rotate_encryption_key: a new first key, every row re-encrypted, old rows still readable."""

from __future__ import annotations

import io
import stat

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.core.management import CommandError, call_command

from flows_app.models import Connection
from flows_app.services import connection_create, connection_secrets_for_runner

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The personas are created with passwords; a fast hasher keeps these tests quick."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def old_key(settings, tmp_path) -> str:
    """Keys kept in the data-dir file, as the studio does when STUDIO_ENCRYPTION_KEYS is not set."""
    key = Fernet.generate_key().decode()
    settings.DATA_DIR = tmp_path
    (tmp_path / "encryption.key").write_text(key)
    settings.STUDIO_ENCRYPTION_KEYS = [key]
    return key


@pytest.fixture
def conns(owner, old_key) -> list[Connection]:
    """Two connections encrypted under the old key."""
    return [
        connection_create(owner=owner, name="one", type="open_ai", secrets={"api_key": "sk-one-111"}),
        connection_create(
            owner=owner, name="two", type="custom", secrets={"token": "tok-222", "pw": "pw-333"}
        ),
    ]


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("rotate_encryption_key", *args, stdout=out)
    return out.getvalue()


def _readable_with(key: str) -> bool:
    fernet = Fernet(key.encode())
    try:
        for token in Connection.objects.values_list("encrypted_secrets", flat=True):
            fernet.decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def test_file_keys_get_a_new_first_key_and_every_row_is_reencrypted(conns, old_key, settings, tmp_path):
    output = _run()
    path = tmp_path / "encryption.key"
    keys = path.read_text().split()
    assert len(keys) == 2
    new_key = keys[0]
    assert keys[1] == old_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "re-encrypted 2 connection(s)" in output
    assert _readable_with(new_key)
    assert not _readable_with(old_key)
    # After a restart settings read the whole file: both keys, the new one first.
    settings.STUDIO_ENCRYPTION_KEYS = [path.read_text().strip()]
    secrets = {c.name: dict(connection_secrets_for_runner(c).secrets) for c in Connection.objects.all()}
    assert secrets == {"one": {"api_key": "sk-one-111"}, "two": {"token": "tok-222", "pw": "pw-333"}}
    # Only the new key is needed from now on.
    settings.STUDIO_ENCRYPTION_KEYS = [new_key]
    assert connection_secrets_for_runner(Connection.objects.get(name="two")).secrets["pw"] == "pw-333"


def test_rotating_twice_keeps_every_key_needed_and_rows_readable(conns, settings, tmp_path):
    _run()
    # Each run of the command is a fresh process whose settings read the key file.
    settings.STUDIO_ENCRYPTION_KEYS = [(tmp_path / "encryption.key").read_text().strip()]
    _run()
    keys = (tmp_path / "encryption.key").read_text().split()
    assert len(keys) == 3
    assert _readable_with(keys[0])
    settings.STUDIO_ENCRYPTION_KEYS = keys
    assert (
        connection_secrets_for_runner(Connection.objects.get(name="one")).secrets["api_key"] == "sk-one-111"
    )


def test_env_keys_print_a_new_key_then_reencrypt_after_the_operator_adds_it(
    conns, old_key, settings, tmp_path
):
    (tmp_path / "encryption.key").unlink()
    before = list(Connection.objects.values_list("encrypted_secrets", flat=True))
    output = _run()
    new_key = next(line for line in output.splitlines() if len(line) == 44 and line.endswith("="))
    Fernet(new_key.encode())
    assert "STUDIO_ENCRYPTION_KEYS" in output
    assert list(Connection.objects.values_list("encrypted_secrets", flat=True)) == before
    assert not (tmp_path / "encryption.key").exists()

    settings.STUDIO_ENCRYPTION_KEYS = [new_key, old_key]
    assert "Re-encrypted 2 connection(s)" in _run("--reencrypt")
    assert _readable_with(new_key)
    settings.STUDIO_ENCRYPTION_KEYS = [new_key]
    assert (
        connection_secrets_for_runner(Connection.objects.get(name="one")).secrets["api_key"] == "sk-one-111"
    )


def test_reencrypt_is_idempotent(conns, old_key, settings):
    new_key = Fernet.generate_key().decode()
    settings.STUDIO_ENCRYPTION_KEYS = [new_key, old_key]
    _run("--reencrypt")
    _run("--reencrypt")
    assert _readable_with(new_key)


def test_a_row_no_key_can_read_stops_the_rotation_and_changes_nothing(conns, owner, settings, tmp_path):
    settings.STUDIO_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    connection_create(owner=owner, name="orphan", type="custom", secrets={"k": "v"})
    settings.STUDIO_ENCRYPTION_KEYS = [(tmp_path / "encryption.key").read_text().strip()]
    before = dict(Connection.objects.values_list("name", "encrypted_secrets"))
    with pytest.raises(CommandError, match="orphan"):
        _run("--reencrypt")
    assert dict(Connection.objects.values_list("name", "encrypted_secrets")) == before
