"""Pages of the runs app: thin views over the selectors and services."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseClientRefresh

from flows_app.selectors import flow_list_for
from flows_app.services import FlowPathError, snapshot_file_read, snapshot_zip
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


def _status_context(request: HttpRequest, run: Any) -> dict[str, Any]:
    """What `_status.html` shows: the progress dict, the duration so far and whether the user may act."""
    duration = None
    if run.started_at is not None:
        end = run.finished_at or timezone.now()
        duration = max((end - run.started_at).total_seconds(), 0.0)
    return {
        "run": run,
        "progress": selectors.run_progress(run),
        "duration": duration,
        "can_change": selectors.run_can_change(request.user, run),
    }


def _run_page(request: HttpRequest, run: Any, template: str, tab: str, **extra: Any) -> HttpResponse:
    """Render one tab of a run page: the status block, the tabs and the tab's own context."""
    return render(request, template, {**_status_context(request, run), "tab": tab, **extra})


def _shown(value: Any) -> str:
    """A JSON value as the tables show it: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _present_lines(lines: Sequence[Any]) -> list[Any]:
    """Attach display strings of inputs and outputs to each line result of a page."""
    for line in lines:
        line.inputs_shown = [(key, _shown(value)) for key, value in (line.inputs or {}).items()]
        line.outputs_shown = [(key, _shown(value)) for key, value in (line.outputs or {}).items()]
    return list(lines)


def _span_rows(trace: Sequence[Mapping[str, Any]], run: Any) -> list[dict[str, Any]]:
    """A line's spans as a depth-first list with depth, duration and a waterfall offset/width in percent."""
    spans = [dict(span) for span in trace if isinstance(span, Mapping)]
    for span in spans:
        # The runner names the flow span after its folder, which is the snapshot's hash: show the flow's name.
        if span.get("kind") == "flow" and span.get("name") == run.snapshot_id and run.flow is not None:
            span["name"] = run.flow.name
    if not spans:
        return []
    ids = {span.get("span_id") for span in spans}
    children: dict[Any, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span.get("parent_id") if span.get("parent_id") in ids else None
        children.setdefault(parent, []).append(span)
    start = min(float(span.get("start") or 0) for span in spans)
    end = max(float(span.get("end") or 0) for span in spans)
    total = max(end - start, 1e-9)
    rows: list[dict[str, Any]] = []

    def walk(parent: Any, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: float(s.get("start") or 0)):
            begin, finish = float(span.get("start") or 0), float(span.get("end") or 0)
            error = span.get("error")
            rows.append(
                {
                    **span,
                    "depth": depth,
                    "duration_ms": max(finish - begin, 0.0) * 1000,
                    "offset_pct": round(100 * (begin - start) / total, 2),
                    "width_pct": max(round(100 * (finish - begin) / total, 2), 0.5),
                    "inputs_json": json.dumps(span.get("inputs"), indent=2, ensure_ascii=False, default=str),
                    "output_json": json.dumps(span.get("output"), indent=2, ensure_ascii=False, default=str),
                    "error_text": error if isinstance(error, str) else _shown(error),
                }
            )
            if span.get("span_id") is not None and span.get("span_id") != parent:
                walk(span.get("span_id"), depth + 1)

    walk(None, 0)
    return rows


def _error_text(error: Exception) -> str:
    return " ".join(getattr(error, "problems", None) or [str(error)])


# --- datasets ---------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def dataset_list(request: HttpRequest) -> HttpResponse:
    """The user's datasets and an upload form; a broken file is refused with its line numbers, nothing kept."""
    form = DatasetUploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = services.dataset_create(owner=request.user, **form.service_kwargs())
        except (services.DatasetError, services.RunError) as error:
            for problem in getattr(error, "problems", None) or [str(error)]:
                form.add_error("file", problem)
        else:
            messages.success(request, f"Dataset “{dataset.name}” uploaded: {dataset.row_count} rows.")
            return _go(request, reverse("runs:dataset", args=[dataset.pk]))
    template = f"{DATASETS}#upload" if request.htmx else DATASETS
    context = {"form": form, "datasets": selectors.dataset_list_for(request.user)}
    return render(request, template, context, status=422 if form.errors else 200)


@login_required
@require_GET
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """A dataset's columns, row count and first rows."""
    dataset = selectors.dataset_get_for(request.user, pk)
    rows = [[_shown(row.get(c, "")) for c in dataset.columns] for row in selectors.dataset_preview(dataset)]
    return render(request, DATASET, {"dataset": dataset, "rows": rows})


# --- submit -----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def run_new(request: HttpRequest) -> HttpResponse:
    """The submit wizard; htmx re-renders the flow-dependent parts while the user picks (`?part=`)."""
    base = request.POST.get("base_run") or request.GET.get("base_run") or request.GET.get("base")
    base_run = selectors.run_get_for(request.user, base) if base else None
    clone = selectors.run_get_for(request.user, request.GET["clone"]) if request.GET.get("clone") else None
    data = request.POST if request.method == "POST" else None
    form = RunSubmitForm(data, user=request.user, query=request.GET, base_run=base_run, clone_from=clone)
    if request.method == "POST" and form.is_valid():
        try:
            runs = services.run_submit(user=request.user, **form.service_kwargs())
        except services.RunError as error:
            form.add_error(form.error_field(error.field), str(error))
        else:
            messages.success(request, f"Submitted {len(runs)} run{'s' if len(runs) != 1 else ''}.")
            target = reverse("runs:detail", args=[runs[0].pk]) if len(runs) == 1 else reverse("runs:list")
            return _go(request, target)
    template, context = _wizard_part(request, form)
    return render(request, template, context, status=422 if form.is_bound and form.errors else 200)


def _wizard_part(request: HttpRequest, form: RunSubmitForm) -> tuple[str, dict[str, Any]]:
    """The whole wizard, or (htmx `?part=`) its flow-dependent steps or one evaluation step."""
    part = request.GET.get("part", "") if request.htmx else ""
    context: dict[str, Any] = {"form": form, "base_run": form.base_run, "yaml_form": RunYamlForm()}
    if part == "evaluation":
        adding = bool(request.GET.get("add"))
        index = _int(request.GET.get("index"), 0)
        context["evaluation"] = form.add_evaluation() if adding else form.evaluation_form(index)
        # A new step also updates the hidden list of steps, out of band.
        context["oob"] = adding
    return (f"{NEW}#{part}" if part in {"flow-steps", "evaluation"} else NEW), context


@login_required
@require_POST
def run_new_yaml(request: HttpRequest) -> HttpResponse:
    """Submit from a prompt flow run.yml (and the data file it names)."""
    form = RunYamlForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            run = services.run_create_from_yaml(user=request.user, **form.service_kwargs())
        except (services.RunError, services.DatasetError) as error:
            form.add_error("run_yml", _error_text(error))
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
    filters = form.selector_kwargs()
    runs = selectors.run_list_between(
        selectors.run_list_for(request.user, **filters),
        since=request.GET.get("since", ""),
        until=request.GET.get("until", ""),
    )
    page = Paginator(runs, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "form": form,
        "page": page,
        "query_without_page": query.urlencode(),
        "filtered": any(filters.values()),
        # While a run on the page is active, the rows refresh themselves every two seconds.
        "live": any(run.is_active for run in page),
        # The chosen columns (`cols=`, metrics included) and the metric values of each listed run.
        **selectors.run_list_columns(page.object_list, cols=request.GET.getlist("cols")),
    }
    return render(request, f"{LIST}#rows" if request.htmx else LIST, context)


def _run_page_with_evaluations(request: HttpRequest, run_id: UUID, template: str, tab: str) -> HttpResponse:
    """A run tab that also lists the evaluation runs made against the run."""
    run = selectors.run_get_for(request.user, run_id)
    evaluations = selectors.run_list_for(request.user, base_run=run, archived=None)
    return _run_page(request, run, template, tab, evaluations=evaluations)


@login_required
@require_GET
def run_detail(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Overview tab: status, live progress, timings, tokens, lineage and settings."""
    return _run_page_with_evaluations(request, run_id, OVERVIEW, "overview")


@login_required
@require_GET
def run_status(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The `_status.html` fragment that run pages poll about once a second when no websocket is live."""
    run = selectors.run_get_for(request.user, run_id)
    return render(request, STATUS, _status_context(request, run))


@login_required
@require_GET
def run_outputs(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Outputs tab: inputs and outputs per line, paginated and searchable; htmx gets just the table."""
    run = selectors.run_get_for(request.user, run_id)
    search = request.GET.get("q", "").strip()
    page = selectors.run_lines_page(run, page=_page_number(request), per_page=50, search=search)
    context = {"page": page, "lines": _present_lines(page.object_list), "q": search}
    if request.htmx and request.htmx.target == "lines":
        return render(request, f"{OUTPUTS}#lines", {**_status_context(request, run), **context})
    return _run_page(request, run, OUTPUTS, "outputs", **context)


@login_required
@require_GET
def run_metrics(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Metrics tab: the run's aggregated metrics and those of its evaluation runs."""
    return _run_page_with_evaluations(request, run_id, METRICS, "metrics")


@login_required
@require_GET
def run_logs(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Logs tab; htmx polls `?after=<seq>` and appends only the new lines (the live tail)."""
    run = selectors.run_get_for(request.user, run_id)
    after = _int(request.GET.get("after"), 0)
    logs = selectors.run_logs_tail(run, after_seq=after, limit=LOG_PAGE)
    context = {"logs": logs, "after": logs[-1].seq if logs else after, "full": len(logs) == LOG_PAGE}
    if request.htmx and "after" in request.GET:
        return render(request, f"{LOGS}#tail", {**_status_context(request, run), **context})
    return _run_page(request, run, LOGS, "logs", **context)


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
                yield f"{log.time.isoformat()} {log.stream}{where}: {log.text.rstrip()}\n"
            after = batch[-1].seq

    response = StreamingHttpResponse(lines(), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{run.name}.log"'
    return response


@login_required
@require_GET
def run_trace(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Trace tab: one line's span tree with durations and tokens (`?line=`, line 0 by default)."""
    run = selectors.run_get_for(request.user, run_id)
    number = _int(request.GET.get("line"), 0)
    try:
        line = selectors.run_line_get(run, number)
    except Http404:
        line = None
    context = {"line": line, "line_number": number, "spans": _span_rows(line.trace if line else [], run)}
    if request.htmx and (request.htmx.target or "").startswith("line-trace-"):
        return render(request, f"{TRACE}#tree", {**_status_context(request, run), **context})
    return _run_page(request, run, TRACE, "trace", **context)


@login_required
@require_GET
def run_snapshot(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Snapshot tab: the files the run executed, and the content of the one picked (`?path=`)."""
    run = selectors.run_get_for(request.user, run_id)
    path = request.GET.get("path", "")
    file = None
    if path:
        try:
            data = snapshot_file_read(snapshot=run.snapshot, path=path)
        except FlowPathError:
            data = None
        file = _file_view(data) if data is not None else None
    context = {"files": sorted(run.snapshot.manifest), "path": path, "file": file}
    if request.htmx and request.htmx.target == "file-view":
        return render(request, f"{SNAPSHOT}#file", {"run": run, **context})
    return _run_page(request, run, SNAPSHOT, "snapshot", **context)


@login_required
@require_GET
def run_snapshot_zip(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The run's snapshot as a zip, through flows_app's export."""
    run = selectors.run_get_for(request.user, run_id)
    response = HttpResponse(snapshot_zip(snapshot=run.snapshot), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{run.name}-snapshot.zip"'
    return response


# --- actions ----------------------------------------------------------------------------------------


def _act(request: HttpRequest, run: Any, action: Any, done: str, **kwargs: Any) -> HttpResponse:
    """Call one run service; on success go to the run it returns, on a refusal back with the reason."""
    try:
        result = action(user=request.user, run=run, **kwargs)
    except services.RunError as error:
        messages.error(request, str(error))
        return _go(request, reverse("runs:detail", args=[run.pk]))
    target = result if result is not None and hasattr(result, "pk") else run
    messages.success(request, done.format(name=target.name))
    return _go(request, reverse("runs:detail", args=[target.pk]))


@login_required
@require_POST
def run_cancel_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Stop a queued or running run: queued chunks never start, running ones stop."""
    run = selectors.run_get_for(request.user, run_id)
    return _act(request, run, services.run_cancel, "Canceling “{name}”.")


@login_required
@require_POST
def run_resume_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """A new run linked to this one that runs only its failed or missing lines."""
    run = selectors.run_get_for(request.user, run_id)
    return _act(request, run, services.run_resume, "Resumed as “{name}”.")


@login_required
@require_POST
def run_rerun_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """A new run of just the lines ticked in the outputs table (the other completed lines are reused)."""
    run = selectors.run_get_for(request.user, run_id)
    form = LineSelectionForm(request.POST, total=run.total_lines)
    if not form.is_valid():
        messages.error(request, " ".join(e for errors in form.errors.values() for e in errors))
        return _go(request, reverse("runs:outputs", args=[run.pk]))
    lines = form.cleaned_data["lines"]
    return _act(
        request, run, services.run_rerun_lines, "Running the lines again as “{name}”.", line_numbers=lines
    )


@login_required
@require_POST
def run_clone_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """The same run again (same snapshot, data and settings) under a new name."""
    run = selectors.run_get_for(request.user, run_id)
    return _act(request, run, services.run_clone, "Cloned as “{name}”.")


@login_required
@require_POST
def run_archive_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Archive (hide from the default list) or restore a run."""
    run = selectors.run_get_for(request.user, run_id)
    archived = request.POST.get("archived", "1") == "1"
    done = "“{name}” archived." if archived else "“{name}” restored."
    return _act(request, run, services.run_archive, done, archived=archived)


@login_required
@require_http_methods(["GET", "POST"])
def run_delete_view(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Confirm (GET) and delete (POST) a run with its results and logs."""
    run = selectors.run_get_for(request.user, run_id)
    if request.method == "GET":
        return _run_page(request, run, DELETE, "overview")
    try:
        services.run_delete(user=request.user, run=run)
    except services.RunError as error:
        messages.error(request, str(error))
        return _go(request, reverse("runs:detail", args=[run.pk]))
    messages.success(request, f"Run “{run.name}” deleted.")
    return _go(request, reverse("runs:list"))


def _file_view(data: bytes) -> dict[str, Any]:
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"size": len(data), "text": text}


def _int(value: Any, default: int) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return default


def _page_number(request: HttpRequest) -> int:
    return max(_int(request.GET.get("page"), 1), 1)


# --- comparison of runs: the compare page, its exports, "what changed" and archiving a selection --------

COMPARE = "runs_app/compare/page.html"
COMPARE_CHANGES = "runs_app/compare/changes.html"
COMPARE_PARTS = ("rows", "counts", "charts")


def _compare_part(request: HttpRequest) -> str:
    """Which part of the compare page an htmx request wants: the rows table swaps itself, others name a part."""
    if not request.htmx:
        return ""
    part = request.GET.get("part") or ("rows" if request.htmx.target == "compare-rows" else "")
    return part if part in COMPARE_PARTS else ""


@login_required
@require_GET
def run_compare_view(request: HttpRequest) -> HttpResponse:
    """2 to 10 runs side by side, line by line (`?runs=a,b&baseline=&mode=&q=&cols=&page=`); htmx gets a part."""
    try:
        comparison = selectors.run_compare(request.user, **selectors.compare_params(request.GET))
    except selectors.CompareError as error:
        return render(request, COMPARE, {"error": str(error)}, status=400)
    part = _compare_part(request)
    context = selectors.run_compare_context(comparison, part=part)
    return render(request, f"{COMPARE}#{part}" if part else COMPARE, context)


@login_required
@require_GET
def run_compare_export_view(request: HttpRequest, fmt: str) -> HttpResponse:
    """The comparison as CSV or JSON: every line the page's mode and search keep, streamed in batches."""
    try:
        comparison = selectors.run_compare(request.user, **selectors.compare_params(request.GET))
    except selectors.CompareError as error:
        return HttpResponse(str(error), status=400, content_type="text/plain; charset=utf-8")
    content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    response = StreamingHttpResponse(
        selectors.run_compare_export(comparison, fmt=fmt), content_type=content_type
    )
    response["Content-Disposition"] = f'attachment; filename="comparison.{fmt}"'
    return response


@login_required
@require_GET
def run_compare_changes_view(request: HttpRequest) -> HttpResponse:
    """What changed from run `a` to run `b` (`?a=&b=`): their snapshots' file and DAG diffs, and their settings."""
    context = selectors.run_compare_changes(
        request.user, a=request.GET.get("a", ""), b=request.GET.get("b", "")
    )
    return render(request, COMPARE_CHANGES, context)


@login_required
@require_POST
def run_archive_selected_view(request: HttpRequest) -> HttpResponse:
    """Archive (or, with `archived=0`, restore) the runs ticked in the run list; others' runs are left alone."""
    archived = request.POST.get("archived", "1") == "1"
    # Resolve every id before changing anything: one id the user may not see answers 404 with nothing archived.
    runs = [selectors.run_get_for(request.user, run_id) for run_id in request.POST.getlist("runs")]
    changed = skipped = 0
    for run in runs:
        try:
            services.run_archive(user=request.user, run=run, archived=archived)
            changed += 1
        except services.RunError:
            skipped += 1
    verb = "archived" if archived else "restored"
    messages.success(request, f"{changed} run{'s' if changed != 1 else ''} {verb}.")
    if skipped:
        messages.warning(request, f"{skipped} run{'s' if skipped != 1 else ''} left as they were: not yours.")
    return HttpResponseClientRefresh() if request.htmx else redirect(reverse("runs:list"))


# --- deploy wizard and endpoint pages ------------------------------------------------------------------------

DEPLOY = "runs_app/endpoints/deploy.html"
ENDPOINT_LIST = "runs_app/endpoints/list.html"
ENDPOINT_DEPLOYMENTS = "runs_app/endpoints/deployments.html"
ENDPOINT_TEST = "runs_app/endpoints/test.html"
ENDPOINT_CONSUME = "runs_app/endpoints/consume.html"
ENDPOINT_MONITORING = "runs_app/endpoints/monitoring.html"


def _deploy_form(request: HttpRequest, source: Mapping[str, Any]) -> Any:
    from flows_app.selectors import connection_list_for
    from runs_app.forms import DeployForm

    available = sorted(set(connection_list_for(request.user).values_list("name", flat=True)))
    return DeployForm(
        request.POST if request.method == "POST" else None,
        endpoints=[e.name for e in selectors.endpoint_list_for(request.user)],
        outputs=[o.name for o in source["interface"].outputs if not o.evaluation_only],
        connections_used=source["connections_used"],
        connections_available=available,
        chosen_endpoint=request.GET.get("endpoint", ""),
    )


def _deploy(request: HttpRequest, *, run: Any = None, flow_version: Any = None) -> HttpResponse:
    """The wizard for a run or a flow version; a created deployment shows its endpoint's keys, once."""
    context: dict[str, Any] = {"run": run, "flow_version": flow_version}
    try:
        source = services.deployment_source(run=run, flow_version=flow_version)
    except services.EndpointError as error:
        return render(request, DEPLOY, {**context, "source_error": str(error)}, status=422)
    form = _deploy_form(request, source)
    if request.method == "POST" and form.is_valid():
        try:
            deployment, keys = services.deployment_create(
                user=request.user, run=run, flow_version=flow_version, **form.service_kwargs()
            )
        except services.EndpointError as error:
            form.add_error(form.error_field(error.field), str(error))
        else:
            endpoint = selectors.endpoint_get_for(request.user, deployment.endpoint.name)
            messages.success(request, f"Deployed “{deployment.name}” to endpoint “{endpoint.name}”.")
            revealed = {"primary": keys.primary, "secondary": keys.secondary} if keys else {}
            return _consume_page(request, endpoint, revealed=revealed, status=201)
    context.update(form=form, source=source, interface=source["interface"])
    return render(request, DEPLOY, context, status=422 if form.is_bound and form.errors else 200)


@login_required
@require_http_methods(["GET", "POST"])
def deploy_run(request: HttpRequest, run_id: UUID) -> HttpResponse:
    """Deploy a run's snapshot (with its variant, init and environment) to a new or existing endpoint."""
    return _deploy(request, run=selectors.run_get_for(request.user, run_id))


@login_required
@require_http_methods(["GET", "POST"])
def deploy_flow(request: HttpRequest, flow_id: int) -> HttpResponse:
    """Deploy a flow's head version (or `?version=N`) to a new or existing endpoint."""
    from flows_app.selectors import flow_version_get_for

    number = _int(request.GET.get("version"), 0) or None
    return _deploy(request, flow_version=flow_version_get_for(request.user, flow_id, number))


def _endpoint_page(
    request: HttpRequest, endpoint: Any, template: str, tab: str, *, status: int = 200, **extra: Any
) -> HttpResponse:
    """One tab of an endpoint page: header, tabs, the scoring URL and the tab's own context."""
    context = {
        "endpoint": endpoint,
        "deployments": list(endpoint.deployments.all()),
        "keys": selectors.endpoint_keys_of(endpoint),
        "scoring_url": request.build_absolute_uri(f"/endpoints/{endpoint.name}/score"),
        "tab": tab,
        **extra,
    }
    return render(request, template, context, status=status)


@login_required
@require_GET
def endpoint_list(request: HttpRequest) -> HttpResponse:
    """The user's endpoints with their deployments and traffic."""
    return render(request, ENDPOINT_LIST, {"endpoints": selectors.endpoint_list_for(request.user)})


@login_required
@require_GET
def endpoint_detail(request: HttpRequest, name: str) -> HttpResponse:
    """Deployments tab: what each deployment serves and the editable blue/green traffic split."""
    from runs_app.forms import TrafficForm

    endpoint = selectors.endpoint_get_for(request.user, name)
    form = TrafficForm(deployments=list(endpoint.deployments.all()))
    return _endpoint_page(request, endpoint, ENDPOINT_DEPLOYMENTS, "deployments", traffic_form=form)


@login_required
@require_POST
def endpoint_traffic(request: HttpRequest, name: str) -> HttpResponse:
    """Save the traffic split; htmx gets the deployments fragment back (422 with the error)."""
    from runs_app.forms import TrafficForm

    endpoint = selectors.endpoint_get_for(request.user, name)
    form = TrafficForm(request.POST, deployments=list(endpoint.deployments.all()))
    if form.is_valid():
        try:
            services.endpoint_update(user=request.user, endpoint=endpoint, traffic=form.traffic())
        except services.EndpointError as error:
            form.add_error(None, str(error))
        else:
            messages.success(request, "Traffic split saved.")
            return _go(request, reverse("endpoints:detail", args=[name]))
    template = f"{ENDPOINT_DEPLOYMENTS}#traffic" if request.htmx else ENDPOINT_DEPLOYMENTS
    return _endpoint_page(request, endpoint, template, "deployments", traffic_form=form, status=422)


@login_required
@require_POST
def endpoint_toggle(request: HttpRequest, name: str) -> HttpResponse:
    """Disable the endpoint (callers get 403) or enable it again."""
    endpoint = selectors.endpoint_get_for(request.user, name)
    disabled = request.POST.get("disabled", "1") == "1"
    services.endpoint_update(user=request.user, endpoint=endpoint, disabled=disabled)
    messages.success(request, f"Endpoint “{name}” {'disabled' if disabled else 'enabled'}.")
    return _go(request, reverse("endpoints:detail", args=[name]))


@login_required
@require_POST
def endpoint_delete_view(request: HttpRequest, name: str) -> HttpResponse:
    """Delete the endpoint with its deployments; its keys stop working."""
    services.endpoint_delete(user=request.user, endpoint=selectors.endpoint_get_for(request.user, name))
    messages.success(request, f"Endpoint “{name}” deleted.")
    return _go(request, reverse("endpoints:list"))


@login_required
@require_POST
def deployment_delete_view(request: HttpRequest, name: str, deployment: str) -> HttpResponse:
    """Delete a deployment without traffic."""
    try:
        services.deployment_delete(
            user=request.user, deployment=selectors.deployment_get_for(request.user, name, deployment)
        )
    except services.EndpointError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"Deployment “{deployment}” deleted.")
    return _go(request, reverse("endpoints:detail", args=[name]))


def _served_interface(endpoint: Any) -> tuple[Any, dict[str, Any]]:
    """The interface of the deployment with the most traffic, and sample inputs for it."""
    shown = max(endpoint.deployments.all(), key=lambda d: d.traffic, default=None)
    if shown is None:
        return None, {}
    interface = selectors.deployment_interface(shown)
    first = interface.sample[0] if isinstance(interface.sample, list) and interface.sample else {}
    first = first if isinstance(first, Mapping) else {}
    sample = {i.name: first.get(i.name, i.default if i.default is not None else "") for i in interface.inputs}
    return interface, sample


@login_required
@require_GET
def endpoint_test(request: HttpRequest, name: str) -> HttpResponse:
    """Test tab: a form (or a chat, for chat flows) that calls the real endpoint and shows the stream."""
    endpoint = selectors.endpoint_get_for(request.user, name)
    interface, sample = _served_interface(endpoint)
    inputs = interface.inputs if interface else ()
    outputs = interface.outputs if interface else ()
    return _endpoint_page(
        request,
        endpoint,
        ENDPOINT_TEST,
        "test",
        interface=interface,
        chat_input=next((i.name for i in inputs if i.is_chat_input), ""),
        chat_history=next((i.name for i in inputs if i.is_chat_history), ""),
        chat_output=next((o.name for o in outputs if o.is_chat_output), ""),
        sample_json=json.dumps(sample, indent=2, ensure_ascii=False),
        test_token=services.endpoint_test_token(user=request.user, endpoint=endpoint),
    )


def _consume_page(
    request: HttpRequest, endpoint: Any, *, revealed: Mapping[str, str], status: int = 200
) -> HttpResponse:
    """The Consume tab; `revealed` holds keys shown this once (just created or regenerated)."""
    _, sample = _served_interface(endpoint)
    compact = json.dumps(sample, ensure_ascii=False)
    return _endpoint_page(
        request,
        endpoint,
        ENDPOINT_CONSUME,
        "consume",
        status=status,
        revealed=revealed,
        sample_compact=compact,
        sample_shell=compact.replace("'", "'\\''"),
        sample_python=repr(sample),
    )


@login_required
@require_GET
def endpoint_consume(request: HttpRequest, name: str) -> HttpResponse:
    """Consume tab: the URL, the keys (prefixes only; regenerate to see one) and code snippets."""
    return _consume_page(request, selectors.endpoint_get_for(request.user, name), revealed={})


@login_required
@require_POST
def endpoint_key_regenerate_view(request: HttpRequest, name: str, slot: str) -> HttpResponse:
    """Replace one key and show the new one this once; the old key fails from the next request."""
    endpoint = selectors.endpoint_get_for(request.user, name)
    try:
        key = services.endpoint_key_regenerate(user=request.user, endpoint=endpoint, slot=slot)
    except services.EndpointError as error:
        raise Http404(str(error)) from None
    messages.success(request, f"The {slot} key was regenerated: the old one no longer works.")
    return _consume_page(request, selectors.endpoint_get_for(request.user, name), revealed={slot: key})


@login_required
@require_GET
def endpoint_monitoring_view(request: HttpRequest, name: str) -> HttpResponse:
    """Monitoring tab: requests, errors, p50 / p95 latency and tokens over time; htmx gets the panel."""
    endpoint = selectors.endpoint_get_for(request.user, name)
    report = selectors.endpoint_monitoring(endpoint, window=request.GET.get("window", "24h"))
    chart = {
        "labels": [b["start"].isoformat() for b in report["series"]],
        "requests": [b["requests"] for b in report["series"]],
        "errors": [b["errors"] for b in report["series"]],
        "p50": [b["p50"] for b in report["series"]],
        "p95": [b["p95"] for b in report["series"]],
        "tokens": [b["tokens"] for b in report["series"]],
    }
    template = f"{ENDPOINT_MONITORING}#panel" if request.htmx else ENDPOINT_MONITORING
    windows = list(selectors.ENDPOINT_MONITOR_WINDOWS)
    return _endpoint_page(
        request, endpoint, template, "monitoring", report=report, chart=chart, windows=windows
    )
