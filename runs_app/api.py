"""REST routes of the runs app under /api/v1/ (TokenAuth is applied to the whole API in studio/api.py).

Runs are addressed by id or by name, as `pf run show -n NAME` does; anything the caller may not see is 404.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from ninja import File, Form, Query, Router, Schema, Status
from ninja.errors import HttpError
from ninja.files import UploadedFile
from pydantic import Field

from runs_app import selectors, services
from runs_app.models import Dataset, LineResult, Run, RunLog

router = Router(tags=["runs"])

MAX_DATASET_BYTES = 200 * 1024 * 1024


class ErrorOut(Schema):
    """An error with the messages of each field at fault."""

    detail: str
    errors: dict[str, list[str]] = Field(default_factory=dict)


class DatasetOut(Schema):
    """A stored dataset: jsonl or csv rows kept as one blob."""

    id: int
    name: str
    filename: str
    format: str
    size: int
    row_count: int
    columns: list[str]
    blob_sha: str
    owner: str
    created_at: datetime


class DatasetDetailOut(DatasetOut):
    """A dataset with its first rows."""

    preview: list[dict[str, Any]]


class ProgressOut(Schema):
    """Live progress of a run."""

    status: str
    total: int
    done: int
    failed: int
    percent: float
    tokens: dict[str, int]
    started_at: str | None
    finished_at: str | None


class RunOut(Schema):
    """A run as `pf run show` shows it, plus the studio's links."""

    id: UUID
    name: str
    display_name: str
    description: str
    tags: dict[str, str]
    status: Literal["Queued", "Preparing", "Running", "Completed", "Failed", "Canceling", "Canceled"]
    owner: str
    flow: str | None
    flow_id: int | None
    flow_version: int | None
    flow_kind: str
    snapshot: str
    dataset_id: int | None
    run: str | None = Field(description="The base run of an evaluation run.")
    resumed_from: str | None
    column_mapping: dict[str, Any]
    variant: str | None
    connections: dict[str, Any]
    environment_variables: dict[str, str]
    init: dict[str, Any]
    concurrency: int
    line_timeout: int
    total_lines: int
    completed_lines: int
    failed_lines: int
    tokens: dict[str, int]
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    archived: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None


class RunIn(Schema):
    """A new run: the fields of prompt flow's run.yml, with the flow and data taken from the studio."""

    flow: str | None = Field(default=None, description="`name` or `name@version` of a flow you can see.")
    flow_id: int | None = None
    flow_version: int | None = Field(default=None, description="Version number (the head when left out).")
    dataset: int | None = Field(default=None, description="Id of an uploaded dataset.")
    data: str | None = Field(
        default=None, description="A data file inside the flow's folder, e.g. data.jsonl."
    )
    run: str | None = Field(default=None, description="Name or id of a Completed run to evaluate.")
    column_mapping: dict[str, Any] = Field(default_factory=dict)
    variant: str | None = Field(default=None, description="`${node.variant_id}`")
    name: str | None = None
    display_name: str = ""
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    connections: dict[str, Any] = Field(
        default_factory=dict,
        description="`{node: {connection: name, deployment_name: x}}` or `{connection: other_connection}`.",
    )
    environment_variables: dict[str, str] = Field(default_factory=dict)
    init: dict[str, Any] = Field(default_factory=dict)
    concurrency: int | None = Field(default=None, ge=1, le=services.MAX_CONCURRENCY)
    line_timeout: int | None = Field(default=None, ge=1)


class RunPatch(Schema):
    """What `pf run update --set` may change."""

    display_name: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None


class RerunIn(Schema):
    """Lines to compute again in a new run."""

    line_numbers: list[int]
    name: str | None = None


class EvaluateIn(Schema):
    """A new evaluation run over a finished run."""

    flow: str | None = None
    flow_id: int | None = None
    flow_version: int | None = None
    column_mapping: dict[str, Any] = Field(default_factory=dict)
    dataset: int | None = None
    name: str | None = None
    display_name: str = ""
    concurrency: int | None = Field(default=None, ge=1, le=services.MAX_CONCURRENCY)


class LineOut(Schema):
    """One line of a run: its inputs, outputs, status and error."""

    line_number: int
    status: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    error: dict[str, Any] | None
    duration_ms: float
    usage: dict[str, Any]


class LineDetailOut(LineOut):
    """One line with its trace spans."""

    trace: list[dict[str, Any]]


class DetailsOut(Schema):
    """One page of a run's lines."""

    run: str
    page: int
    per_page: int
    pages: int
    total: int
    lines: list[LineOut]


class LogOut(Schema):
    """One log line; pass the last `seq` as `after` to get what follows."""

    seq: int
    time: datetime
    line_number: int | None
    stream: str
    text: str


class LogsOut(Schema):
    """A slice of a run's log."""

    run: str
    status: str
    lines: list[LogOut]
    next_after: int


class MetricsOut(Schema):
    """A run's metrics (`pf run show-metrics`) and system metrics."""

    run: str
    status: str
    metrics: dict[str, Any]
    system: dict[str, Any]


class RunListFilters(Schema):
    """Filters of the run list."""

    flow_id: int | None = None
    status: str | None = None
    tag: str | None = Field(default=None, description="`key` or `key=value`")
    author: str | None = None
    search: str | None = None
    archived: Literal["exclude", "only", "include"] = "exclude"
    base_run: str | None = None
    limit: int = Field(default=50, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=2**31 - 1)


def _user(request: HttpRequest) -> AbstractBaseUser:
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, AbstractBaseUser) else request.user  # type: ignore[return-value]


def _dataset_out(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.pk,
        "name": dataset.name,
        "filename": dataset.filename,
        "format": dataset.format,
        "size": dataset.size,
        "row_count": dataset.row_count,
        "columns": list(dataset.columns or []),
        "blob_sha": dataset.blob_id,
        "owner": dataset.owner.get_username(),
        "created_at": dataset.created_at,
    }


def run_out(run: Run) -> dict[str, Any]:
    """The API form of a run (also what `flowstudio run show --server` prints)."""
    duration = None
    if run.started_at and run.finished_at:
        duration = round((run.finished_at - run.started_at).total_seconds(), 3)
    return {
        "id": run.pk,
        "name": run.name,
        "display_name": run.display_name,
        "description": run.description,
        "tags": run.tags or {},
        "status": run.status,
        "owner": run.owner.get_username(),
        "flow": run.flow.name if run.flow_id else None,
        "flow_id": run.flow_id,
        "flow_version": run.flow_version.number if run.flow_version_id else None,
        "flow_kind": run.flow_kind,
        "snapshot": run.snapshot_id,
        "dataset_id": run.dataset_id,
        "run": run.base_run.name if run.base_run_id else None,
        "resumed_from": run.resumed_from.name if run.resumed_from_id else None,
        "column_mapping": run.column_mapping or {},
        "variant": run.variant or None,
        "connections": run.connections or {},
        "environment_variables": run.environment_variables or {},
        "init": run.init or {},
        "concurrency": run.concurrency,
        "line_timeout": run.line_timeout,
        "total_lines": run.total_lines,
        "completed_lines": run.done_lines - run.failed_lines,
        "failed_lines": run.failed_lines,
        "tokens": selectors.run_tokens(run),
        "metrics": run.metrics or {},
        "error": run.error,
        "archived": run.archived,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_s": duration,
    }


def _line_out(line: LineResult) -> dict[str, Any]:
    return {
        "line_number": line.line_number,
        "status": line.status,
        "inputs": line.inputs or {},
        "outputs": line.outputs or {},
        "error": line.error,
        "duration_ms": line.duration_ms,
        "usage": line.usage or {},
    }


def _log_out(log: RunLog) -> dict[str, Any]:
    return {
        "seq": log.pk,
        "time": log.time,
        "line_number": log.line_number,
        "stream": log.stream,
        "text": log.text,
    }


def _run_error(exc: services.RunError | services.DatasetError) -> ErrorOut:
    if isinstance(exc, services.DatasetError):
        return ErrorOut(detail=str(exc), errors={"data": exc.problems})
    field = exc.field or "__all__"
    return ErrorOut(detail=str(exc), errors={field: [str(exc)]})


def _owned(request: HttpRequest, run_ref: str) -> tuple[AbstractBaseUser, Run]:
    user = _user(request)
    run = selectors.run_get_for(user, run_ref)
    if not selectors.run_can_change(user, run):
        raise HttpError(403, f"Only the owner of run {run.name} may change it.")
    return user, run


def _flow_version(user: AbstractBaseUser, flow: str | None, flow_id: int | None, number: int | None) -> Any:
    from django.http import Http404

    from flows_app.selectors import flow_version_get_for

    if flow_id is not None:
        try:
            return flow_version_get_for(user, flow_id, number)
        except Http404 as exc:
            raise services.RunError(str(exc), field="flow") from None
    if flow:
        ref = flow if number is None or "@" in flow else f"{flow}@{number}"
        return services.flow_version_from_ref(user, ref)
    raise services.RunError("give `flow` (name or name@version) or `flow_id`", field="flow")


# --- datasets ---------------------------------------------------------------------------------------------------


@router.post(
    "/datasets", response={201: DatasetOut, 422: ErrorOut}, summary="Upload a dataset (jsonl or csv)"
)
def datasets_create(request: HttpRequest, file: File[UploadedFile], name: Form[str] = "") -> Status[Any]:
    """Every line is checked first; a broken line is reported by number and nothing is stored."""
    if file.size and file.size > MAX_DATASET_BYTES:
        return Status(422, ErrorOut(detail=f"{file.name}: larger than {MAX_DATASET_BYTES:,} bytes"))
    try:
        dataset = services.dataset_create(
            owner=_user(request), name=name, filename=file.name or "data.jsonl", data=file.read()
        )
    except (services.DatasetError, services.RunError) as exc:
        return Status(422, _run_error(exc))
    return Status(201, _dataset_out(dataset))


@router.get("/datasets", response=list[DatasetOut], summary="List your datasets and shared ones")
def datasets_list(request: HttpRequest) -> list[dict[str, Any]]:
    """Datasets you own or that are shared with your teams, newest first."""
    return [_dataset_out(d) for d in selectors.dataset_list_for(_user(request))]


@router.get("/datasets/{dataset_id}", response=DatasetDetailOut, summary="Show a dataset with its first rows")
def datasets_get(request: HttpRequest, dataset_id: int, rows: int = 20) -> dict[str, Any]:
    """One dataset, with up to `rows` rows of preview."""
    dataset = selectors.dataset_get_for(_user(request), dataset_id)
    out = _dataset_out(dataset)
    out["preview"] = selectors.dataset_preview(dataset, limit=max(0, min(rows, 1000)))
    return out


# --- runs --------------------------------------------------------------------------------------------------------


@router.post("/runs", response={201: RunOut, 422: ErrorOut}, summary="Create a run")
def runs_create(request: HttpRequest, payload: RunIn) -> Status[Any]:
    """Submit a batch run (dataset or a data file of the flow) or an evaluation run (`run`)."""
    user = _user(request)
    try:
        version = _flow_version(user, payload.flow, payload.flow_id, payload.flow_version)
        dataset = selectors.dataset_get_for(user, payload.dataset) if payload.dataset is not None else None
        base_run = selectors.run_get_for(user, payload.run) if payload.run else None
        run = services.run_create(
            user=user,
            flow_version=version,
            dataset=dataset,
            data_path=payload.data,
            column_mapping=payload.column_mapping,
            variant=payload.variant,
            base_run=base_run,
            name=payload.name,
            display_name=payload.display_name,
            description=payload.description,
            tags=payload.tags,
            connections=payload.connections,
            environment_variables=payload.environment_variables,
            init=payload.init,
            concurrency=payload.concurrency,
            line_timeout=payload.line_timeout,
        )
    except (services.RunError, services.DatasetError) as exc:
        return Status(422, _run_error(exc))
    return Status(201, run_out(run))


@router.post("/runs/yaml", response={201: RunOut, 422: ErrorOut}, summary="Create a run from a run.yml")
def runs_create_from_yaml(
    request: HttpRequest, run_yml: File[UploadedFile], folder: UploadedFile | None = File(None)
) -> Status[Any]:
    """prompt flow's run.yml; `folder` is an optional zip of the files it refers to (paths relative to it)."""
    from flows_app.services import FlowImportError, zip_read_checked

    files: dict[str, bytes] = {}
    try:
        if folder is not None:
            try:
                files, _ = zip_read_checked(data=folder.read())
            except FlowImportError as exc:
                raise services.RunError(f"folder: {exc}", field="folder") from None
        run = services.run_create_from_yaml(user=_user(request), run_yml=run_yml.read(), files=files)
    except (services.RunError, services.DatasetError) as exc:
        return Status(422, _run_error(exc))
    return Status(201, run_out(run))


@router.get("/runs", response=list[RunOut], summary="List runs")
def runs_list(request: HttpRequest, filters: Query[RunListFilters]) -> list[dict[str, Any]]:
    """Runs you own or whose flow you can see, newest first (like `pf run list`)."""
    user = _user(request)
    archived = {"exclude": False, "only": True, "include": None}[filters.archived]
    base = selectors.run_get_for(user, filters.base_run) if filters.base_run else None
    flow = None
    if filters.flow_id is not None:
        from flows_app.selectors import flow_get_for

        flow = flow_get_for(user, filters.flow_id)
    runs = selectors.run_list_for(
        user,
        flow=flow,
        status=filters.status,
        tag=filters.tag,
        author=filters.author,
        search=filters.search,
        archived=archived,
        base_run=base,
    ).select_related("resumed_from")
    return [run_out(r) for r in runs[filters.offset : filters.offset + filters.limit]]


@router.get("/runs/{run_ref}", response=RunOut, summary="Show a run")
def runs_get(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """One run by id or name."""
    return run_out(selectors.run_get_for(_user(request), run_ref))


@router.get("/runs/{run_ref}/progress", response=ProgressOut, summary="A run's progress (for polling)")
def runs_progress(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """Status, line counts, percent and tokens."""
    return selectors.run_progress(selectors.run_get_for(_user(request), run_ref))


@router.patch("/runs/{run_ref}", response={200: RunOut, 403: ErrorOut}, summary="Update a run")
def runs_update(request: HttpRequest, run_ref: str, payload: RunPatch) -> dict[str, Any]:
    """Change display name, description or tags."""
    user, run = _owned(request, run_ref)
    run = services.run_update(
        user=user,
        run=run,
        display_name=payload.display_name,
        description=payload.description,
        tags=payload.tags,
    )
    return run_out(run)


@router.get("/runs/{run_ref}/details", summary="A run's lines (paginated; format=json or csv)")
def runs_details(
    request: HttpRequest,
    run_ref: str,
    page: int = 1,
    per_page: int = 100,
    search: str = "",
    status: str | None = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    """Inputs, outputs, status and error per line, in line order (like `pf run show-details`)."""
    run = selectors.run_get_for(_user(request), run_ref)
    result = selectors.run_lines_page(run, page=page, per_page=per_page, search=search, status=status)
    lines = [_line_out(line) for line in result.object_list]
    if format == "csv":
        return _details_csv(run, lines)
    return DetailsOut(
        run=run.name,
        page=result.number,
        per_page=result.paginator.per_page,
        pages=result.paginator.num_pages,
        total=result.paginator.count,
        lines=lines,
    )


def _details_csv(run: Run, lines: list[dict[str, Any]]) -> HttpResponse:
    import json

    input_keys: dict[str, None] = {}
    output_keys: dict[str, None] = {}
    for line in lines:
        input_keys.update(dict.fromkeys(line["inputs"]))
        output_keys.update(dict.fromkeys(line["outputs"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["line_number", "status"]
        + [f"inputs.{k}" for k in input_keys]
        + [f"outputs.{k}" for k in output_keys]
        + ["error"]
    )

    def cell(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)

    for line in lines:
        writer.writerow(
            [line["line_number"], line["status"]]
            + [cell(line["inputs"].get(k, "")) for k in input_keys]
            + [cell(line["outputs"].get(k, "")) for k in output_keys]
            + [(line["error"] or {}).get("message", "")]
        )
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{run.name}-details.csv"'
    return response


@router.get("/runs/{run_ref}/lines/{line_number}", response=LineDetailOut, summary="One line with its trace")
def runs_line(request: HttpRequest, run_ref: str, line_number: int) -> dict[str, Any]:
    """A line's inputs, outputs, error and trace spans."""
    line = selectors.run_line_get(selectors.run_get_for(_user(request), run_ref), line_number)
    out = _line_out(line)
    out["trace"] = line.trace or []
    return out


@router.get("/runs/{run_ref}/metrics", response=MetricsOut, summary="A run's metrics")
def runs_metrics(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """The aggregation's metrics plus prompt flow's system metrics (`__pf__.lines.*`, tokens)."""
    run = selectors.run_get_for(_user(request), run_ref)
    tokens = selectors.run_tokens(run)
    system: dict[str, Any] = {
        "__pf__.lines.completed": run.done_lines - run.failed_lines,
        "__pf__.lines.failed": run.failed_lines,
        **tokens,
    }
    if run.started_at and run.finished_at:
        system["duration"] = round((run.finished_at - run.started_at).total_seconds(), 3)
    return {"run": run.name, "status": run.status, "metrics": run.metrics or {}, "system": system}


@router.get("/runs/{run_ref}/logs", response=LogsOut, summary="A run's log after a position")
def runs_logs(request: HttpRequest, run_ref: str, after: int = 0, limit: int = 500) -> dict[str, Any]:
    """Log lines after `after` (a previous `seq`, 0 for the start), oldest first."""
    run = selectors.run_get_for(_user(request), run_ref)
    logs = selectors.run_logs_tail(run, after_seq=after, limit=limit)
    return {
        "run": run.name,
        "status": run.status,
        "lines": [_log_out(log) for log in logs],
        "next_after": logs[-1].pk if logs else after,
    }


@router.post("/runs/{run_ref}/cancel", response={200: RunOut, 403: ErrorOut}, summary="Cancel a run")
def runs_cancel(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """Queued chunks never start; running ones stop within seconds."""
    user, run = _owned(request, run_ref)
    return run_out(services.run_cancel(user=user, run=run))


@router.post(
    "/runs/{run_ref}/resume", response={201: RunOut, 403: ErrorOut, 422: ErrorOut}, summary="Resume a run"
)
def runs_resume(request: HttpRequest, run_ref: str, name: str | None = None) -> Status[Any]:
    """A new run reusing the completed lines and computing only failed or missing ones."""
    user, run = _owned(request, run_ref)
    try:
        return Status(201, run_out(services.run_resume(user=user, run=run, name=name)))
    except services.RunError as exc:
        return Status(422, _run_error(exc))


@router.post(
    "/runs/{run_ref}/rerun", response={201: RunOut, 403: ErrorOut, 422: ErrorOut}, summary="Rerun lines"
)
def runs_rerun(request: HttpRequest, run_ref: str, payload: RerunIn) -> Status[Any]:
    """A new run computing the given lines again and reusing the others."""
    user, run = _owned(request, run_ref)
    try:
        rerun = services.run_rerun_lines(
            user=user, run=run, line_numbers=payload.line_numbers, name=payload.name
        )
        return Status(201, run_out(rerun))
    except services.RunError as exc:
        return Status(422, _run_error(exc))


@router.post(
    "/runs/{run_ref}/evaluations", response={201: RunOut, 422: ErrorOut}, summary="Evaluate a finished run"
)
def runs_evaluate(request: HttpRequest, run_ref: str, payload: EvaluateIn) -> Status[Any]:
    """A new evaluation run over this run's outputs; the run itself is not run again."""
    user = _user(request)
    run = selectors.run_get_for(user, run_ref)
    try:
        version = _flow_version(user, payload.flow, payload.flow_id, payload.flow_version)
        dataset = (
            selectors.dataset_get_for(user, payload.dataset) if payload.dataset is not None else run.dataset
        )
        evaluation = services.run_evaluate(
            user=user,
            run=run,
            flow_version=version,
            column_mapping=payload.column_mapping,
            dataset=dataset,
            name=payload.name,
            display_name=payload.display_name,
            concurrency=payload.concurrency,
        )
    except services.RunError as exc:
        return Status(422, _run_error(exc))
    return Status(201, run_out(evaluation))


@router.post("/runs/{run_ref}/archive", response={200: RunOut, 403: ErrorOut}, summary="Archive a run")
def runs_archive(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """Hide the run from the default list."""
    user, run = _owned(request, run_ref)
    return run_out(services.run_archive(user=user, run=run, archived=True))


@router.post(
    "/runs/{run_ref}/restore", response={200: RunOut, 403: ErrorOut}, summary="Restore an archived run"
)
def runs_restore(request: HttpRequest, run_ref: str) -> dict[str, Any]:
    """Show the run in the default list again."""
    user, run = _owned(request, run_ref)
    return run_out(services.run_archive(user=user, run=run, archived=False))


@router.delete("/runs/{run_ref}", response={204: None, 403: ErrorOut, 422: ErrorOut}, summary="Delete a run")
def runs_delete(request: HttpRequest, run_ref: str) -> Status[Any]:
    """Delete a finished run with its lines and logs (irreversible)."""
    user, run = _owned(request, run_ref)
    try:
        services.run_delete(user=user, run=run)
    except (services.RunError, PermissionDenied) as exc:
        return Status(422, ErrorOut(detail=str(exc)))
    return Status(204, None)


# --- online endpoints and deployments ----------------------------------------------------------------------------


class DeploymentIn(Schema):
    """Deploy a run's snapshot (or a flow's version) behind an endpoint, creating the endpoint if it is new."""

    run: str | None = Field(default=None, description="run id or name (its snapshot is deployed)")
    flow: str | None = Field(default=None, description="flow name or name@version, instead of a run")
    flow_id: int | None = None
    flow_version: int | None = None
    endpoint: str
    deployment: str = "blue"
    new_endpoint: bool | None = Field(default=None, description="true: must create; false: must exist")
    outputs: list[str] | None = Field(default=None, description="outputs the endpoint returns (default all)")
    connections: dict[str, str] = Field(default_factory=dict, description="flow connection -> yours")
    instance_count: int = 1
    description: str = ""


class EndpointKeysOut(Schema):
    """An endpoint's keys in plain text: only in the answer that created or regenerated them."""

    primary: str | None = None
    secondary: str | None = None


class DeploymentOut(Schema):
    """One deployment of an endpoint."""

    name: str
    traffic: int
    snapshot: str
    run: str | None
    flow: str
    flow_version: int | None
    flow_kind: str
    outputs: list[str]
    connections: dict[str, str]
    instance_count: int
    created_at: datetime


class EndpointOut(Schema):
    """An endpoint with its deployments and key prefixes (never the keys)."""

    name: str
    scoring_uri: str
    swagger_uri: str
    disabled: bool
    description: str
    auth_mode: str
    key_prefixes: dict[str, str]
    deployments: list[DeploymentOut]
    traffic: dict[str, int]
    created_at: datetime


class DeploymentCreatedOut(Schema):
    """The new deployment, its endpoint, and the keys when the endpoint is new (shown this once)."""

    endpoint: EndpointOut
    deployment: DeploymentOut
    keys: EndpointKeysOut | None


class EndpointPatch(Schema):
    """Traffic split (deployment -> percent, adding up to 100 or 0), disabled flag, description."""

    traffic: dict[str, int] | None = None
    disabled: bool | None = None
    description: str | None = None


class KeyRegenerateIn(Schema):
    """Which key to replace."""

    key_type: Literal["primary", "secondary"] = "primary"


class KeyRegeneratedOut(Schema):
    """The new key, in plain text this once."""

    key_type: str
    key: str


def _deployment_out(deployment: Any) -> dict[str, Any]:
    return {
        "name": deployment.name,
        "traffic": deployment.traffic,
        "snapshot": deployment.snapshot_id,
        "run": deployment.run.name if deployment.run_id else None,
        "flow": deployment.flow_name,
        "flow_version": deployment.flow_version.number if deployment.flow_version_id else None,
        "flow_kind": deployment.flow_kind,
        "outputs": list(deployment.outputs or []),
        "connections": dict(deployment.connection_overrides or {}),
        "instance_count": deployment.instance_count,
        "created_at": deployment.created_at,
    }


def endpoint_out(request: HttpRequest, endpoint: Any) -> dict[str, Any]:
    """The API form of an endpoint (what `flowstudio deploy` prints)."""
    deployments = list(endpoint.deployments.all())
    return {
        "name": endpoint.name,
        "scoring_uri": request.build_absolute_uri(f"/endpoints/{endpoint.name}/score"),
        "swagger_uri": request.build_absolute_uri(f"/endpoints/{endpoint.name}/swagger.json"),
        "disabled": endpoint.disabled,
        "description": endpoint.description,
        "auth_mode": "key",
        "key_prefixes": {k.slot: k.prefix for k in selectors.endpoint_keys_of(endpoint).values()},
        "deployments": [_deployment_out(d) for d in deployments],
        "traffic": {d.name: d.traffic for d in deployments},
        "created_at": endpoint.created_at,
    }


def _endpoint_error(exc: services.EndpointError) -> ErrorOut:
    return ErrorOut(detail=str(exc), errors={exc.field or "__all__": [str(exc)]})


@router.post(
    "/deployments",
    response={201: DeploymentCreatedOut, 404: ErrorOut, 409: ErrorOut, 422: ErrorOut},
    summary="Deploy a run (or a flow version) to an endpoint",
    tags=["endpoints"],
)
def deployments_create(request: HttpRequest, payload: DeploymentIn) -> Status[Any]:
    """The endpoint is created when it does not exist yet; its two keys are in this answer only."""
    user = _user(request)
    run = None
    version = None
    try:
        if payload.run:
            run = selectors.run_get_for(user, payload.run)
        else:
            version = _flow_version(user, payload.flow, payload.flow_id, payload.flow_version)
        deployment, keys = services.deployment_create(
            user=user,
            endpoint=payload.endpoint,
            deployment=payload.deployment,
            run=run,
            flow_version=version,
            new_endpoint=payload.new_endpoint,
            outputs=payload.outputs,
            connections=payload.connections,
            instance_count=payload.instance_count,
            description=payload.description,
        )
    except services.EndpointError as exc:
        return Status(exc.status, _endpoint_error(exc))
    except services.RunError as exc:
        return Status(422, _run_error(exc))
    endpoint = selectors.endpoint_get_for(user, deployment.endpoint.name)
    created = next(d for d in endpoint.deployments.all() if d.pk == deployment.pk)
    return Status(
        201,
        {
            "endpoint": endpoint_out(request, endpoint),
            "deployment": _deployment_out(created),
            "keys": {"primary": keys.primary, "secondary": keys.secondary} if keys else None,
        },
    )


@router.get("/endpoints", response=list[EndpointOut], summary="List your endpoints", tags=["endpoints"])
def endpoints_list(request: HttpRequest) -> list[dict[str, Any]]:
    """Your endpoints with their deployments and traffic split."""
    return [endpoint_out(request, e) for e in selectors.endpoint_list_for(_user(request))]


@router.get("/endpoints/{name}", response=EndpointOut, summary="Show an endpoint", tags=["endpoints"])
def endpoints_get(request: HttpRequest, name: str) -> dict[str, Any]:
    """One of your endpoints; anyone else's is 404."""
    return endpoint_out(request, selectors.endpoint_get_for(_user(request), name))


@router.patch(
    "/endpoints/{name}",
    response={200: EndpointOut, 422: ErrorOut},
    summary="Change an endpoint's traffic split or disable it",
    tags=["endpoints"],
)
def endpoints_update(request: HttpRequest, name: str, payload: EndpointPatch) -> Status[Any]:
    """Deployments left out of `traffic` get 0%; the shares add up to 100 (or 0 to stop serving)."""
    user = _user(request)
    endpoint = selectors.endpoint_get_for(user, name)
    try:
        services.endpoint_update(
            user=user,
            endpoint=endpoint,
            traffic=payload.traffic,
            disabled=payload.disabled,
            description=payload.description,
        )
    except services.EndpointError as exc:
        return Status(exc.status, _endpoint_error(exc))
    return Status(200, endpoint_out(request, selectors.endpoint_get_for(user, name)))


@router.post(
    "/endpoints/{name}/keys/regenerate",
    response={200: KeyRegeneratedOut, 422: ErrorOut},
    summary="Regenerate an endpoint key",
    tags=["endpoints"],
)
def endpoints_key_regenerate(request: HttpRequest, name: str, payload: KeyRegenerateIn) -> Status[Any]:
    """The old key fails from the next request; the other key keeps working."""
    user = _user(request)
    endpoint = selectors.endpoint_get_for(user, name)
    try:
        key = services.endpoint_key_regenerate(user=user, endpoint=endpoint, slot=payload.key_type)
    except services.EndpointError as exc:
        return Status(exc.status, _endpoint_error(exc))
    return Status(200, {"key_type": payload.key_type, "key": key})


@router.delete("/endpoints/{name}", response={204: None}, summary="Delete an endpoint", tags=["endpoints"])
def endpoints_delete(request: HttpRequest, name: str) -> Status[Any]:
    """Delete the endpoint with its deployments and request history; its keys stop working."""
    user = _user(request)
    services.endpoint_delete(user=user, endpoint=selectors.endpoint_get_for(user, name))
    return Status(204, None)


@router.delete(
    "/endpoints/{name}/deployments/{deployment}",
    response={204: None, 422: ErrorOut},
    summary="Delete a deployment",
    tags=["endpoints"],
)
def deployments_delete(request: HttpRequest, name: str, deployment: str) -> Status[Any]:
    """Only a deployment without traffic (or the endpoint's last one) can go."""
    user = _user(request)
    try:
        services.deployment_delete(user=user, deployment=selectors.deployment_get_for(user, name, deployment))
    except services.EndpointError as exc:
        return Status(exc.status, _endpoint_error(exc))
    return Status(204, None)
