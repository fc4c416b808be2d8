"""Shared fixtures: the personas every view test uses, and the fake LLM server."""

from __future__ import annotations

import os

import pytest

# `flowstudio` commands started by tests start each runner from scratch, so that no local fork server outlives
# the session; the one test of the fork server turns it on and stops it.
os.environ["FLOWSTUDIO_NO_ZYGOTE"] = "1"

pytest_plugins = ["tests.fakellm"]


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    """Tests create many users: a fast hasher keeps the suite quick (production keeps Django's default)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def owner(django_user_model):
    """The user who owns the objects under test."""
    return django_user_model.objects.create_user(username="owner", password="owner-pass-123!")


@pytest.fixture
def teammate(django_user_model, owner):
    """A user in a team with the owner: sees what the owner shares with that team."""
    from accounts_app.services import team_add_member, team_create

    user = django_user_model.objects.create_user(username="teammate", password="teammate-pass-123!")
    team = team_create(name="core", created_by=owner)
    team_add_member(team=team, user=user, added_by=owner)
    return user


@pytest.fixture
def outsider(django_user_model):
    """A signed-up user with no relation to the owner: must never see the owner's objects."""
    return django_user_model.objects.create_user(username="outsider", password="outsider-pass-123!")
