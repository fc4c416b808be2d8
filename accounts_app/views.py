"""Pages for signing in, first-user setup, settings and tokens, the staff admin page and /healthz."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_POST

from accounts_app import selectors, services
from accounts_app.forms import InviteForm, SetupForm, TeamCreateForm, TeamMemberForm, TokenCreateForm
from accounts_app.models import ApiToken, Team

SETTINGS_TEMPLATE = "accounts_app/settings.html"
ADMIN_TEMPLATE = "accounts_app/admin.html"
HEALTHZ_MAX_WAIT = 10.0


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Signed-in staff only; anyone else signed in gets a 404 so the page does not reveal itself."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            raise Http404("No such page.")
        return view(request, *args, **kwargs)

    return wrapper


def _add_form_errors(form: Form, exc: ValidationError) -> None:
    if hasattr(exc, "error_dict"):
        for field, errors in exc.error_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, exc)


@login_required
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """The signed-in user's start page."""
    return render(request, "accounts_app/home.html", {"teams": selectors.teams_for(request.user)})


@never_cache
@sensitive_post_parameters("password1", "password2")
def setup(request: HttpRequest, token: str) -> HttpResponse:
    """Create the first administrator through the one-time link printed by `manage.py runstudio`."""
    if not selectors.setup_token_is_valid(token=token):
        return render(request, "accounts_app/setup.html", {"dead": True}, status=404)
    form = SetupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            user = services.setup_complete(
                token=token, username=data["username"], email=data["email"], password=data["password1"]
            )
        except PermissionDenied:
            return render(request, "accounts_app/setup.html", {"dead": True}, status=404)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.get_username()}. You are the studio's administrator.")
        return redirect("home")
    return render(request, "accounts_app/setup.html", {"form": form})


def _settings_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {
        "tokens": selectors.tokens_for(user=request.user),
        "teams": selectors.teams_for(request.user),
        "token_form": TokenCreateForm(),
        **extra,
    }


@login_required
@require_GET
def settings_page(request: HttpRequest) -> HttpResponse:
    """The user's settings: password, teams and personal access tokens."""
    return render(request, SETTINGS_TEMPLATE, _settings_context(request))


@login_required
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    """Create a token and show its plaintext this once (the fragment for htmx, the page otherwise)."""
    form = TokenCreateForm(request.POST)
    created = None
    if form.is_valid():
        try:
            created = services.token_create(user=request.user, name=form.cleaned_data["name"])
        except ValidationError as exc:
            _add_form_errors(form, exc)
    context = _settings_context(
        request, token_form=form if created is None else TokenCreateForm(), created=created
    )
    template = f"{SETTINGS_TEMPLATE}#tokens" if request.htmx else SETTINGS_TEMPLATE
    return render(request, template, context, status=200 if created or form.is_valid() else 422)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    """Revoke one of the user's tokens; someone else's token is a 404."""
    try:
        token = services.token_revoke(token_id=token_id, user=request.user)
    except ApiToken.DoesNotExist:
        raise Http404("No such token.") from None
    if request.htmx:
        return render(request, f"{SETTINGS_TEMPLATE}#tokens", _settings_context(request, revoked=token))
    messages.success(request, f"Token {token.name!r} revoked.")
    return redirect("accounts:settings")


def _admin_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {
        "users": selectors.users_for_admin(user=request.user),
        "teams": selectors.teams_for_admin(user=request.user),
        "invite_form": InviteForm(),
        "team_form": TeamCreateForm(),
        "member_form": TeamMemberForm(),
        **extra,
    }


def _admin_render(request: HttpRequest, partial: str, status: int = 200, **extra: Any) -> HttpResponse:
    template = f"{ADMIN_TEMPLATE}#{partial}" if request.htmx else ADMIN_TEMPLATE
    return render(request, template, _admin_context(request, **extra), status=status)


@staff_required
@require_GET
def admin_page(request: HttpRequest) -> HttpResponse:
    """Staff page to invite users and manage teams."""
    return render(request, ADMIN_TEMPLATE, _admin_context(request))


@staff_required
@require_POST
def user_invite(request: HttpRequest) -> HttpResponse:
    """Create a user and show their one-time set-password link."""
    form = InviteForm(request.POST)
    invitation = None
    if form.is_valid():
        try:
            invitation = services.user_invite(invited_by=request.user, **form.cleaned_data)
        except ValidationError as exc:
            _add_form_errors(form, exc)
    if invitation is None:
        return _admin_render(request, "users", status=422, invite_form=form)
    link = request.build_absolute_uri(invitation.set_password_path)
    return _admin_render(request, "users", link_user=invitation.user, link=link)


@staff_required
@require_POST
def user_link(request: HttpRequest, user_id: int) -> HttpResponse:
    """A fresh one-time set-password link for a user who lost theirs."""
    user = get_object_or_404(get_user_model(), pk=user_id)
    link = request.build_absolute_uri(services.user_set_password_path(user=user, requested_by=request.user))
    return _admin_render(request, "users", link_user=user, link=link)


@staff_required
@require_POST
def team_create(request: HttpRequest) -> HttpResponse:
    """Create a team; the staff member who creates it becomes its admin."""
    form = TeamCreateForm(request.POST)
    if form.is_valid():
        try:
            services.team_create(name=form.cleaned_data["name"], created_by=request.user)
        except ValidationError as exc:
            _add_form_errors(form, exc)
    if form.errors:
        return _admin_render(request, "teams", status=422, team_form=form)
    return _admin_render(request, "teams")


@staff_required
@require_POST
def team_delete(request: HttpRequest, team_id: int) -> HttpResponse:
    """Delete a team and its memberships."""
    services.team_delete(team=get_object_or_404(Team, pk=team_id), deleted_by=request.user)
    return _admin_render(request, "teams")


@staff_required
@require_POST
def team_member_add(request: HttpRequest, team_id: int) -> HttpResponse:
    """Add a user to a team or change their role."""
    team = get_object_or_404(Team, pk=team_id)
    form = TeamMemberForm(request.POST)
    if form.is_valid():
        services.team_add_member(team=team, added_by=request.user, **form.cleaned_data)
        return _admin_render(request, "teams")
    return _admin_render(request, "teams", status=422, member_form=form, member_form_team=team)


@staff_required
@require_POST
def team_member_remove(request: HttpRequest, team_id: int, user_id: int) -> HttpResponse:
    """Remove a user from a team (never its last admin)."""
    team = get_object_or_404(Team, pk=team_id)
    user = get_object_or_404(get_user_model(), pk=user_id)
    try:
        services.team_remove_member(team=team, user=user, removed_by=request.user)
    except ValidationError as exc:
        return _admin_render(request, "teams", status=422, team_error=" ".join(exc.messages), error_team=team)
    return _admin_render(request, "teams")


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Database, broker, channel layer and a worker's answer; 200 when all are ok, else 503. No secrets."""
    try:
        wait = float(request.GET.get("wait", "5"))
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait):
        return JsonResponse({"status": "error", "error": "wait must be a number of seconds"}, status=400)
    wait = min(max(wait, 0.1), HEALTHZ_MAX_WAIT)
    report = selectors.health_report(wait=wait)
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
