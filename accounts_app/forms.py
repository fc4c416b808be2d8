"""Forms of the accounts pages: they validate input; services do the work."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import get_user_model, password_validation

from accounts_app.models import Membership


class TokenCreateForm(forms.Form):
    """The label of a new personal access token."""

    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. 'laptop CLI'.")


class InviteForm(forms.Form):
    """A user that staff creates; they set their own password through a one-time link."""

    username = forms.CharField(max_length=150)
    email = forms.EmailField(required=False)
    is_staff = forms.BooleanField(required=False, label="Staff (may manage users and teams)")


class TeamCreateForm(forms.Form):
    """A new team."""

    name = forms.CharField(max_length=100)


class TeamMemberForm(forms.Form):
    """A user to add to a team, with their role."""

    user = forms.ModelChoiceField(queryset=get_user_model()._default_manager.none())
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["user"].queryset = (
            get_user_model()._default_manager.filter(is_active=True).order_by("username")
        )


class SetupForm(forms.Form):
    """The first administrator's account."""

    username = forms.CharField(max_length=150, initial="admin")
    email = forms.EmailField(required=False)
    password1 = forms.CharField(
        label="Password", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Password (again)", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def clean_username(self) -> str:
        """The username, checked with the user model's validators."""
        username = self.cleaned_data["username"].strip()
        user_model = get_user_model()
        user_model._meta.get_field(user_model.USERNAME_FIELD).run_validators(username)
        return username

    def clean(self) -> dict[str, Any]:
        """Both passwords equal and accepted by the configured password validators."""
        cleaned = super().clean() or {}
        first, second = cleaned.get("password1"), cleaned.get("password2")
        if first and second and first != second:
            self.add_error("password2", "The two passwords differ.")
        elif first:
            user = get_user_model()(username=cleaned.get("username", ""), email=cleaned.get("email", ""))
            try:
                password_validation.validate_password(first, user)
            except forms.ValidationError as exc:
                self.add_error("password1", exc)
        return cleaned
