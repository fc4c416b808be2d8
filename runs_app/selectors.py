"""Reads of the runs app, always scoped to the requesting user (others get Http404, never 403)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.core.paginator import Page, Paginator
from django.db.models import Q, QuerySet
from django.http import Http404

from runs_app.models import Dataset, LineResult, Run, RunChunk, RunLog

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

    User = AbstractBaseUser | AnonymousUser


def _visible_flow_ids(user: User) -> QuerySet[Any]:
    from flows_app.selectors import flow_list_for

    return flow_list_for(user).values("pk")


def run_list_for(
    user: User,
    *,
    flow: Any = None,
    status: str | None = None,
    tag: str | None = None,
    author: str | None = None,
    search: str | None = None,
    archived: bool | None = False,
    base_run: Run | None = None,
) -> QuerySet[Run]:
    """Runs the user owns or whose flow the user may see, newest first; `archived=None` shows both kinds.

    `tag` is `key` or `key=value`; `author` a username; `search` matches name, display name and description.
    """
    if not user.is_authenticated:
        return Run.objects.none()
    runs = Run.objects.filter(Q(owner=user) | Q(flow_id__in=_visible_flow_ids(user)))
    if flow is not None:
        runs = runs.filter(flow=flow)
    if status:
        runs = runs.filter(status=status)
    if archived is not None:
        runs = runs.filter(archived=archived)
    if author:
        runs = runs.filter(owner__username=author)
    if base_run is not None:
        runs = runs.filter(base_run=base_run)
    if tag:
        key, has_value, value = tag.partition("=")
        runs = runs.filter(tags__has_key=key) if not has_value else runs.filter(**{f"tags__{key}": value})
    if search:
        runs = runs.filter(
            Q(name__icontains=search) | Q(display_name__icontains=search) | Q(description__icontains=search)
        )
    return runs.select_related("owner", "flow", "flow_version", "dataset", "base_run").order_by("-created_at")


def run_get_for(user: User, run_id_or_name: uuid.UUID | str) -> Run:
    """One run the user may see, by id or by name; Http404 otherwise."""
    runs = run_list_for(user, archived=None)
    run = None
    if isinstance(run_id_or_name, uuid.UUID):
        run = runs.filter(pk=run_id_or_name).first()
    else:
        try:
            run = runs.filter(pk=uuid.UUID(str(run_id_or_name))).first()
        except ValueError:
            run = None
        if run is None:
            run = runs.filter(name=str(run_id_or_name)).first()
    if run is None:
        raise Http404("No such run.")
    return run


def run_can_change(user: User, run: Run) -> bool:
    """Whether the user may cancel, resume, archive or delete the run (its owner only)."""
    return bool(user.is_authenticated and run.owner_id == user.pk)


def run_lines(run: Run, *, search: str = "", status: str | None = None) -> QuerySet[LineResult]:
    """The run's line results in line order, optionally only those whose inputs or outputs contain `search`."""
    lines = LineResult.objects.filter(run=run)
    if status:
        lines = lines.filter(status=status)
    if search:
        # JSON columns compare as text on every backend Django supports.
        from django.db.models import CharField
        from django.db.models.functions import Cast

        lines = lines.annotate(_in=Cast("inputs", CharField()), _out=Cast("outputs", CharField())).filter(
            Q(_in__icontains=search) | Q(_out__icontains=search)
        )
    return lines.order_by("line_number")


def run_lines_page(
    run: Run, *, page: int, per_page: int = 50, search: str = "", status: str | None = None
) -> Page:
    """One page of the run's line results (inputs, outputs, status, error, usage), in line order."""
    per_page = max(1, min(int(per_page), 1000))
    lines = run_lines(run, search=search, status=status).defer("aggregation_inputs", "trace")
    paginator = Paginator(lines, per_page)
    return paginator.get_page(page)


def run_line_get(run: Run, line_number: int) -> LineResult:
    """One line of the run with its trace; Http404 when the line has no result (yet)."""
    line = LineResult.objects.filter(run=run, line_number=line_number).first()
    if line is None:
        raise Http404(f"Run {run.name} has no result for line {line_number}.")
    return line


def run_logs_tail(run: Run, *, after_seq: int = 0, limit: int = 500) -> list[RunLog]:
    """The run's log lines after `after_seq` (a previous line's `seq`), oldest first, at most `limit`."""
    limit = max(1, min(int(limit), 5000))
    return list(RunLog.objects.filter(run=run, pk__gt=int(after_seq)).order_by("pk")[:limit])


def run_tokens(run: Run) -> dict[str, int]:
    """Token usage so far: the finished run's total, else the sum over its chunks."""
    if run.tokens:
        return dict(run.tokens)
    total: dict[str, int] = {}
    for tokens in RunChunk.objects.filter(run=run).values_list("tokens", flat=True):
        for key, value in (tokens or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total


def run_progress(run: Run) -> dict[str, Any]:
    """What a progress bar needs: status, line counts, percent, tokens and timings (JSON-safe)."""
    total = run.total_lines
    done = run.done_lines
    return {
        "run": str(run.pk),
        "name": run.name,
        "status": run.status,
        "total": total,
        "done": done,
        "failed": run.failed_lines,
        "percent": round(100.0 * done / total, 1) if total else (100.0 if not run.is_active else 0.0),
        "tokens": run_tokens(run),
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": run.error,
    }


def run_chunks(run: Run) -> QuerySet[RunChunk]:
    """The run's chunks in order, for the overview's execution table."""
    return RunChunk.objects.filter(run=run).order_by("index")


def dataset_list_for(user: User) -> QuerySet[Dataset]:
    """Datasets the user owns or that are shared with one of the user's teams, newest first."""
    from accounts_app.selectors import user_team_ids

    if not user.is_authenticated:
        return Dataset.objects.none()
    return (
        Dataset.objects.filter(Q(owner=user) | Q(team_id__in=list(user_team_ids(user))))
        .select_related("owner", "team")
        .order_by("-created_at", "-id")
    )


def dataset_get_for(user: User, pk: int | str) -> Dataset:
    """One dataset the user may see; Http404 otherwise."""
    try:
        dataset = dataset_list_for(user).filter(pk=int(pk)).first()
    except (TypeError, ValueError):
        dataset = None
    if dataset is None:
        raise Http404("No such dataset.")
    return dataset


def dataset_preview(dataset: Dataset, *, limit: int = 20) -> list[dict[str, Any]]:
    """The first `limit` rows of the dataset."""
    from runs_app.services import dataset_rows

    return dataset_rows(dataset)[: max(0, limit)]
