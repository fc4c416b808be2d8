"""Datasets, batch and evaluation runs, their chunks, line results and logs."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


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
    inputs = models.JSONField(default=dict)
    outputs = models.JSONField(default=dict)
    error = models.JSONField(null=True, blank=True)
    duration_ms = models.FloatField(default=0.0)
    usage = models.JSONField(default=dict)
    aggregation_inputs = models.JSONField(default=dict)
    trace = models.JSONField(default=list)
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
