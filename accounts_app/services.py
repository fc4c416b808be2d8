"""Writes for users, teams, personal access tokens and first-user setup."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AbstractUser
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from accounts_app.models import ApiToken, Membership, SetupToken, Team

TOKEN_PREFIX = "fst_"
TOKEN_DISPLAY_LENGTH = 12
# last_used_at is advisory; writing it on every API call would turn every read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class TokenRevokedError(Exception):
    """The presented API token exists but was revoked."""


@dataclass(frozen=True)
class CreatedToken:
    """A new API token: the row, and the plaintext that is shown once and never stored."""

    token: ApiToken
    plaintext: str


@dataclass(frozen=True)
class Invitation:
    """A user created by staff and the path of their one-time set-password page."""

    user: AbstractUser
    set_password_path: str


def hash_token(plaintext: str) -> str:
    """The sha256 hex digest under which a token is stored and looked up."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _is_team_admin(*, team: Team, user: AbstractBaseUser) -> bool:
    if getattr(user, "is_staff", False):
        return True
    return Membership.objects.filter(team=team, user=user, role=Membership.Role.ADMIN).exists()


def _require_staff(user: AbstractBaseUser) -> None:
    if not (user.is_active and getattr(user, "is_staff", False)):
        raise PermissionDenied("Only staff can manage users.")


def team_create(*, name: str, created_by: AbstractBaseUser) -> Team:
    """Create a team whose creator becomes its first admin; a taken name is a ValidationError on `name`."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "A team needs a name."})
    try:
        with transaction.atomic():
            team = Team.objects.create(name=name, created_by=created_by)
            Membership.objects.create(team=team, user=created_by, role=Membership.Role.ADMIN)
    except IntegrityError:
        raise ValidationError({"name": f"A team named {name!r} already exists."}) from None
    return team


def team_add_member(
    *, team: Team, user: AbstractBaseUser, added_by: AbstractBaseUser, role: str = Membership.Role.MEMBER
) -> Membership:
    """Add a user to a team, or change their role; idempotent. Only team admins and staff may do it."""
    if role not in Membership.Role.values:
        raise ValidationError(
            {"role": f"Unknown role {role!r}; use one of {', '.join(Membership.Role.values)}."}
        )
    if not _is_team_admin(team=team, user=added_by):
        raise PermissionDenied("Only the team's admins and staff can add members.")
    membership, created = Membership.objects.get_or_create(team=team, user=user, defaults={"role": role})
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
    return membership


def team_remove_member(*, team: Team, user: AbstractBaseUser, removed_by: AbstractBaseUser) -> None:
    """Remove a user from a team; idempotent. The last admin stays, so someone can still manage it."""
    if not _is_team_admin(team=team, user=removed_by):
        raise PermissionDenied("Only the team's admins and staff can remove members.")
    with transaction.atomic():
        # Lock the team's memberships so two admins removing each other cannot leave it without one.
        memberships = list(Membership.objects.select_for_update().filter(team=team))
        target = next((m for m in memberships if m.user_id == user.pk), None)
        if target is None:
            return
        admins = [m for m in memberships if m.role == Membership.Role.ADMIN]
        if target.role == Membership.Role.ADMIN and len(admins) == 1:
            raise ValidationError(
                f"{user} is the last admin of team {team.name!r}; make someone else admin first."
            )
        target.delete()


def team_delete(*, team: Team, deleted_by: AbstractBaseUser) -> None:
    """Delete a team and its memberships; staff only."""
    _require_staff(deleted_by)
    team.delete()


def user_set_password_path(*, user: AbstractBaseUser, requested_by: AbstractBaseUser) -> str:
    """A one-time set-password page for a user: it stops working once the password is set. Staff only."""
    _require_staff(requested_by)
    uidb64 = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    return reverse("password_reset_confirm", kwargs={"uidb64": uidb64, "token": token})


def user_invite(
    *, username: str, email: str = "", is_staff: bool = False, invited_by: AbstractBaseUser
) -> Invitation:
    """Create a user without a usable password and return their one-time set-password link. Staff only."""
    _require_staff(invited_by)
    user_model = get_user_model()
    username = username.strip()
    if not username:
        raise ValidationError({"username": "A user needs a username."})
    field = user_model._meta.get_field(user_model.USERNAME_FIELD)
    try:
        field.run_validators(username)
    except ValidationError as exc:
        raise ValidationError({"username": exc.messages}) from None
    if user_model._default_manager.filter(**{f"{user_model.USERNAME_FIELD}__iexact": username}).exists():
        raise ValidationError({"username": f"The username {username!r} is taken."})
    user = user_model._default_manager.create_user(username=username, email=email.strip(), is_staff=is_staff)
    user.set_unusable_password()
    user.save(update_fields=["password"])
    return Invitation(user=user, set_password_path=user_set_password_path(user=user, requested_by=invited_by))


def token_create(*, user: AbstractBaseUser, name: str) -> CreatedToken:
    """Create a personal access token; the plaintext is returned once and only its hash is kept."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "A token needs a name, e.g. 'laptop CLI'."})
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name[:100], prefix=plaintext[:TOKEN_DISPLAY_LENGTH], token_hash=hash_token(plaintext)
    )
    return CreatedToken(token=token, plaintext=plaintext)


def token_revoke(*, token_id: int, user: AbstractBaseUser) -> ApiToken:
    """Revoke one of the user's tokens; idempotent. Someone else's token is ApiToken.DoesNotExist."""
    token = ApiToken.objects.get(pk=token_id, user=user)
    # Conditional so a second revoke keeps the first revocation time.
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db(fields=["revoked_at"])
    return token


def token_authenticate(*, plaintext: str) -> AbstractBaseUser | None:
    """The active user a token belongs to, or None; raises TokenRevokedError for a revoked token."""
    if not plaintext.startswith(TOKEN_PREFIX):
        return None
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(plaintext)).first()
    if token is None or not token.user.is_active:
        return None
    if token.revoked_at is not None:
        raise TokenRevokedError(
            f"The token {token.prefix}… was revoked on {token.revoked_at:%Y-%m-%d %H:%M} UTC."
        )
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user


def setup_token_create() -> str:
    """A new one-time link token for creating the first admin; earlier unused tokens stop working."""
    if get_user_model()._default_manager.exists():
        raise ValidationError("Users already exist; the first-user setup is closed.")
    plaintext = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        SetupToken.objects.filter(used_at__isnull=True).update(used_at=now)
        SetupToken.objects.create(
            token_hash=hash_token(plaintext),
            expires_at=now + timedelta(hours=settings.STUDIO_SETUP_TOKEN_HOURS),
        )
    return plaintext


def setup_complete(*, token: str, username: str, email: str, password: str) -> AbstractUser:
    """Spend the setup token and create the first superuser; a spent, expired or unknown token is refused."""
    with transaction.atomic():
        # The conditional update claims the token: of two concurrent submissions only one changes the row.
        claimed = SetupToken.objects.filter(
            token_hash=hash_token(token), used_at__isnull=True, expires_at__gt=timezone.now()
        ).update(used_at=timezone.now())
        user_model = get_user_model()
        if not claimed or user_model._default_manager.exists():
            raise PermissionDenied("This setup link has already been used or has expired.")
        return user_model._default_manager.create_superuser(username=username, email=email, password=password)
