"""Signing in and out, changing a password, and pages that need a signed-in user."""

from __future__ import annotations

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_login_page_renders_with_csrf(client):
    response = client.get(reverse("login"))

    assert response.status_code == 200
    assert "csrfmiddlewaretoken" in response.content.decode()


def test_login_with_the_right_password_lands_on_home(client, owner):
    response = client.post(
        reverse("login"), {"username": "owner", "password": "owner-pass-123!"}, follow=True
    )

    assert response.redirect_chain[-1][0] == reverse("home")
    assert "Welcome, owner" in response.content.decode()


def test_login_with_a_wrong_password_is_refused(client, owner):
    response = client.post(reverse("login"), {"username": "owner", "password": "nope"})

    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert "errorlist" in response.content.decode()


def test_login_is_protected_by_csrf(owner):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)

    response = strict.post(reverse("login"), {"username": "owner", "password": "owner-pass-123!"})

    assert response.status_code == 403


def test_logout_needs_post(client, owner):
    client.force_login(owner)

    assert client.get(reverse("logout")).status_code == 405
    response = client.post(reverse("logout"))

    assert response.status_code == 302 and response["Location"] == reverse("login")
    assert "_auth_user_id" not in client.session


def test_password_change_takes_effect(client, owner):
    client.force_login(owner)

    response = client.post(
        reverse("password_change"),
        {
            "old_password": "owner-pass-123!",
            "new_password1": "a-New-pass-4567",
            "new_password2": "a-New-pass-4567",
        },
    )

    assert response.status_code == 302 and response["Location"] == reverse("password_change_done")
    owner.refresh_from_db()
    assert owner.check_password("a-New-pass-4567")


def test_password_change_with_a_wrong_old_password_names_the_field(client, owner):
    client.force_login(owner)

    response = client.post(
        reverse("password_change"),
        {"old_password": "wrong", "new_password1": "a-New-pass-4567", "new_password2": "a-New-pass-4567"},
    )

    assert response.status_code == 200
    assert "old_password" in response.context["form"].errors


def test_home_needs_a_signed_in_user(client):
    response = client.get(reverse("home"))

    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_home_shows_the_navigation_and_the_user_menu(client, owner):
    client.force_login(owner)

    page = client.get(reverse("home")).content.decode()

    assert 'href="/settings/"' in page
    assert reverse("logout") in page
    assert 'hx-headers=\'{"X-CSRFToken": "' in page
    assert "/static/vendor/htmx/htmx.min.js" in page


def test_pages_send_security_headers(client, owner):
    client.force_login(owner)

    response = client.get(reverse("home"))

    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
