"""Datasets, batch and evaluation runs, their chunks, line results and logs."""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models


class RawTextEncoder(json.JSONEncoder):
    """JSON with its text as UTF-8 rather than escaped: a lone surrogate cannot be encoded, so the database
    refuses such a value as it refuses NUL, and the writer stores it as U+FFFD (pages cannot show it either)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**options, "ensure_ascii": False})


class Dataset(models.Model):
    """An uploaded jsonl or csv file, kept as a content-addressed blob; validated in full on upload."""

    class Format(models.TextChoices):
        JSONL = "jsonl", "JSON Lines"
        CSV = "csv", "CSV"
        TSV = "tsv", "TSV"
        JSON = "json", "JSON"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    team = models.ForeignKey(
        "accounts_app.Team", on_delete=models.SET_NULL, null=True, blank=True, related_name="datasets"
    )
    name = models.CharField(max_length=200)
    filename = models.CharField(max_length=255)
    blob = models.ForeignKey("flows_app.Blob", on_delete=models.PROTECT, related_name="+")
    format = models.CharField(max_length=8, choices=Format.choices)
    size = models.BigIntegerField(default=0)
    row_count = models.IntegerField()
    columns = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name

    @property
    def blob_sha(self) -> str:
        """The sha256 of the stored file."""
        return self.blob_id


class RunStatus(models.TextChoices):
    """A run's life cycle, with prompt flow's names."""

    QUEUED = "Queued"
    PREPARING = "Preparing"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELING = "Canceling"
    CANCELED = "Canceled"


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING, RunStatus.CANCELING)
FINISHED_STATUSES = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)


class Run(models.Model):
    """A batch run (over a dataset) or an evaluation run (over a base run) of one immutable snapshot."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, unique=True)
    display_name = models.CharField(max_length=255, blank=True, default="")
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs")
    flow = models.ForeignKey(
        "flows_app.Flow", on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    flow_version = models.ForeignKey(
        "flows_app.FlowVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="runs"
    )
    # The files the run executes; never changes after creation (connection overrides are baked in).
    snapshot = models.ForeignKey("flows_app.Snapshot", on_delete=models.PROTECT, related_name="runs")
    flow_kind = models.CharField(max_length=16, blank=True, default="")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, null=True, blank=True, related_name="runs")
    column_mapping = models.JSONField(default=dict, blank=True)
    variant = models.CharField(max_length=255, blank=True, default="")
    base_run = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="evaluations"
    )
    resumed_from = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="resumes"
    )
    connections = models.JSONField(default=dict, blank=True)
    environment_variables = models.JSONField(default=dict, blank=True)
    init = models.JSONField(default=dict, blank=True)
    concurrency = models.PositiveIntegerField(default=32)
    line_timeout = models.PositiveIntegerField(default=600)
    chunk_size = models.PositiveIntegerField(default=100)

    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Set by the one chunk that finishes last; whoever sets it runs the aggregation.
    aggregation_claimed_at = models.DateTimeField(null=True, blank=True)

    total_lines = models.IntegerField(default=0)
    done_lines = models.IntegerField(default=0)
    failed_lines = models.IntegerField(default=0)
    tokens = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.JSONField(null=True, blank=True)
    archived = models.BooleanField(default=False)
    # Evaluation runs the submit wizard asked for, started once this run completes:
    # [{"flow_version": <FlowVersion id>, "column_mapping": {...}}, ...]
    pending_evaluations = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="run_owner_created"),
            models.Index(fields=["status"], name="run_status"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        """Whether the run may still change (queued, preparing, running or canceling)."""
        return self.status in ACTIVE_STATUSES

    @property
    def completed_lines(self) -> int:
        """Lines that finished without error."""
        return self.done_lines - self.failed_lines


class ChunkStatus(models.TextChoices):
    """A chunk's life cycle."""

    QUEUED = "Queued"
    RUNNING = "Running"
    DONE = "Done"
    CANCELED = "Canceled"


class RunChunk(models.Model):
    """A range of line numbers [start, stop) executed by one Celery task; re-delivery computes what is missing."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField()
    stop = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=ChunkStatus.choices, default=ChunkStatus.QUEUED)
    worker = models.CharField(max_length=255, blank=True, default="")
    # The Celery message that holds the claim: the same message delivered again may take the chunk over.
    task_id = models.CharField(max_length=64, blank=True, default="")
    # One execution's fence: heartbeats and writes of an execution that lost its claim stop.
    claim_token = models.CharField(max_length=64, blank=True, default="")
    enqueued_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    tokens = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["run_id", "index"]
        constraints = [models.UniqueConstraint(fields=["run", "index"], name="run_chunk_index_unique")]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="run_chunk_status_hb")]

    def __str__(self) -> str:
        return f"{self.run_id} chunk {self.index} [{self.start}, {self.stop})"


class LineStatus(models.TextChoices):
    """How one line ended."""

    COMPLETED = "Completed"
    FAILED = "Failed"


class LineResult(models.Model):
    """One line's result, written once per (run, line number)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="lines")
    line_number = models.IntegerField()
    status = models.CharField(max_length=16, choices=LineStatus.choices)
    inputs = models.JSONField(encoder=RawTextEncoder, default=dict)
    outputs = models.JSONField(encoder=RawTextEncoder, default=dict)
    error = models.JSONField(encoder=RawTextEncoder, null=True, blank=True)
    duration_ms = models.FloatField(default=0.0)
    usage = models.JSONField(encoder=RawTextEncoder, default=dict)
    aggregation_inputs = models.JSONField(encoder=RawTextEncoder, default=dict)
    trace = models.JSONField(encoder=RawTextEncoder, default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "line_number"]
        constraints = [
            models.UniqueConstraint(fields=["run", "line_number"], name="line_result_run_line_unique")
        ]
        indexes = [models.Index(fields=["run", "status"], name="line_result_run_status")]

    def __str__(self) -> str:
        return f"{self.run_id} line {self.line_number}: {self.status}"


class RunLog(models.Model):
    """One log line of a run; the primary key orders them and serves as the tail cursor (`seq`)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="logs")
    time = models.DateTimeField()
    line_number = models.IntegerField(null=True, blank=True)
    stream = models.CharField(max_length=16, default="stdout")
    text = models.TextField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["run", "id"], name="run_log_run_seq")]

    def __str__(self) -> str:
        return f"{self.run_id} #{self.pk}: {self.text[:40]}"

    @property
    def seq(self) -> int:
        """The position of this line in the run's log (increasing, not contiguous)."""
        return int(self.pk)


# --- online endpoints and their deployments ---------------------------------------------------------------

# Endpoint and deployment names are URL segments (/endpoints/<name>/score): lower-case, 3-32 characters.
ENDPOINT_NAME_PATTERN = r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$"
ENDPOINT_NAME_RULE = "3 to 32 lower-case letters, digits and '-', starting with a letter, not ending with '-'"
endpoint_name_validator = RegexValidator(ENDPOINT_NAME_PATTERN, message=f"Use {ENDPOINT_NAME_RULE}.")


class Endpoint(models.Model):
    """An online endpoint: a stable scoring URL with two keys, splitting its traffic over deployments."""

    name = models.CharField(max_length=32, unique=True, validators=[endpoint_name_validator])
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="endpoints")
    description = models.TextField(blank=True, default="")
    disabled = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """One snapshot served behind an endpoint; only its traffic share ever changes after creation."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(max_length=32, validators=[endpoint_name_validator])
    snapshot = models.ForeignKey("flows_app.Snapshot", on_delete=models.PROTECT, related_name="deployments")
    run = models.ForeignKey(Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="deployments")
    flow = models.ForeignKey(
        "flows_app.Flow", on_delete=models.SET_NULL, null=True, blank=True, related_name="deployments"
    )
    flow_version = models.ForeignKey(
        "flows_app.FlowVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="deployments"
    )
    flow_name = models.CharField(max_length=200, blank=True, default="")
    flow_kind = models.CharField(max_length=16, blank=True, default="")
    # The outputs the endpoint returns; empty means all of them (evaluation-only outputs never are).
    outputs = models.JSONField(default=list, blank=True)
    # A connection name the flow uses -> the endpoint owner's connection that serves it instead.
    connection_overrides = models.JSONField(default=dict, blank=True)
    variant = models.CharField(max_length=255, blank=True, default="")
    init = models.JSONField(default=dict, blank=True)
    environment_variables = models.JSONField(default=dict, blank=True)
    instance_count = models.PositiveSmallIntegerField(default=1)
    traffic = models.PositiveSmallIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["endpoint_id", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "name"], name="deployment_name_unique_per_endpoint")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id}/{self.name}"


class EndpointKey(models.Model):
    """One of an endpoint's two keys, stored only as the sha256 of the key."""

    class Slot(models.TextChoices):
        PRIMARY = "primary", "Primary"
        SECONDARY = "secondary", "Secondary"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="keys")
    slot = models.CharField(max_length=16, choices=Slot.choices)
    key_hash = models.CharField(max_length=64, unique=True)
    # The first characters of the key, so its owner can tell keys apart; not enough to guess the rest.
    prefix = models.CharField(max_length=16)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["endpoint_id", "slot"]
        constraints = [models.UniqueConstraint(fields=["endpoint", "slot"], name="endpoint_key_slot_unique")]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.slot} {self.prefix}…"


class EndpointRequest(models.Model):
    """One scoring request, written in batches after its response for the Monitoring tab."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="requests")
    deployment = models.ForeignKey(
        Deployment, on_delete=models.SET_NULL, null=True, blank=True, related_name="requests"
    )
    time = models.DateTimeField()
    status = models.PositiveSmallIntegerField()
    latency_ms = models.FloatField()
    streamed = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=32, blank=True, default="")

    class Meta:
        ordering = ["-time", "-id"]
        indexes = [models.Index(fields=["endpoint", "time"], name="endpoint_request_time")]

    def __str__(self) -> str:
        return f"{self.endpoint_id} {self.time:%Y-%m-%d %H:%M:%S} {self.status}"
