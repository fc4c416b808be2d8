"""The staff page for inviting users and managing teams."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from accounts_app.models import Membership, Team
from accounts_app.services import team_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

HTMX = {"HX-Request": "true"}


def test_staff_sees_users_and_teams(client, staff, owner):
    client.force_login(staff)

    response = client.get(reverse("accounts:admin"))

    assert response.status_code == 200
    assert "owner" in response.content.decode()


def test_non_staff_gets_404(client, outsider):
    client.force_login(outsider)

    assert client.get(reverse("accounts:admin")).status_code == 404
    assert client.post(reverse("accounts:user_invite"), {"username": "x"}).status_code == 404
    assert not get_user_model().objects.filter(username="x").exists()


def test_anonymous_is_sent_to_login(client):
    response = client.get(reverse("accounts:admin"))
    htmx = client.post(reverse("accounts:team_create"), {"name": "x"}, headers=HTMX)

    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert htmx["HX-Redirect"].startswith(reverse("login"))
    assert not Team.objects.exists()


def test_invite_gives_a_one_time_set_password_link(client, staff):
    client.force_login(staff)

    response = client.post(
        reverse("accounts:user_invite"), {"username": "newcomer", "email": "n@example.com"}, headers=HTMX
    )

    body = response.content.decode()
    assert response.status_code == 200 and "<html" not in body
    newcomer = get_user_model().objects.get(username="newcomer")
    assert not newcomer.has_usable_password()
    link = re.search(r'id="invite-link" value="http://testserver(/set-password/[^"]+)"', body).group(1)

    client.logout()
    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200 and "Set your password" in form_page.content.decode()
    done = client.post(
        form_page.redirect_chain[-1][0],
        {"new_password1": "Fresh-pass-9876", "new_password2": "Fresh-pass-9876"},
    )
    assert done.status_code == 302
    newcomer.refresh_from_db()
    assert newcomer.check_password("Fresh-pass-9876")

    reused = client.get(link, follow=True)
    assert "no longer works" in reused.content.decode()


def test_invite_refuses_a_taken_username_naming_the_field(client, staff, owner):
    client.force_login(staff)

    response = client.post(reverse("accounts:user_invite"), {"username": "OWNER"}, headers=HTMX)

    assert response.status_code == 422
    assert "is taken" in response.content.decode()


def test_staff_creates_a_team_and_manages_members(client, staff, owner, outsider):
    client.force_login(staff)

    created = client.post(reverse("accounts:team_create"), {"name": "research"}, headers=HTMX)
    team = Team.objects.get(name="research")
    added = client.post(
        reverse("accounts:team_member_add", args=[team.pk]),
        {"user": owner.pk, "role": "member"},
        headers=HTMX,
    )
    removed = client.post(reverse("accounts:team_member_remove", args=[team.pk, owner.pk]), headers=HTMX)

    assert created.status_code == added.status_code == removed.status_code == 200
    assert '<div id="teams">' in added.content.decode()
    assert not Membership.objects.filter(team=team, user=owner).exists()
    assert Membership.objects.get(team=team).user == staff


def test_the_last_team_admin_cannot_be_removed(client, staff, owner):
    team = team_create(name="solo", created_by=owner)
    client.force_login(staff)

    response = client.post(reverse("accounts:team_member_remove", args=[team.pk, owner.pk]), headers=HTMX)

    assert response.status_code == 422
    assert "last admin" in response.content.decode()
    assert Membership.objects.filter(team=team, user=owner).exists()


def test_a_duplicate_team_name_is_refused_naming_the_field(client, staff):
    team_create(name="core", created_by=staff)
    client.force_login(staff)

    response = client.post(reverse("accounts:team_create"), {"name": "core"})

    assert response.status_code == 422
    assert "already exists" in response.content.decode()
    assert "<html" in response.content.decode()


def test_staff_deletes_a_team(client, staff):
    team = team_create(name="gone", created_by=staff)
    client.force_login(staff)

    response = client.post(reverse("accounts:team_delete", args=[team.pk]), headers=HTMX)

    assert response.status_code == 200
    assert not Team.objects.exists()
