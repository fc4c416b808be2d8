"""Forms of the flows app: they parse and validate input, the services decide."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib.auth import get_user_model
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


# --- flows: authoring --------------------------------------------------------------------------------

FLOW_TEMPLATE_CHOICES = [
    ("standard", "Standard: a prompt and a Python node"),
    ("chat", "Chat: an LLM node with chat history"),
    ("evaluation", "Evaluation: per-line scores and an aggregation"),
    ("flex", "Flex: a Python class as the flow"),
    ("prompty", "Prompty: one prompt file"),
]


def _team_field(user: AbstractBaseUser) -> forms.ModelChoiceField:
    from accounts_app.models import Team
    from accounts_app.selectors import user_team_ids

    return forms.ModelChoiceField(
        queryset=Team.objects.filter(pk__in=list(user_team_ids(user))).order_by("name"),
        required=False,
        empty_label="No team",
        help_text="Members of the team can view the flow.",
    )


class FlowNewForm(forms.Form):
    """Create a flow from one of the templates."""

    name = forms.CharField(max_length=200)
    template = forms.ChoiceField(choices=FLOW_TEMPLATE_CHOICES, initial="standard", widget=forms.RadioSelect)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args: Any, user: AbstractBaseUser, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fields["team"] = _team_field(user)


class FlowImportForm(forms.Form):
    """Import a zip archive of a flow folder as a new flow."""

    archive = forms.FileField(help_text="A zip of a flow folder (prompt flow exports import as they are).")
    name = forms.CharField(max_length=200, required=False, help_text="Blank: the archive's name.")

    def __init__(self, *args: Any, user: AbstractBaseUser, **kw: Any) -> None:
        # It shares a page with FlowNewForm: distinct element ids keep the labels pointing at the right fields.
        kw.setdefault("auto_id", "import_%s")
        super().__init__(*args, **kw)
        self.fields["team"] = _team_field(user)

    def flow_name(self) -> str:
        """The name to give the new flow: the one typed, else the archive's file name without `.zip`."""
        name = self.cleaned_data.get("name") or ""
        if name:
            return name
        stem = self.cleaned_data["archive"].name.rsplit("/", 1)[-1]
        return stem[:-4] if stem.lower().endswith(".zip") else stem


class VersionImportForm(forms.Form):
    """Import a zip archive as a new version of an existing flow."""

    archive = forms.FileField()
    based_on = forms.IntegerField(min_value=0)
    message = forms.CharField(max_length=500, required=False)


class FileSaveForm(forms.Form):
    """One file's new content, with the version the editor loaded it from."""

    path = forms.CharField(max_length=1000, strip=False)
    content = forms.CharField(required=False, strip=False, widget=forms.Textarea)
    based_on = forms.IntegerField(min_value=0)
    message = forms.CharField(max_length=500, required=False)
    merged = forms.BooleanField(required=False)

    def clean_content(self) -> str:
        """Browsers send CRLF line ends from a textarea: store what the editor shows, with LF."""
        return self.cleaned_data["content"].replace("\r\n", "\n")

    def clean(self) -> dict[str, Any]:
        """A merge may not be saved while it still holds conflict markers."""
        cleaned = super().clean()
        content = cleaned.get("content") or ""
        if cleaned.get("merged") and any(
            line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in content.splitlines()
        ):
            raise ValidationError(
                f"{cleaned.get('path')}: the merge still has conflict markers (<<<<<<< … >>>>>>>): "
                "keep the lines you want and remove the markers."
            )
        return cleaned


class PathForm(forms.Form):
    """A path in the flow folder (a file, or a folder with everything in it) and the version it was seen at."""

    path = forms.CharField(max_length=1000, strip=False)
    based_on = forms.IntegerField(min_value=0)


class RenameForm(PathForm):
    """Move a file or folder to a new path."""

    new_path = forms.CharField(max_length=1000, strip=True)


class UploadForm(forms.Form):
    """Files (or a whole folder) uploaded into a folder of the flow."""

    folder = forms.CharField(max_length=1000, required=False, strip=True)
    based_on = forms.IntegerField(min_value=0)
    # Browsers strip folders from uploaded file names; the page sends each file's relative path here.
    paths = forms.CharField(required=False, widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        """At least one file in the repeated `files` field."""
        cleaned = super().clean()
        if not self.files.getlist("files"):
            raise ValidationError("Choose at least one file to upload.")
        return cleaned

    def named_files(self) -> dict[str, bytes]:
        """{relative path: content} of the uploads: the paths the page sent, else the plain file names."""
        uploads = self.files.getlist("files")
        try:
            names = json.loads(self.cleaned_data["paths"] or "[]")
        except ValueError:
            names = []
        if not (
            isinstance(names, list)
            and len(names) == len(uploads)
            and all(isinstance(n, str) and n for n in names)
        ):
            names = [upload.name for upload in uploads]
        return {name: upload.read() for name, upload in zip(names, uploads, strict=True)}


class AddInputForm(forms.Form):
    """A new flow input, added to flow.dag.yaml by the structured view."""

    name = forms.CharField(max_length=100)
    type = forms.ChoiceField(
        choices=[(t, t) for t in ("string", "int", "double", "bool", "list", "object")], initial="string"
    )
    default = forms.CharField(max_length=2000, required=False)
    based_on = forms.IntegerField(min_value=0)


class AddOutputForm(forms.Form):
    """A new flow output, added to flow.dag.yaml by the structured view."""

    name = forms.CharField(max_length=100)
    reference = forms.CharField(max_length=500, help_text="For example ${my_node.output}.")
    based_on = forms.IntegerField(min_value=0)


class AddNodeForm(forms.Form):
    """A new node, appended to flow.dag.yaml with a starter source file."""

    name = forms.CharField(max_length=100)
    type = forms.ChoiceField(choices=[("llm", "LLM"), ("prompt", "Prompt"), ("python", "Python")])
    connection = forms.CharField(max_length=128, required=False, help_text="LLM nodes: a connection name.")
    model = forms.CharField(max_length=128, required=False)
    inputs = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "text=${inputs.question}"}),
        help_text="One `name=value` per line; values may reference ${inputs.x} or ${node.output}.",
    )
    based_on = forms.IntegerField(min_value=0)

    def clean_inputs(self) -> dict[str, str]:
        """Parse `name=value` lines into the node's inputs."""
        parsed: dict[str, str] = {}
        for number, line in enumerate(self.cleaned_data["inputs"].splitlines(), start=1):
            if not line.strip():
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ValidationError(f"Inputs line {number}: write name=value, not '{line.strip()[:40]}'.")
            parsed[key.strip()] = value.strip()
        return parsed


class ShareForm(forms.Form):
    """Share a flow with one user (by user name) or one team, as viewer or editor."""

    username = forms.CharField(max_length=150, required=False, label="User name")
    role = forms.ChoiceField(choices=[("viewer", "Viewer"), ("editor", "Editor")], initial="viewer")

    def __init__(self, *args: Any, user: AbstractBaseUser, **kw: Any) -> None:
        super().__init__(*args, **kw)
        team = _team_field(user)
        team.empty_label = "—"
        team.help_text = ""
        self.fields["team"] = team

    def clean(self) -> dict[str, Any]:
        """Exactly one of user name and team; the user name must name a user."""
        cleaned = super().clean()
        username = cleaned.get("username")
        if bool(username) == bool(cleaned.get("team")):
            raise ValidationError("Give either a user name or a team.")
        cleaned["user"] = None
        if username:
            cleaned["user"] = get_user_model().objects.filter(username=username).first()
            if cleaned["user"] is None:
                raise ValidationError(f"There is no user named '{username}'.")
        return cleaned
