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
