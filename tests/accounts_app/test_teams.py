"""Team services and the selectors other apps use to scope sharing."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from accounts_app.models import Membership
from accounts_app.selectors import teams_for, user_team_ids
from accounts_app.services import team_add_member, team_create, team_remove_member, user_invite

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def test_team_creator_becomes_its_admin(owner):
    team = team_create(name="core", created_by=owner)

    assert Membership.objects.get(team=team, user=owner).role == Membership.Role.ADMIN


def test_adding_a_member_twice_keeps_one_membership(owner, outsider):
    team = team_create(name="core", created_by=owner)

    team_add_member(team=team, user=outsider, added_by=owner)
    team_add_member(team=team, user=outsider, added_by=owner)

    assert Membership.objects.filter(team=team, user=outsider).count() == 1


def test_adding_again_with_another_role_changes_the_role(owner, outsider):
    team = team_create(name="core", created_by=owner)
    team_add_member(team=team, user=outsider, added_by=owner)

    team_add_member(team=team, user=outsider, added_by=owner, role="admin")

    assert Membership.objects.get(team=team, user=outsider).role == "admin"


def test_a_plain_member_cannot_add_or_remove_members(owner, teammate, outsider):
    team = teams_for(owner).get()

    with pytest.raises(PermissionDenied):
        team_add_member(team=team, user=outsider, added_by=teammate)
    with pytest.raises(PermissionDenied):
        team_remove_member(team=team, user=owner, removed_by=teammate)


def test_removing_a_member_is_idempotent(owner, teammate):
    team = teams_for(owner).get()

    team_remove_member(team=team, user=teammate, removed_by=owner)
    team_remove_member(team=team, user=teammate, removed_by=owner)

    assert user_team_ids(teammate) == frozenset()


def test_the_last_admin_stays(owner):
    team = team_create(name="core", created_by=owner)

    with pytest.raises(ValidationError, match="last admin"):
        team_remove_member(team=team, user=owner, removed_by=owner)


def test_user_team_ids_scope_sharing(owner, teammate, outsider):
    team = teams_for(owner).get()

    assert user_team_ids(owner) == user_team_ids(teammate) == frozenset({team.pk})
    assert user_team_ids(outsider) == frozenset()
    assert list(teams_for(outsider)) == []


def test_duplicate_team_names_are_refused(owner):
    team_create(name="core", created_by=owner)

    with pytest.raises(ValidationError) as excinfo:
        team_create(name="core", created_by=owner)

    assert "name" in excinfo.value.error_dict


def test_only_staff_invite_users(owner):
    with pytest.raises(PermissionDenied):
        user_invite(username="someone", invited_by=owner)
