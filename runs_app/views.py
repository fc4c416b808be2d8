"""Pages of the runs app: thin views over the selectors and services."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from flows_app.selectors import flow_list_for
from flows_app.services import snapshot_zip
from runs_app import selectors, services
from runs_app.forms import (
    DatasetUploadForm,
    LineSelectionForm,
    RunFilterForm,
    RunSubmitForm,
    RunYamlForm,
)

LIST = "runs_app/list.html"
NEW = "runs_app/new.html"
DATASETS = "runs_app/datasets.html"
DATASET = "runs_app/dataset.html"
STATUS = "runs_app/_status.html"
OVERVIEW = "runs_app/run/overview.html"
OUTPUTS = "runs_app/run/outputs.html"
METRICS = "runs_app/run/metrics.html"
LOGS = "runs_app/run/logs.html"
TRACE = "runs_app/run/trace.html"
SNAPSHOT = "runs_app/run/snapshot.html"
DELETE = "runs_app/run/delete.html"
LOG_PAGE = 500


def _go(request: HttpRequest, url: str) -> HttpResponse:
    """A redirect that also works for htmx requests (the whole page moves, not a fragment)."""
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


def _run_page(request: HttpRequest, run_id: UUID, template: str, tab: str, **extra: Any) -> HttpResponse:
    """Render one tab of a run page: the run (404 unless visible), its progress and the tab's own context."""
    run = extra.pop("run", None) or selectors.run_get_for(request.user, run_id)
    context = {"run": run, "progress": selectors.run_progress(run), "tab": tab, **extra}
    return render(request, template, context)


# --- datasets ---------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def dataset_list(request: HttpRequest) -> HttpResponse:
    """The user's datasets and an upload form; a broken file is refused with its line numbers, nothing kept."""
    form = DatasetUploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = services.dataset_create(owner=request.user, **form.service_kwargs())
        except services.DatasetError as error:
            form.add_error("file", str(error))
        else:
            messages.success(request, f"Dataset “{dataset.name}” uploaded: {dataset.row_count} rows.")
            return _go(request, reverse("runs:dataset", args=[dataset.pk]))
    status = 422 if form.errors else 200
    template = f"{DATASETS}#upload" if request.htmx else DATASETS
    context = {"form": form, "datasets": selectors.dataset_list_for(request.user)}
    return render(request, template, context, status=status)


@login_required
@require_GET
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A dataset's columns, row count and first rows."""
    dataset = selectors.dataset_get_for(request.user, pk)
    rows = selectors.dataset_preview(dataset, limit=20)
    return render(request, DATASET, {"dataset": dataset, "rows": rows})


# --- submit -----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def run_new(request: HttpRequest) -> HttpResponse:
    """The submit wizard; htmx re-renders the flow-dependent steps while the user picks (`?part=`)."""
    base = request.GET.get("base") or request.POST.get("base_run")
    base_run = selectors.run_get_for(request.user, base) if base else None
    data = request.POST if request.method == "POST" else None
    form = RunSubmitForm(data, user=request.user, query=request.GET, base_run=base_run)
    if request.method == "POST" and form.is_valid():
        try:
            runs = services.run_submit(user=request.user, **form.service_kwargs())
        except ValidationError as error:
            form.add_error(None, error)
        else:
            messages.success(request, f"Submitted {len(runs)} run{'s' if len(runs) != 1 else ''}.")
            target = reverse("runs:detail", args=[runs[0].pk]) if len(runs) == 1 else reverse("runs:list")
            return _go(request, target)
    part = request.GET.get("part", "")
    template = f"{NEW}#{part}" if request.htmx and part in {"flow-steps", "evaluation"} else NEW
    context = {"form": form, "base_run": base_run, "yaml_form": RunYamlForm()}
    return render(request, template, context, status=422 if form.errors else 200)


@login_required
@require_POST
def run_new_yaml(request: HttpRequest) -> HttpResponse:
    """Submit from a prompt flow run.yml (and the data file it names)."""
    form = RunYamlForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            run = services.run_create_from_yaml(user=request.user, **form.service_kwargs())
        except ValidationError as error:
            form.add_error("run_yml", error)
        else:
            messages.success(request, f"Run “{run.name}” submitted from run.yml.")
            return _go(request, reverse("runs:detail", args=[run.pk]))
    wizard = RunSubmitForm(user=request.user, query={})
    context = {"form": wizard, "yaml_form": form, "base_run": None, "yaml_open": True}
    return render(request, f"{NEW}#yaml" if request.htmx else NEW, context, status=422)


# --- list and run pages -----------------------------------------------------------------------------


@login_required
@require_GET
def run_list(request: HttpRequest) -> HttpResponse:
    """The runs the user can see, filtered by the query string; htmx gets just the rows."""
    form = RunFilterForm(request.GET, flows=flow_list_for(request.user))
    runs = selectors.run_list_for(request.user, **form.selector_kwargs())
    page = selectors.paginate(runs, page=request.GET.get("page"), per_page=50)
    template = f"{LIST}#rows" if request.htmx else LIST
    return render(request, template, {"form": form, "page": page, "query": request.GET.urlencode()})


@login_required
@require_GET
def run_detail(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Overview tab: status, live progress, timings, tokens, lineage and settings."""
    run = selectors.run_get_for(request.user, run_id)
    evaluations = selectors.run_evaluations_for(request.user, run)
    return _run_page(request, run_id, OVERVIEW, "overview", run=run, evaluations=evaluations)


@login_required
@require_GET
def run_status(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The `_status.html` fragment that run pages poll about once a second when the websocket is not live."""
    run = selectors.run_get_for(request.user, run_id)
    return render(request, STATUS, {"run": run, "progress": selectors.run_progress(run)})


@login_required
@require_GET
def run_outputs(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Outputs tab: inputs and outputs per line, paginated and searchable; htmx gets just the table."""
    run = selectors.run_get_for(request.user, run_id)
    search = request.GET.get("q", "").strip()
    page = selectors.run_lines_page(run, page=_page_number(request), per_page=50, search=search)
    if request.htmx and request.htmx.target == "lines":
        return render(request, f"{OUTPUTS}#lines", {"run": run, "page": page, "q": search})
    return _run_page(request, run_id, OUTPUTS, "outputs", run=run, page=page, q=search)


@login_required
@require_GET
def run_metrics(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Metrics tab: the run's aggregated metrics and those of its evaluation runs."""
    run = selectors.run_get_for(request.user, run_id)
    evaluations = selectors.run_evaluations_for(request.user, run)
    return _run_page(request, run_id, METRICS, "metrics", run=run, evaluations=evaluations)


@login_required
@require_GET
def run_logs(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Logs tab; htmx polls `?after=<seq>` and appends only the new lines (the live tail)."""
    run = selectors.run_get_for(request.user, run_id)
    after = _int(request.GET.get("after"), 0)
    logs = selectors.run_logs_tail(run, after_seq=after, limit=LOG_PAGE)
    context = {
        "run": run,
        "logs": logs,
        "after": logs[-1].seq if logs else after,
        "full": len(logs) == LOG_PAGE,
    }
    if request.htmx and "after" in request.GET:
        return render(request, f"{LOGS}#tail", context)
    return _run_page(request, run_id, LOGS, "logs", **context)


@login_required
@require_GET
def run_logs_download(request: HttpRequest, run_id: UUID) -> StreamingHttpResponse:
    """Every log line of the run as plain text, streamed page by page."""
    run = selectors.run_get_for(request.user, run_id)

    def lines() -> Iterator[str]:
        after = 0
        while batch := selectors.run_logs_tail(run, after_seq=after, limit=LOG_PAGE):
            for log in batch:
                where = f" line {log.line_number}" if log.line_number is not None else ""
                yield f"{log.time:%Y-%m-%dT%H:%M:%S.%f%z} {log.stream}{where}: {log.text.rstrip()}\n"
            after = batch[-1].seq

    response = StreamingHttpResponse(lines(), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{run.name}.log"'
    return response


@login_required
@require_GET
def run_trace(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Trace tab: one line's span tree with durations and tokens (`?line=`, the first line by default)."""
    run = selectors.run_get_for(request.user, run_id)
    line = selectors.run_line_get(run, _int(request.GET.get("line"), 0))
    spans = selectors.span_tree(line.trace if line is not None else [])
    context = {"run": run, "line": line, "spans": spans, "line_number": _int(request.GET.get("line"), 0)}
    if request.htmx and request.htmx.target and request.htmx.target.startswith("line-trace-"):
        return render(request, f"{TRACE}#tree", context)
    return _run_page(request, run_id, TRACE, "trace", **context)


@login_required
@require_GET
def run_snapshot(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Snapshot tab: the files the run ran, and the content of the one picked (`?path=`)."""
    run = selectors.run_get_for(request.user, run_id)
    path = request.GET.get("path", "")
    file = selectors.run_snapshot_file(run, path=path) if path else None
    context = {"run": run, "files": sorted(run.snapshot.manifest), "path": path, "file": file}
    if request.htmx and request.htmx.target == "file-view":
        return render(request, f"{SNAPSHOT}#file", context)
    return _run_page(request, run_id, SNAPSHOT, "snapshot", **context)


@login_required
@require_GET
def run_snapshot_zip(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The run's snapshot as a zip, through flows_app's export."""
    run = selectors.run_get_for(request.user, run_id)
    response = HttpResponse(snapshot_zip(snapshot=run.snapshot), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{run.name}-snapshot.zip"'
    return response


# --- actions ----------------------------------------------------------------------------------------


@login_required
@require_POST
def run_cancel_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Stop a queued or running run: queued chunks are dropped, running ones stop."""
    run = services.run_cancel(user=request.user, run=selectors.run_get_for(request.user, run_id))
    messages.info(request, f"Canceling “{run.name}”.")
    return _go(request, reverse("runs:detail", args=[run.pk]))


@login_required
@require_POST
def run_resume_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """A new run linked to this one that runs only its failed or missing lines."""
    run = services.run_resume(user=request.user, run=selectors.run_get_for(request.user, run_id))
    messages.success(request, f"Resumed as “{run.name}”.")
    return _go(request, reverse("runs:detail", args=[run.pk]))


@login_required
@require_POST
def run_rerun_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """A new run of just the lines ticked in the outputs table."""
    run = selectors.run_get_for(request.user, run_id)
    form = LineSelectionForm(request.POST, total=run.total_lines)
    if not form.is_valid():
        messages.error(request, " ".join(e for errors in form.errors.values() for e in errors))
        return _go(request, reverse("runs:outputs", args=[run.pk]))
    new = services.run_rerun_lines(user=request.user, run=run, line_numbers=form.cleaned_data["lines"])
    messages.success(request, f"Running {len(form.cleaned_data['lines'])} line(s) again as “{new.name}”.")
    return _go(request, reverse("runs:detail", args=[new.pk]))


@login_required
@require_POST
def run_clone_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The same run again (same snapshot, data and settings) under a new name."""
    run = services.run_clone(user=request.user, run=selectors.run_get_for(request.user, run_id))
    messages.success(request, f"Cloned as “{run.name}”.")
    return _go(request, reverse("runs:detail", args=[run.pk]))


@login_required
@require_POST
def run_archive_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Archive (hide from the default list) or restore a run."""
    run = selectors.run_get_for(request.user, run_id)
    archived = request.POST.get("archived", "1") == "1"
    services.run_archive(user=request.user, run=run, archived=archived)
    messages.success(request, f"“{run.name}” {'archived' if archived else 'restored'}.")
    return _go(request, reverse("runs:detail", args=[run.pk]))


@login_required
@require_http_methods(["GET", "POST"])
def run_delete_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Confirm (GET) and delete (POST) a run with its results and logs."""
    run = selectors.run_get_for(request.user, run_id)
    if request.method == "GET":
        return _run_page(request, run_id, DELETE, "overview", run=run)
    services.run_delete(user=request.user, run=run)
    messages.success(request, f"Run “{run.name}” deleted.")
    return _go(request, reverse("runs:list"))


def _int(value: Any, default: int) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return default


def _page_number(request: HttpRequest) -> int:
    return max(_int(request.GET.get("page"), 1), 1)
