"""Forms of the flows app: they parse and validate input, the services decide."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django import forms
from django.core.exceptions import ValidationError

from flows_app.models import Connection
from flows_app.services import KNOWN_CONFIG_KEYS, SECRET_MASK

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

# How many empty key/value rows the form offers for custom configs and secrets.
BLANK_ROWS = 2


def _rows(data: Any, key_field: str, value_field: str) -> list[tuple[str, str]]:
    keys = data.getlist(key_field) if hasattr(data, "getlist") else []
    values = data.getlist(value_field) if hasattr(data, "getlist") else []
    values = values + [""] * (len(keys) - len(values))
    return [(key.strip(), value) for key, value in zip(keys, values, strict=False)]


class ConnectionForm(forms.Form):
    """Create or edit a connection: fixed fields per type plus key/value rows for custom configs and secrets.

    Repeated fields `config_key`/`config_value` and `secret_key`/`secret_value` carry the rows.
    """

    name = forms.CharField(max_length=128, help_text="Flows refer to the connection by this name.")
    type = forms.ChoiceField(choices=Connection.Type.choices)
    base_url = forms.CharField(
        required=False,
        label="Base URL",
        help_text="OpenAI-compatible: http://localhost:11434/v1. Azure OpenAI: https://<resource>.openai.azure.com/.",
    )
    api_version = forms.CharField(
        required=False, label="API version", help_text="Azure OpenAI only; blank uses the default version."
    )
    organization = forms.CharField(required=False)
    model = forms.CharField(
        required=False,
        label="Default model",
        help_text="Model (Azure: deployment) used by the connection test.",
    )
    api_key = forms.CharField(
        required=False,
        label="API key",
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
    )
    api_key_clear = forms.BooleanField(required=False, label="Remove the stored API key")
    team = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="Not shared",
        help_text="Its members can use it, read-only.",
    )

    def __init__(
        self, *args: Any, user: AbstractBaseUser, connection: Connection | None = None, **kw: Any
    ) -> None:
        from accounts_app.models import Team
        from accounts_app.selectors import user_team_ids

        self.connection = connection
        if connection is not None and not args and "initial" not in kw:
            configs = connection.configs
            kw["initial"] = {
                "name": connection.name,
                "type": connection.type,
                "base_url": configs.get("api_base") or configs.get("base_url") or "",
                "api_version": configs.get("api_version", ""),
                "organization": configs.get("organization", ""),
                "model": configs.get("model", ""),
                "team": connection.team_id,
            }
        super().__init__(*args, **kw)
        self.fields["team"].queryset = Team.objects.filter(pk__in=list(user_team_ids(user))).order_by("name")
        if connection is None:
            del self.fields["api_key_clear"]
        elif "api_key" in connection.secret_names:
            self.fields["api_key"].widget.attrs["placeholder"] = SECRET_MASK
            self.fields["api_key"].help_text = "Stored. Leave blank to keep it."

    def config_rows(self) -> list[tuple[str, str]]:
        """The custom config rows to show: submitted ones, or the stored ones, plus blank rows."""
        if self.is_bound:
            rows = _rows(self.data, "config_key", "config_value")
        elif self.connection is not None:
            rows = [(k, str(v)) for k, v in self.connection.configs.items() if k not in KNOWN_CONFIG_KEYS]
        else:
            rows = []
        return [row for row in rows if row[0] or row[1]] + [("", "")] * BLANK_ROWS

    def secret_rows(self) -> list[str]:
        """The names of the custom secret rows to show (values are never sent back), plus blank rows."""
        if self.is_bound:
            names = [key for key, _ in _rows(self.data, "secret_key", "secret_value") if key]
        elif self.connection is not None:
            names = [name for name in self.connection.secret_names if name != "api_key"]
        else:
            names = []
        return names + [""] * BLANK_ROWS

    def clean(self) -> dict[str, Any]:
        """Parse the key/value rows into configs and secrets as the services take them."""
        cleaned = super().clean()
        configs: dict[str, Any] = {}
        for key, value in _rows(self.data, "config_key", "config_value"):
            if not key and not value:
                continue
            if not key:
                raise ValidationError(f"The custom config with value '{value[:40]}' needs a name.")
            if key in KNOWN_CONFIG_KEYS:
                raise ValidationError(f"Custom config '{key}' has its own field above; set it there.")
            if key in configs:
                raise ValidationError(f"Custom config '{key}' appears twice.")
            configs[key] = value
        url_key = "api_base" if cleaned.get("type") == Connection.Type.AZURE_OPEN_AI else "base_url"
        for field, key in (("base_url", url_key), ("api_version", "api_version")):
            configs[key] = cleaned.get(field, "")
        configs["organization"] = cleaned.get("organization", "")
        configs["model"] = cleaned.get("model", "")

        secrets: dict[str, str | None] = {}
        for key, value in _rows(self.data, "secret_key", "secret_value"):
            if not key and not value:
                continue
            if not key:
                raise ValidationError("A custom secret needs a name.")
            if key == "api_key":
                raise ValidationError("The API key has its own field above; set it there.")
            if key in secrets:
                raise ValidationError(f"Custom secret '{key}' appears twice.")
            if self.connection is None and value == "":
                raise ValidationError(f"Custom secret '{key}' needs a value.")
            secrets[key] = value
        if self.connection is not None:
            # A stored secret whose row was removed is deleted; a row left blank keeps the stored value.
            for name in self.connection.secret_names:
                if name != "api_key" and name not in secrets:
                    secrets[name] = None
        api_key = cleaned.get("api_key", "")
        if cleaned.get("api_key_clear"):
            secrets["api_key"] = None
        elif api_key:
            secrets["api_key"] = api_key
        cleaned["configs"] = configs
        cleaned["secrets"] = secrets
        return cleaned

    def service_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for connection_create / connection_update."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "type": data["type"],
            "configs": data["configs"],
            "secrets": data["secrets"],
            "team": data.get("team"),
        }

    def add_service_errors(self, error: ValidationError) -> None:
        """Show a service's ValidationError next to the field it names."""
        aliases = {"api_base": "base_url"}
        for key, messages in (
            error.message_dict.items() if hasattr(error, "error_dict") else [(None, error.messages)]
        ):
            field = aliases.get(key, key) if key else None
            for message in messages:
                self.add_error(field if field in self.fields else None, message)
