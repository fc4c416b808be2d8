"""Database models of the flows app."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

# The same rule as prompt flow connection YAML files read by flowengine.connections.
CONNECTION_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
CONNECTION_NAME_RULE = (
    "letters, digits, '_', '.' and '-', at most 128 characters, not starting with '.' or '-'"
)
connection_name_validator = RegexValidator(CONNECTION_NAME_PATTERN, message=f"Use {CONNECTION_NAME_RULE}.")


class Connection(models.Model):
    """A named LLM (or custom) connection: plain configs plus secrets encrypted at rest."""

    class Type(models.TextChoices):
        OPEN_AI = "open_ai", "OpenAI"
        AZURE_OPEN_AI = "azure_open_ai", "Azure OpenAI"
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible (Ollama, vLLM, LM Studio)"
        CUSTOM = "custom", "Custom"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="connections")
    team = models.ForeignKey(
        "accounts_app.Team",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="shared_connections",
        help_text="The team this connection is shared with (read-only for its members).",
    )
    name = models.CharField(max_length=128, validators=[connection_name_validator])
    type = models.CharField(max_length=32, choices=Type.choices)
    configs = models.JSONField(default=dict, blank=True)
    # A MultiFernet token of the JSON object of secrets; only flows_app.services reads it.
    encrypted_secrets = models.TextField(blank=True, default="")
    # The names of the stored secrets (never their values), so pages can list them without decrypting.
    secret_names = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )

    class Meta:
        ordering = ["name", "created_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="connection_name_unique_per_owner"),
        ]

    def __str__(self) -> str:
        return self.name


# --- flow storage -----------------------------------------------------------------------------------


class Blob(models.Model):
    """One distinct file content, addressed by its sha256: identical files are stored once."""

    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    data = models.BinaryField()

    def __str__(self) -> str:
        return f"{self.sha256[:12]} ({self.size} bytes)"


class Snapshot(models.Model):
    """An immutable manifest of a flow folder at one moment: relative POSIX path -> blob sha256."""

    # The sha256 of the canonical manifest JSON, so the same files always give the same row.
    sha256 = models.CharField(max_length=64, primary_key=True)
    manifest = models.JSONField()
    total_size = models.BigIntegerField()
    file_count = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"snapshot {self.sha256[:12]} ({self.file_count} files)"


class Flow(models.Model):
    """A flow folder with a history of versions; `head` is the newest version."""

    class Kind(models.TextChoices):
        DAG = "dag", "DAG"
        FLEX = "flex", "Flex"
        PROMPTY = "prompty", "Prompty"
        UNKNOWN = "", "No flow file"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="flows")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    kind = models.CharField(max_length=16, choices=Kind.choices, blank=True, default="")
    team = models.ForeignKey(
        "accounts_app.Team",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="flows",
        help_text="The team the flow is filed under; its members can view it.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True, help_text="Set while the flow is in the trash.")
    head = models.ForeignKey(
        "FlowVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=models.Q(deleted_at__isnull=True),
                name="flow_name_unique_per_owner",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class FlowVersion(models.Model):
    """One saved state of a flow: who saved which snapshot, when, why, and on top of which version."""

    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    snapshot = models.ForeignKey(Snapshot, on_delete=models.PROTECT, related_name="versions")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    message = models.TextField(blank=True, default="")
    based_on = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")

    class Meta:
        ordering = ["flow_id", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["flow", "number"], name="flow_version_number_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.flow_id} v{self.number}"


class FlowShare(models.Model):
    """A flow shared with one user or one team, as viewer or editor."""

    class Role(models.TextChoices):
        VIEWER = "viewer", "Viewer"
        EDITOR = "editor", "Editor"

    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="shares")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="flow_shares"
    )
    team = models.ForeignKey(
        "accounts_app.Team", on_delete=models.CASCADE, null=True, blank=True, related_name="flow_shares"
    )
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(user__isnull=False, team__isnull=True)
                    | models.Q(user__isnull=True, team__isnull=False)
                ),
                name="flow_share_user_xor_team",
            ),
            models.UniqueConstraint(
                fields=["flow", "user"], condition=models.Q(user__isnull=False), name="flow_share_user_unique"
            ),
            models.UniqueConstraint(
                fields=["flow", "team"], condition=models.Q(team__isnull=False), name="flow_share_team_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.flow_id} -> {self.user_id or self.team_id} ({self.role})"


# --- single tests (owned by the test pane: flows_app.consumers, streaming and the flowtest_* services) -----


class FlowTest(models.Model):
    """One test of a flow from its authoring page: what went in, what came out, its logs and its trace.

    Only the newest FLOWTEST_KEEP tests of a flow are kept (flowtest_start deletes older ones).
    """

    class Status(models.TextChoices):
        RUNNING = "Running", "Running"
        COMPLETED = "Completed", "Completed"
        FAILED = "Failed", "Failed"
        CANCELED = "Canceled", "Canceled"

    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="tests")
    version = models.ForeignKey(FlowVersion, on_delete=models.CASCADE, related_name="tests")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="flow_tests"
    )
    inputs = models.JSONField(default=dict, blank=True)
    outputs = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    # An ErrorInfo dict (code, type, message, node, traceback) when the test failed.
    error = models.JSONField(null=True, blank=True)
    logs = models.JSONField(default=list, blank=True)
    trace = models.JSONField(default=list, blank=True)
    variant = models.CharField(max_length=300, blank=True, default="")
    node = models.CharField(max_length=300, blank=True, default="")
    # Per node: {"status": "completed"|"failed"|"bypassed"|"running", "duration_ms": float}.
    node_runs = models.JSONField(default=dict, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["flow", "-created_at"], name="flowtest_flow_recent")]

    def __str__(self) -> str:
        return f"test {self.pk} of flow {self.flow_id} ({self.status})"
