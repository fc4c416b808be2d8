"""The one-time first-user setup link printed by `manage.py runstudio`."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from accounts_app.models import SetupToken
from accounts_app.services import hash_token, setup_token_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

FORM = {
    "username": "admin",
    "email": "admin@example.com",
    "password1": "Sturdy-pass-2024",
    "password2": "Sturdy-pass-2024",
}


def test_setup_link_creates_the_first_superuser_and_signs_in(client):
    token = setup_token_create()

    response = client.post(reverse("setup", args=[token]), FORM)

    assert response.status_code == 302 and response["Location"] == reverse("home")
    admin = get_user_model().objects.get()
    assert admin.username == "admin" and admin.is_superuser and admin.is_staff
    assert client.get(reverse("home")).status_code == 200


def test_setup_link_works_once(client):
    token = setup_token_create()
    client.post(reverse("setup", args=[token]), FORM)
    client.logout()

    again = client.post(reverse("setup", args=[token]), {**FORM, "username": "intruder"})

    assert again.status_code == 404
    assert "no longer works" in again.content.decode()
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["admin"]
    assert client.get(reverse("setup", args=[token])).status_code == 404


def test_setup_token_is_stored_hashed():
    token = setup_token_create()

    stored = SetupToken.objects.get()
    assert stored.token_hash == hash_token(token)
    assert token not in str(list(SetupToken.objects.values_list()))


def test_an_expired_setup_link_is_dead(client):
    token = setup_token_create()
    SetupToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    assert client.get(reverse("setup", args=[token])).status_code == 404
    assert client.post(reverse("setup", args=[token]), FORM).status_code == 404
    assert not get_user_model().objects.exists()


def test_a_new_setup_link_replaces_the_previous_one(client):
    first = setup_token_create()
    second = setup_token_create()

    assert client.get(reverse("setup", args=[first])).status_code == 404
    assert client.get(reverse("setup", args=[second])).status_code == 200


def test_no_setup_link_once_a_user_exists(owner, client):
    with pytest.raises(ValidationError):
        setup_token_create()
    assert client.get(reverse("setup", args=["anything"])).status_code == 404


def test_setup_refuses_a_weak_password_and_keeps_the_link(client):
    token = setup_token_create()

    response = client.post(reverse("setup", args=[token]), {**FORM, "password1": "123", "password2": "123"})

    assert response.status_code == 200
    assert "password1" in response.context["form"].errors
    assert client.get(reverse("setup", args=[token])).status_code == 200
