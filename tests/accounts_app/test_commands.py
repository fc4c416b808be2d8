"""Management commands: create_token, and the production settings passing `check --deploy`."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts_app.models import ApiToken
from accounts_app.services import hash_token


@pytest.mark.django_db
def test_create_token_prints_a_token_the_api_accepts(client, owner):
    out = io.StringIO()

    call_command("create_token", "--user", "owner", "--name", "ci", stdout=out, stderr=io.StringIO())

    token = out.getvalue().strip()
    assert ApiToken.objects.get(user=owner, name="ci").token_hash == hash_token(token)
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["username"] == "owner"
    )


@pytest.mark.django_db
def test_create_token_names_an_unknown_user():
    with pytest.raises(CommandError, match="nobody"):
        call_command("create_token", "--user", "nobody", stdout=io.StringIO(), stderr=io.StringIO())


def test_production_settings_pass_check_deploy(tmp_path):
    env = {
        **os.environ,
        "STUDIO_PRODUCTION": "1",
        "STUDIO_SECRET_KEY": secrets.token_urlsafe(60),
        "STUDIO_DATA_DIR": str(tmp_path),
    }

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_encryption_key_fails_the_checks(tmp_path):
    env = {**os.environ, "STUDIO_ENCRYPTION_KEYS": "not-a-key", "STUDIO_DATA_DIR": str(tmp_path)}

    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "studio.E001" in result.stderr
