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


# === Comparison of runs and the rich run list (issue 7) ===========================================================
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections.abc import Iterable, Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

from django.db import NotSupportedError  # noqa: E402
from django.db.models import (  # noqa: E402
    Avg,
    Case,
    Count,
    F,
    FloatField,
    Func,
    IntegerField,
    Max,
    Min,
    Sum,
    TextField,
    Value,
    When,
)
from django.db.models.functions import Cast, Concat, Floor, Mod  # noqa: E402
from django.db.models.lookups import IContains  # noqa: E402
from django.utils.safestring import mark_safe  # noqa: E402

from flowengine.visualize import shown, word_diff_html  # noqa: E402

# A comparison joins 2-10 runs by line number. "Main" runs are those whose base run is not in the set; an
# evaluation run whose base run is in the set lends its line outputs as scores to that base run. The join, the
# display modes and the paging run in SQL (one GROUP BY line_number over the runs' line results, with
# conditional aggregates per run), so a page costs the same for 2,000 or 20,000 lines.

COMPARE_MIN_RUNS = 2
COMPARE_MAX_RUNS = 10
COMPARE_PER_PAGE = 50
COMPARE_MODES = ("all", "different", "failures", "regressions", "improvements")
COMPARE_MODE_LABELS = {
    "all": "All",
    "different": "Different",
    "failures": "Failures",
    "regressions": "Regressions",
    "improvements": "Improvements",
}
# Keys are discovered from the first completed lines of each run.
_KEY_SAMPLE_LINES = 50
_EXPORT_BATCH = 500
_SCATTER_POINTS = 1000
_HISTOGRAM_BINS = 20
# Metrics whose name says they are a cost are better when lower; every other metric and score is better higher.
_LOWER_IS_BETTER = re.compile(r"(loss|error|latency|duration|tokens|cost|time|perplexity)", re.IGNORECASE)


class CompareError(ValueError):
    """A comparison that cannot be made (too few or too many runs); the message says why."""


class _JsonNumber(Func):
    """The number (a boolean as 1/0) at `key` of a JSON column, NULL for any other type; SQLite and PostgreSQL."""

    output_field = FloatField()

    def __init__(self, field: str, key: str) -> None:
        super().__init__(F(field))
        self.key = key

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        sql, params = compiler.compile(self.source_expressions[0])
        path = '$."' + self.key + '"'
        return (
            f"(CASE json_type({sql}, %s) WHEN 'integer' THEN json_extract({sql}, %s) "
            f"WHEN 'real' THEN json_extract({sql}, %s) WHEN 'true' THEN 1.0 WHEN 'false' THEN 0.0 END)",
            [*params, path, *params, path, *params, path],
        )

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        sql, params = compiler.compile(self.source_expressions[0])
        # CASE evaluates the cast only for numbers, so a string value never raises.
        return (
            f"(CASE jsonb_typeof({sql} -> %s) WHEN 'number' THEN ({sql} ->> %s)::double precision "
            f"WHEN 'boolean' THEN (CASE WHEN ({sql} ->> %s) = 'true' THEN 1.0 ELSE 0.0 END) END)",
            [*params, self.key, *params, self.key, *params, self.key],
        )

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        raise NotSupportedError(f"comparing runs needs SQLite or PostgreSQL, not {connection.vendor}")


@dataclass(frozen=True)
class CompareScore:
    """One evaluation output compared across runs: `slot` names the evaluation flow, `key` its output."""

    slot: str
    key: str
    label: str
    numeric: bool

    @property
    def col(self) -> str:
        """The column id used in `cols=` and `num=`."""
        return f"score:{self.label}"


@dataclass
class Comparison:
    """A resolved comparison: its runs, roles, keys, baseline and the view state read from the URL."""

    runs: list[Run]
    mains: list[Run]
    evals: dict[Any, dict[str, Run]]
    baseline: Run
    mode: str
    q: str
    cols: list[str]
    page: int
    num: str
    scatter: tuple[Run, Run] | None
    input_keys: list[str]
    output_keys: list[str]
    numeric_outputs: set[str]
    scores: list[CompareScore]
    prices: dict[str, dict[str, float]]
    models: dict[Any, str | None] = field(default_factory=dict)

    @property
    def ids(self) -> list[Any]:
        """Every run id of the set."""
        return [run.pk for run in self.runs]

    @property
    def main_ids(self) -> list[Any]:
        """The ids of the runs whose outputs are compared."""
        return [run.pk for run in self.mains]

    @property
    def others(self) -> list[Run]:
        """The main runs other than the baseline."""
        return [run for run in self.mains if run.pk != self.baseline.pk]

    def columns(self) -> list[dict[str, Any]]:
        """Every column of the rows table with its label and whether it is shown."""
        items = [(f"in:{k}", f"inputs.{k}") for k in self.input_keys]
        items += [(f"out:{k}", k) for k in self.output_keys]
        items += [(score.col, f"score: {score.label}") for score in self.scores]
        items += [("tokens", "tokens"), ("latency", "latency"), ("cost", "cost")]
        return [{"id": col, "label": label, "shown": self.shows(col)} for col, label in items]

    def shows(self, col: str) -> bool:
        """Whether column `col` is shown (every column when `cols=` is empty)."""
        return not self.cols or col in self.cols

    def numeric_columns(self) -> list[tuple[str, str]]:
        """(id, label) of the columns the histogram and the scatter can plot."""
        found = [(s.col, f"score: {s.label}") for s in self.scores if s.numeric]
        found += [(f"out:{k}", k) for k in self.output_keys if k in self.numeric_outputs]
        return [*found, ("latency", "latency (ms)"), ("tokens", "tokens")]

    def query(self, **changes: Any) -> str:
        """The URL query of this view with `changes` applied (None drops a key); what links and exports use."""
        state: dict[str, Any] = {
            "runs": ",".join(str(run.pk) for run in self.runs),
            "baseline": str(self.baseline.pk),
            "mode": self.mode if self.mode != "all" else None,
            "q": self.q or None,
            "cols": ",".join(self.cols) or None,
            "page": self.page if self.page > 1 else None,
            "num": self.num or None,
            "x": str(self.scatter[0].pk) if self.scatter else None,
            "y": str(self.scatter[1].pk) if self.scatter else None,
        }
        state.update(changes)
        return urlencode({k: v for k, v in state.items() if v not in (None, "")})


def compare_params(query: Mapping[str, Any]) -> dict[str, Any]:
    """`run_compare`'s keyword arguments from a query dict; lists may be repeated or comma separated."""

    def listed(name: str) -> list[str]:
        values = query.getlist(name) if hasattr(query, "getlist") else [query.get(name) or ""]
        return [part.strip() for value in values for part in str(value).split(",") if part.strip()]

    try:
        page = max(int(query.get("page") or 1), 1)
    except (TypeError, ValueError):
        page = 1
    return {
        "runs": list(dict.fromkeys(listed("runs"))),
        "baseline": query.get("baseline") or None,
        "mode": query.get("mode") or "all",
        "q": (query.get("q") or "").strip(),
        "cols": listed("cols"),
        "page": page,
        "num": query.get("num") or "",
        "x": query.get("x") or None,
        "y": query.get("y") or None,
    }


def _model_prices() -> dict[str, dict[str, float]]:
    """STUDIO_MODEL_PRICES: {model: {"input": usd, "output": usd}} per million tokens (a dict or JSON text)."""
    from django.conf import settings

    raw = getattr(settings, "STUDIO_MODEL_PRICES", None) or {}
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else {}
    prices: dict[str, dict[str, float]] = {}
    for model, price in dict(raw).items():
        if isinstance(price, int | float):
            prices[str(model)] = {"input": float(price), "output": float(price)}
        elif isinstance(price, Mapping):
            given_in = price.get("input", price.get("prompt", 0.0))
            given_out = price.get("output", price.get("completion", given_in))
            prices[str(model)] = {"input": float(given_in or 0.0), "output": float(given_out or 0.0)}
    return prices


def _run_model(run: Run) -> str | None:
    """The model a run's LLM calls name, read from the first traced line (`model` or `deployment_name`)."""
    for trace in (
        LineResult.objects.filter(run=run).order_by("line_number").values_list("trace", flat=True)[:3]
    ):
        for span in trace or []:
            if isinstance(span, Mapping) and span.get("kind") == "llm":
                inputs = span.get("inputs") or {}
                model = (
                    inputs.get("model") or inputs.get("deployment_name")
                    if isinstance(inputs, Mapping)
                    else None
                )
                if model:
                    return str(model)
    return None


def _cost(usage: Mapping[str, Any] | None, price: Mapping[str, float] | None) -> float | None:
    if not price or not usage:
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    if not prompt and not completion:
        prompt = usage.get("total_tokens") or 0
    return (float(prompt) * price["input"] + float(completion) * price["output"]) / 1_000_000


def _sample(run: Run) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    completed = LineResult.objects.filter(run=run, status="Completed").order_by("line_number")
    return [
        (dict(i or {}), dict(o or {}))
        for i, o in completed.values_list("inputs", "outputs")[:_KEY_SAMPLE_LINES]
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def _numeric_keys(samples: Sequence[Mapping[str, Any]]) -> set[str]:
    seen: dict[str, bool] = {}
    for outputs in samples:
        for key, value in outputs.items():
            if value is None:
                continue
            # Keys with a double quote cannot be written as a JSON path portably: they are never plotted.
            seen[key] = seen.get(key, True) and _is_number(value) and '"' not in key
    return {key for key, numeric in seen.items() if numeric}


def _pick(runs: Sequence[Run], wanted: str | None) -> Run | None:
    if not wanted:
        return None
    return next((run for run in runs if str(run.pk) == wanted or run.name == wanted), None)


def run_compare(
    user: User,
    *,
    runs: Sequence[str],
    baseline: str | None = None,
    mode: str = "all",
    q: str = "",
    cols: Sequence[str] = (),
    page: int = 1,
    num: str = "",
    x: str | None = None,
    y: str | None = None,
) -> Comparison:
    """The comparison of runs (ids or names) the user may all see: Http404 if any is not; CompareError on 1 or >10.

    Evaluation runs whose base run is in the set score that run's lines; `baseline` (id or name) is one of the
    other runs (the first by default). Reads only a sample of lines: the rows come from `run_compare_rows`.
    """
    names = list(dict.fromkeys(str(r) for r in runs if str(r).strip()))
    if len(names) < COMPARE_MIN_RUNS:
        raise CompareError(f"pick at least {COMPARE_MIN_RUNS} runs to compare (got {len(names)}).")
    if len(names) > COMPARE_MAX_RUNS:
        raise CompareError(f"a comparison holds at most {COMPARE_MAX_RUNS} runs (got {len(names)}).")
    resolved = [run_get_for(user, name) for name in names]
    chosen = list({run.pk: run for run in resolved}.values())
    in_set = {run.pk for run in chosen}
    mains = [run for run in chosen if run.base_run_id not in in_set]
    evals: dict[Any, dict[str, Run]] = {run.pk: {} for run in mains}
    slot_names: dict[str, str] = {}
    for run in chosen:
        if run.base_run_id in in_set and run.base_run_id in evals:
            slot = str(run.flow_id or run.snapshot_id)
            # A second evaluation by the same flow keeps its own scores, matched with no other run's.
            slot = slot if slot not in evals[run.base_run_id] else str(run.pk)
            evals[run.base_run_id][slot] = run
            slot_names.setdefault(slot, run.flow.name if run.flow else run.name)
    base = _pick(mains, baseline) or mains[0]
    samples = {run.pk: _sample(run) for run in chosen}
    input_keys: list[str] = []
    output_keys: list[str] = []
    main_outputs: list[dict[str, Any]] = []
    for run in mains:
        for inputs, outputs in samples[run.pk]:
            input_keys += [k for k in inputs if k not in input_keys]
            output_keys += [k for k in outputs if k not in output_keys]
            main_outputs.append(outputs)
    score_keys: dict[str, list[str]] = {}
    score_samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for slots in evals.values():
        for slot, run in slots.items():
            for _inputs, outputs in samples[run.pk]:
                keys = score_keys.setdefault(slot, [])
                keys += [k for k in outputs if k not in keys]
                for key in outputs:
                    score_samples.setdefault((slot, key), []).append({key: outputs[key]})
    all_keys = [key for keys in score_keys.values() for key in keys]
    scores = [
        CompareScore(
            slot=slot,
            key=key,
            label=key if all_keys.count(key) == 1 else f"{slot_names[slot]}.{key}",
            numeric=key in _numeric_keys(score_samples.get((slot, key), [])),
        )
        for slot, keys in score_keys.items()
        for key in keys
    ]
    numeric_outputs = _numeric_keys(main_outputs)
    prices = _model_prices()
    comparison = Comparison(
        runs=chosen,
        mains=mains,
        evals=evals,
        baseline=base,
        mode=mode if mode in COMPARE_MODES else "all",
        q=q,
        cols=list(cols),
        page=page,
        num="",
        scatter=None,
        input_keys=input_keys,
        output_keys=output_keys,
        numeric_outputs=numeric_outputs,
        scores=scores,
        prices=prices,
    )
    numeric = [col for col, _ in comparison.numeric_columns()]
    comparison.num = num if num in numeric else numeric[0]
    others = comparison.others
    if others:
        comparison.scatter = (_pick(mains, x) or base, _pick(mains, y) or others[0])
    if prices:
        comparison.models = {run.pk: _run_model(run) for run in mains}
    return comparison


def _when_run(run_id: Any, value: Any) -> Any:
    return Case(When(run_id=run_id, then=value), default=None)


def _score_pairs(cmp: Comparison, run: Run) -> list[tuple[CompareScore, Run, Run]]:
    """(score, evaluation of `run`, evaluation of the baseline) for every numeric score both have."""
    mine, theirs = cmp.evals.get(run.pk, {}), cmp.evals.get(cmp.baseline.pk, {})
    return [
        (score, mine[score.slot], theirs[score.slot])
        for score in cmp.scores
        if score.numeric and score.slot in mine and score.slot in theirs
    ]


def _line_flags(cmp: Comparison) -> tuple[dict[str, Any], dict[str, Q]]:
    """The per-line aggregates and the HAVING condition of each mode."""
    mains = Q(run_id__in=cmp.main_ids)
    aggregates: dict[str, Any] = {
        "_n": Count("pk", filter=mains),
        "_kinds": Count(Concat("status", Cast("outputs", TextField())), filter=mains, distinct=True),
        "_failed": Count("pk", filter=Q(run_id__in=cmp.main_ids, status="Failed")),
        "_base_ok": Count("pk", filter=Q(run_id=cmp.baseline.pk, status="Completed")),
        "_base_failed": Count("pk", filter=Q(run_id=cmp.baseline.pk, status="Failed")),
    }
    # Start from a condition no line meets, so a set without other runs has no regressions.
    regress = Q(_n__lt=0)
    improve = Q(_n__lt=0)
    for index, run in enumerate(cmp.others):
        aggregates[f"_ok{index}"] = Count("pk", filter=Q(run_id=run.pk, status="Completed"))
        aggregates[f"_fail{index}"] = Count("pk", filter=Q(run_id=run.pk, status="Failed"))
        regress |= Q(_base_ok__gt=0, **{f"_fail{index}__gt": 0})
        improve |= Q(_base_failed__gt=0, **{f"_ok{index}__gt": 0})
        for number, (score, mine, theirs) in enumerate(_score_pairs(cmp, run)):
            value = _JsonNumber("outputs", score.key)
            aggregates[f"_s{index}_{number}"] = Max(_when_run(mine.pk, value))
            aggregates[f"_b{index}_{number}"] = Max(_when_run(theirs.pk, value))
            regress |= Q(**{f"_s{index}_{number}__lt": F(f"_b{index}_{number}")})
            improve |= Q(**{f"_s{index}_{number}__gt": F(f"_b{index}_{number}")})
    modes = {
        "different": Q(_kinds__gt=1) | Q(_n__lt=len(cmp.mains)),
        "failures": Q(_failed__gt=0),
        "regressions": regress,
        "improvements": improve,
    }
    return aggregates, modes


def _search_hit(q: str) -> Any:
    hit = IContains(Cast("inputs", TextField()), q) | IContains(Cast("outputs", TextField()), q)
    return Max(Case(When(hit, then=Value(1)), default=Value(0)))


def _compare_numbers(cmp: Comparison, *, mode: str | None = None, q: str | None = None) -> QuerySet[Any]:
    """The line numbers of the comparison that pass the mode and the search, in order (a lazy query)."""
    mode = cmp.mode if mode is None else mode
    q = cmp.q if q is None else q
    if mode == "all" and not q:
        lines = LineResult.objects.filter(run_id__in=cmp.main_ids)
        return lines.order_by("line_number").values_list("line_number", flat=True).distinct()
    aggregates, modes = _line_flags(cmp)
    grouped = LineResult.objects.filter(run_id__in=cmp.ids).values("line_number").annotate(**aggregates)
    # Lines only evaluation runs have (their base line is gone) are not lines of the comparison.
    having = Q(_n__gt=0)
    if mode != "all":
        having &= modes[mode]
    if q:
        grouped = grouped.annotate(_hit=_search_hit(q))
        having &= Q(_hit=1)
    return grouped.filter(having).order_by("line_number").values_list("line_number", flat=True)


def run_compare_counts(cmp: Comparison) -> dict[str, int]:
    """How many lines each display mode shows (ignoring the search), in one pass over the lines."""
    aggregates, modes = _line_flags(cmp)
    grouped = LineResult.objects.filter(run_id__in=cmp.ids).values("line_number").annotate(**aggregates)
    flags = {
        f"_is_{mode}": Case(When(condition, then=Value(1)), default=Value(0), output_field=IntegerField())
        for mode, condition in modes.items()
    }
    grouped = grouped.filter(_n__gt=0).annotate(**flags)
    totals = grouped.aggregate(all=Count("line_number"), **{m: Sum(f"_is_{m}") for m in modes})
    return {mode: int(totals.get(mode) or 0) for mode in COMPARE_MODES}


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3g}"


def _delta(value: Any, base: Any, *, better: str | None) -> dict[str, Any] | None:
    """The signed difference to the baseline with a class: better/worse when a direction is known, else up/down."""
    value = float(value) if isinstance(value, bool) else value
    base = float(base) if isinstance(base, bool) else base
    if not _is_number(value) or not _is_number(base):
        return None
    diff = float(value) - float(base)
    if diff == 0:
        return {"value": diff, "text": "±0", "cls": "delta-same"}
    if better is None:
        cls = "delta-up" if diff > 0 else "delta-down"
    else:
        good = diff > 0 if better == "higher" else diff < 0
        cls = "delta-better" if good else "delta-worse"
    return {"value": diff, "text": ("+" if diff > 0 else "−") + _fmt(abs(diff)), "cls": cls}


def _direction(name: str) -> str:
    return "lower" if _LOWER_IS_BETTER.search(name) else "higher"


def run_compare_context(cmp: Comparison, *, part: str = "") -> dict[str, Any]:
    """Everything the compare page shows, or only one part of it: "rows", "counts" or "charts" (htmx)."""
    context: dict[str, Any] = {"cmp": cmp, "modes": COMPARE_MODE_LABELS, "query": cmp.query()}
    if part == "counts":
        counts = run_compare_counts(cmp)
        return {**context, "counts": [(m, label, counts[m]) for m, label in COMPARE_MODE_LABELS.items()]}
    if part == "charts":
        state = [("runs", ",".join(str(r.pk) for r in cmp.runs)), ("baseline", str(cmp.baseline.pk))]
        state += [(k, v) for k, v in (("mode", cmp.mode), ("q", cmp.q), ("cols", ",".join(cmp.cols))) if v]
        return {
            **context,
            "charts": run_compare_charts(cmp),
            "numeric_columns": cmp.numeric_columns(),
            "chart_state": state,
        }
    page = run_compare_page(cmp)
    context.update(
        page=page,
        rows=run_compare_rows(cmp, list(page.object_list)),
        columns=cmp.columns(),
        show={
            "inputs": any(cmp.shows(f"in:{k}") for k in cmp.input_keys),
            **{col: cmp.shows(col) for col in ("tokens", "latency", "cost")},
        },
        pager={
            "previous": cmp.query(page=page.number - 1 if page.number > 2 else None)
            if page.has_previous()
            else "",
            "next": cmp.query(page=page.number + 1) if page.has_next() else "",
        },
        mode_label=COMPARE_MODE_LABELS[cmp.mode],
    )
    if part == "rows":
        return context
    summary = run_compare_summary(cmp)
    for item in summary:
        item["baseline_query"] = cmp.query(baseline=str(item["run"].pk), page=None, x=None, y=None)
    context.update(
        eval_count=len(cmp.runs) - len(cmp.mains),
        summary=summary,
        metrics=run_compare_metrics(cmp)["rows"],
        numeric_columns=cmp.numeric_columns(),
        changes=[(cmp.baseline, run) for run in cmp.others],
    )
    return context


def run_compare_page(cmp: Comparison) -> Page:
    """The current page of line numbers (a Django Page; its count is the number of lines the mode shows)."""
    return Paginator(_compare_numbers(cmp), COMPARE_PER_PAGE).get_page(cmp.page)


def _lines_of(cmp: Comparison, numbers: Sequence[int]) -> dict[tuple[Any, int], LineResult]:
    fields = ("run_id", "line_number", "status", "inputs", "outputs", "error", "duration_ms", "usage")
    lines = LineResult.objects.filter(run_id__in=cmp.ids, line_number__in=list(numbers)).only(*fields)
    return {(line.run_id, line.line_number): line for line in lines}


def run_compare_rows(cmp: Comparison, numbers: Sequence[int]) -> list[dict[str, Any]]:
    """One row per line number: the inputs, then per main run its outputs, scores, tokens, latency and cost, each
    with its delta to the baseline, a word diff of text outputs, and whether the line regressed or improved."""
    lines = _lines_of(cmp, numbers)
    base = cmp.baseline
    rows = []
    for number in numbers:
        first = next(
            (lines[(run.pk, number)] for run in [base, *cmp.mains] if (run.pk, number) in lines), None
        )
        inputs = (first.inputs if first else None) or {}
        row: dict[str, Any] = {
            "number": number,
            "inputs": [(k, shown(inputs.get(k, ""))) for k in cmp.input_keys if cmp.shows(f"in:{k}")],
            "cells": [],
        }
        base_line = lines.get((base.pk, number))
        base_outputs = (base_line.outputs if base_line and base_line.status == "Completed" else None) or {}
        base_scores = _scores_of(cmp, base, number, lines)
        base_cost = _line_cost(cmp, base, base_line)
        for run in cmp.mains:
            line = lines.get((run.pk, number))
            is_base = run.pk == base.pk
            cell: dict[str, Any] = {"run": run, "is_baseline": is_base, "line": line, "flag": ""}
            cell["status"] = line.status if line else "Missing"
            cell["error"] = _error_message(line.error) if line and line.error else ""
            outputs = (line.outputs if line and line.status == "Completed" else None) or {}
            cell["outputs"] = []
            for key in cmp.output_keys:
                if not cmp.shows(f"out:{key}"):
                    continue
                value, old = outputs.get(key), base_outputs.get(key)
                diff = None
                if not is_base and isinstance(value, str) and isinstance(old, str):
                    diff = word_diff_html(old, value)
                cell["outputs"].append(
                    {
                        "key": key,
                        "present": key in outputs,
                        "text": shown(value) if key in outputs else "",
                        "diff": mark_safe(diff) if diff is not None else None,  # noqa: S308 (escaped by word_diff_html)
                        "delta": None if is_base else _delta(value, old, better=None),
                    }
                )
            scores = _scores_of(cmp, run, number, lines)
            cell["scores"] = []
            worse = better = False
            for score in cmp.scores:
                value = scores.get(score.label)
                delta = None if is_base else _delta(value, base_scores.get(score.label), better="higher")
                worse = worse or bool(delta and delta["cls"] == "delta-worse")
                better = better or bool(delta and delta["cls"] == "delta-better")
                if cmp.shows(score.col):
                    cell["scores"].append(
                        {
                            "label": score.label,
                            "text": shown(value) if value is not None else "",
                            "delta": delta,
                        }
                    )
            if not is_base and base_line is not None and line is not None:
                worse = worse or (base_line.status == "Completed" and line.status == "Failed")
                better = better or (base_line.status == "Failed" and line.status == "Completed")
            cell["flag"] = "regression" if worse else "improvement" if better else ""
            usage = (line.usage if line else None) or {}
            tokens = usage.get("total_tokens")
            base_usage = (base_line.usage if base_line else None) or {}
            cell["tokens"] = tokens
            cell["tokens_delta"] = (
                None if is_base else _delta(tokens, base_usage.get("total_tokens"), better="lower")
            )
            cell["latency"] = _fmt(line.duration_ms) if line else ""
            cell["latency_delta"] = (
                None
                if is_base or not line or not base_line
                else _delta(line.duration_ms, base_line.duration_ms, better="lower")
            )
            cost = _line_cost(cmp, run, line)
            cell["cost"] = _fmt_cost(cost)
            cell["cost_delta"] = None if is_base else _delta(cost, base_cost, better="lower")
            row["cells"].append(cell)
        rows.append(row)
    return rows


def _error_message(error: Any) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or error.get("type") or "failed")
    return str(error)


def _fmt_cost(cost: float | None) -> str:
    return "" if cost is None else f"${cost:.6f}".rstrip("0").rstrip(".")


def _line_cost(cmp: Comparison, run: Run, line: LineResult | None) -> float | None:
    if not line or not cmp.prices:
        return None
    return _cost(line.usage, cmp.prices.get(cmp.models.get(run.pk) or ""))


def _scores_of(
    cmp: Comparison, run: Run, number: int, lines: Mapping[tuple[Any, int], LineResult]
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for score in cmp.scores:
        evaluation = cmp.evals.get(run.pk, {}).get(score.slot)
        line = lines.get((evaluation.pk, number)) if evaluation else None
        if line is not None and line.status == "Completed" and score.key in (line.outputs or {}):
            found[score.label] = line.outputs[score.key]
    return found


def run_compare_summary(cmp: Comparison) -> list[dict[str, Any]]:
    """Per main run: lines, failures, mean latency, tokens and cost, with deltas to the baseline."""
    stats = {
        row["run_id"]: row
        for row in LineResult.objects.filter(run_id__in=cmp.main_ids)
        .values("run_id")
        .annotate(
            lines=Count("pk"),
            failed=Count("pk", filter=Q(status="Failed")),
            latency=Avg("duration_ms"),
        )
    }
    summary = []
    for run in cmp.mains:
        row = stats.get(run.pk, {})
        tokens = run_tokens(run)
        total = tokens.get("total_tokens")
        lines = row.get("lines") or 0
        price = cmp.prices.get(cmp.models.get(run.pk) or "") if cmp.prices else None
        summary.append(
            {
                "run": run,
                "is_baseline": run.pk == cmp.baseline.pk,
                "evaluations": list(cmp.evals.get(run.pk, {}).values()),
                "lines": lines,
                "failed": row.get("failed") or 0,
                "latency": row.get("latency"),
                "tokens": total,
                "tokens_per_line": (total / lines) if total and lines else None,
                "cost": _cost(tokens, price),
                "model": cmp.models.get(run.pk),
            }
        )
    base = next(item for item in summary if item["is_baseline"])
    for item in summary:
        for key in ("failed", "latency", "tokens", "tokens_per_line", "cost"):
            item[f"{key}_delta"] = (
                None if item["is_baseline"] else _delta(item[key], base[key], better="lower")
            )
        item["latency_text"] = _fmt(item["latency"])
        item["tokens_per_line_text"] = _fmt(item["tokens_per_line"])
        item["cost_text"] = _fmt_cost(item["cost"])
    return summary


def _merged_metrics(cmp: Comparison, run: Run) -> dict[str, Any]:
    metrics = dict(run.metrics or {})
    for evaluation in cmp.evals.get(run.pk, {}).values():
        for key, value in (evaluation.metrics or {}).items():
            metrics[key if key not in metrics else f"{evaluation.name}.{key}"] = value
    return metrics


def run_compare_metrics(cmp: Comparison) -> dict[str, Any]:
    """The metrics table: one row per metric (a run's own and its evaluations'), one cell per main run with the
    value and its delta to the baseline's (lower is better for losses, errors, latency, tokens and cost)."""
    merged = {run.pk: _merged_metrics(cmp, run) for run in cmp.mains}
    keys: list[str] = []
    for metrics in merged.values():
        keys += [k for k in metrics if k not in keys]
    base = merged[cmp.baseline.pk]
    rows = []
    for key in keys:
        better = _direction(key)
        cells = []
        for run in cmp.mains:
            value = merged[run.pk].get(key)
            is_base = run.pk == cmp.baseline.pk
            cells.append(
                {
                    "run": run,
                    "text": _fmt(value)
                    if _is_number(value) and not isinstance(value, bool)
                    else shown(value),
                    "value": value,
                    "delta": None if is_base else _delta(value, base.get(key), better=better),
                }
            )
        rows.append({"key": key, "better": better, "cells": cells})
    return {"rows": rows, "merged": merged}


def _value_source(cmp: Comparison, run: Run, col: str) -> tuple[Any, Any] | None:
    """(run id, SQL expression) that yields the numeric column `col` of `run`'s lines."""
    if col == "latency":
        return run.pk, F("duration_ms")
    if col == "tokens":
        return run.pk, _JsonNumber("usage", "total_tokens")
    if col.startswith("out:"):
        return run.pk, _JsonNumber("outputs", col[4:])
    score = next((s for s in cmp.scores if s.col == col), None)
    evaluation = cmp.evals.get(run.pk, {}).get(score.slot) if score else None
    if score is None or evaluation is None:
        return None
    return evaluation.pk, _JsonNumber("outputs", score.key)


def run_compare_charts(cmp: Comparison) -> dict[str, Any]:
    """Chart.js data: bars of each numeric metric per run, a histogram of column `num` per run and a scatter of
    `num` for the two runs of `x`/`y`, line by line (sampled to about a thousand points). Computed in SQL."""
    labels = [run.display_name or run.name for run in cmp.mains]
    metrics = run_compare_metrics(cmp)
    bar_keys = [row["key"] for row in metrics["rows"] if any(_is_number(c["value"]) for c in row["cells"])]
    bars = {
        "labels": bar_keys,
        "datasets": [
            {
                "label": label,
                "data": [
                    float(metrics["merged"][run.pk][k])
                    if _is_number(metrics["merged"][run.pk].get(k))
                    else None
                    for k in bar_keys
                ],
            }
            for run, label in zip(cmp.mains, labels, strict=True)
        ],
    }
    column_label = dict(cmp.numeric_columns()).get(cmp.num, cmp.num)
    sources = {run.pk: _value_source(cmp, run, cmp.num) for run in cmp.mains}
    histogram = _histogram(cmp, sources, labels, column_label)
    scatter = _scatter(cmp, sources, column_label)
    return {"bars": bars, "histogram": histogram, "scatter": scatter}


def _histogram(
    cmp: Comparison, sources: Mapping[Any, tuple[Any, Any] | None], labels: Sequence[str], column: str
) -> dict[str, Any]:
    lows, highs = [], []
    for source in sources.values():
        if source is None:
            continue
        bounds = (
            LineResult.objects.filter(run_id=source[0])
            .annotate(_v=source[1])
            .aggregate(lo=Min("_v"), hi=Max("_v"))
        )
        if bounds["lo"] is not None:
            lows.append(float(bounds["lo"]))
            highs.append(float(bounds["hi"]))
    if not lows:
        return {"column": column, "labels": [], "datasets": []}
    low, high = min(lows), max(highs)
    width = (high - low) / _HISTOGRAM_BINS or 1.0
    bins = _HISTOGRAM_BINS if high > low else 1
    datasets = []
    for run, label in zip(cmp.mains, labels, strict=True):
        counts = [0] * bins
        source = sources.get(run.pk)
        if source is not None:
            buckets = (
                LineResult.objects.filter(run_id=source[0])
                .annotate(_v=source[1])
                .exclude(_v=None)
                .annotate(_b=Floor((F("_v") - Value(low)) / Value(width)))
                .values("_b")
                .annotate(n=Count("pk"))
            )
            for bucket in buckets:
                counts[min(max(int(bucket["_b"]), 0), bins - 1)] += bucket["n"]
        datasets.append({"label": label, "data": counts})
    edges = [low + i * width for i in range(bins)]
    return {"column": column, "labels": [_fmt(edge) for edge in edges], "datasets": datasets}


def _scatter(cmp: Comparison, sources: Mapping[Any, tuple[Any, Any] | None], column: str) -> dict[str, Any]:
    if cmp.scatter is None:
        return {"column": column, "x": "", "y": "", "points": []}
    run_x, run_y = cmp.scatter
    source_x, source_y = sources.get(run_x.pk), sources.get(run_y.pk)
    result: dict[str, Any] = {
        "column": column,
        "x": run_x.display_name or run_x.name,
        "y": run_y.display_name or run_y.name,
        "points": [],
    }
    if source_x is None or source_y is None:
        return result
    total = max(run_x.total_lines, run_y.total_lines, 1)
    step = max(math.ceil(total / _SCATTER_POINTS), 1)
    lines = LineResult.objects.filter(run_id__in={source_x[0], source_y[0]})
    if step > 1:
        lines = lines.annotate(_m=Mod("line_number", Value(step))).filter(_m=0)
    pairs = (
        lines.values("line_number")
        .annotate(_x=Max(_when_run(source_x[0], source_x[1])), _y=Max(_when_run(source_y[0], source_y[1])))
        .filter(_x__isnull=False, _y__isnull=False)
        .order_by("line_number")
        .values_list("line_number", "_x", "_y")
    )
    result["points"] = [{"x": vx, "y": vy, "line": number} for number, vx, vy in pairs[: _SCATTER_POINTS * 2]]
    return result


def run_compare_changes(user: User, *, a: str, b: str) -> dict[str, Any]:
    """What changed between the snapshots of runs `a` and `b`: file diffs and the DAG diff, via flows_app."""
    from flows_app.authoring import file_changes_shown
    from flows_app.flow_graph import flow_graph, graph_diff
    from flows_app.services import flow_version_diff, snapshot_materialize
    from flows_app.workspace import workspace_state

    old, new = run_get_for(user, a), run_get_for(user, b)
    diff = flow_version_diff(a=old.snapshot, b=new.snapshot)
    changes = file_changes_shown(diff["files"])

    def graph_of(run: Run) -> Any:
        return flow_graph(workspace_state(snapshot_materialize(snapshot_sha=run.snapshot_id)).flow)

    graph = graph_diff(graph_of(old), graph_of(new), changed_files=[c["path"] for c in changes])
    return {
        "old": old,
        "new": new,
        "changes": changes,
        "graph": graph,
        "dag": diff["dag"],
        "added": sum(c["added"] for c in changes),
        "removed": sum(c["removed"] for c in changes),
        "same_snapshot": old.snapshot_id == new.snapshot_id,
        "settings": _settings_changes(old, new),
    }


def _settings_changes(old: Run, new: Run) -> list[dict[str, str]]:
    """The run settings that differ besides the files: variant, data, mapping, connections, init, environment."""
    fields = ("variant", "column_mapping", "connections", "init", "environment_variables")
    found = [
        {"name": name, "old": shown(getattr(old, name)), "new": shown(getattr(new, name))}
        for name in fields
        if getattr(old, name) != getattr(new, name)
    ]
    if old.dataset_id != new.dataset_id:
        found.append({"name": "dataset", "old": str(old.dataset or ""), "new": str(new.dataset or "")})
    return found


def _export_frame(cmp: Comparison, numbers: Sequence[int], columns: Sequence[str]) -> Any:
    import pandas as pd

    lines = _lines_of(cmp, numbers)
    records = []
    for number in numbers:
        first = next(
            (lines[(run.pk, number)] for run in [cmp.baseline, *cmp.mains] if (run.pk, number) in lines), None
        )
        record: dict[str, Any] = {"line_number": number}
        for key in cmp.input_keys:
            record[f"inputs.{key}"] = _cell((first.inputs or {}).get(key)) if first else ""
        for run in cmp.runs:
            line = lines.get((run.pk, number))
            prefix = run.name
            record[f"{prefix}.status"] = line.status if line else ""
            outputs = (line.outputs if line else None) or {}
            for key in _export_output_keys(cmp, run):
                record[f"{prefix}.outputs.{key}"] = _cell(outputs.get(key))
            record[f"{prefix}.error"] = _error_message(line.error) if line and line.error else ""
            record[f"{prefix}.duration_ms"] = _cell(line.duration_ms) if line else ""
            record[f"{prefix}.total_tokens"] = _cell(
                ((line.usage if line else None) or {}).get("total_tokens")
            )
        records.append(record)
    return pd.DataFrame.from_records(records, columns=list(columns))


def _cell(value: Any) -> str:
    """How exports write a value: text as it is, nothing as empty, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _export_output_keys(cmp: Comparison, run: Run) -> list[str]:
    if run.pk in cmp.evals:
        return cmp.output_keys
    slot = next(s for slots in cmp.evals.values() for s, r in slots.items() if r.pk == run.pk)
    return [score.key for score in cmp.scores if score.slot == slot]


def run_compare_export_columns(cmp: Comparison) -> list[str]:
    """The export's columns: line_number, inputs.<k>, then per run <name>.status, .outputs.<k>, .error,
    .duration_ms and .total_tokens, in the order the runs were given."""
    columns = ["line_number", *[f"inputs.{k}" for k in cmp.input_keys]]
    for run in cmp.runs:
        columns.append(f"{run.name}.status")
        columns += [f"{run.name}.outputs.{k}" for k in _export_output_keys(cmp, run)]
        columns += [f"{run.name}.error", f"{run.name}.duration_ms", f"{run.name}.total_tokens"]
    return columns


def run_compare_export(cmp: Comparison, *, fmt: str) -> Iterator[str]:
    """The comparison's rows (same join, mode and search as the page; every page) as CSV or a JSON array,
    produced in batches of lines with pandas so memory stays flat however many lines there are."""
    columns = run_compare_export_columns(cmp)
    numbers = _compare_numbers(cmp)
    last: int | None = None
    first = True
    if fmt == "json":
        yield "["
    while True:
        batch_query = numbers if last is None else numbers.filter(line_number__gt=last)
        batch = list(batch_query[:_EXPORT_BATCH])
        if not batch and fmt == "csv" and first:
            yield ",".join(_csv_quote(c) for c in columns) + "\n"
        if not batch:
            break
        frame = _export_frame(cmp, batch, columns)
        if fmt == "json":
            records = frame.to_json(orient="records", force_ascii=False)[1:-1]
            yield ("" if first else ",") + records
        else:
            yield frame.to_csv(index=False, header=first, lineterminator="\n")
        first = False
        last = batch[-1]
    if fmt == "json":
        yield "]"


def _csv_quote(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def run_list_between(runs: QuerySet[Run], *, since: str = "", until: str = "") -> QuerySet[Run]:
    """The runs created on or after `since` and on or before `until` (ISO dates; a bad date is ignored)."""
    import datetime as dt

    def day(text: str) -> dt.date | None:
        try:
            return dt.date.fromisoformat(text.strip()) if text and text.strip() else None
        except ValueError:
            return None

    start, end = day(since), day(until)
    if start is not None:
        runs = runs.filter(created_at__date__gte=start)
    if end is not None:
        runs = runs.filter(created_at__date__lte=end)
    return runs


RUN_LIST_COLUMNS = (
    ("flow", "Flow"),
    ("status", "Status"),
    ("progress", "Progress"),
    ("created", "Created"),
    ("author", "Author"),
    ("tags", "Tags"),
    ("tokens", "Tokens"),
)
RUN_LIST_DEFAULT_COLUMNS = ("flow", "status", "progress", "created", "author")


def run_list_columns(runs: Iterable[Run], *, cols: Sequence[str] = ()) -> dict[str, Any]:
    """The run list's column chooser (fixed columns, then one `m:<key>` per metric of the listed runs) and
    which are shown; attaches `list_metrics` (the shown metrics' values) and `list_tags` to each run."""
    runs = list(runs)
    cols = [part.strip() for col in cols for part in col.split(",") if part.strip()]
    metric_keys: list[str] = []
    for run in runs:
        metric_keys += [k for k in (run.metrics or {}) if k not in metric_keys]
    wanted = set(cols) if cols else set(RUN_LIST_DEFAULT_COLUMNS)
    columns = [{"id": col, "label": label, "shown": col in wanted} for col, label in RUN_LIST_COLUMNS]
    columns += [{"id": f"m:{k}", "label": k, "shown": f"m:{k}" in wanted} for k in metric_keys]
    shown_metrics = [k for k in metric_keys if f"m:{k}" in wanted]
    for run in runs:
        run.list_metrics = [shown((run.metrics or {}).get(k, "")) for k in shown_metrics]
        run.list_tags = [f"{k}={v}" if v else str(k) for k, v in (run.tags or {}).items()]
    return {
        "columns": columns,
        "shown": {c["id"] for c in columns if c["shown"]},
        "metric_columns": shown_metrics,
        "cols_param": ",".join(c["id"] for c in columns if c["shown"]),
    }


# --- online endpoints (only their owner sees them; anyone else gets Http404) -------------------------------

ENDPOINT_MONITOR_WINDOWS = {"1h": (1, 12), "24h": (24, 24), "7d": (24 * 7, 28)}


def endpoint_list_for(user: User) -> QuerySet[Any]:
    """The user's endpoints with their deployments (and what each was deployed from) prefetched."""
    from django.db.models import Prefetch

    from runs_app.models import Deployment, Endpoint

    if not user.is_authenticated:
        return Endpoint.objects.none()
    deployments = Deployment.objects.select_related("run", "flow", "flow_version").order_by(
        "created_at", "id"
    )
    return (
        Endpoint.objects.filter(owner=user)
        .prefetch_related(Prefetch("deployments", queryset=deployments), "keys")
        .order_by("name")
    )


def endpoint_get_for(user: User, name: str) -> Any:
    """One endpoint of the user, by name; Http404 for anything else (never 403)."""
    endpoint = endpoint_list_for(user).filter(name=str(name)).first()
    if endpoint is None:
        raise Http404("No such endpoint.")
    return endpoint


def deployment_get_for(user: User, endpoint_name: str, name: str) -> Any:
    """One deployment of one of the user's endpoints; Http404 otherwise."""
    endpoint = endpoint_get_for(user, endpoint_name)
    deployment = next((d for d in endpoint.deployments.all() if d.name == name), None)
    if deployment is None:
        raise Http404("No such deployment.")
    deployment.endpoint = endpoint
    return deployment


def endpoint_keys_of(endpoint: Any) -> dict[str, Any]:
    """The endpoint's keys by slot ("primary", "secondary"): prefixes and dates, never the keys."""
    return {key.slot: key for key in endpoint.keys.all()}


def deployment_interface(deployment: Any) -> Any:
    """The served flow's inputs and outputs (`flowengine.serving.FlowInterface`), read without running it."""
    from flowengine import load_flow
    from flowengine.serving import FlowInterface
    from flows_app.services import snapshot_materialize

    return FlowInterface.from_flow(load_flow(snapshot_materialize(snapshot_sha=deployment.snapshot_id)))


def _percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    index = max(0, min(len(values) - 1, int(round(fraction * len(values) + 0.5)) - 1))
    return values[index]


def _monitor_numbers(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    latencies = sorted(r[2] for r in rows)
    return {
        "requests": len(rows),
        "errors": sum(1 for r in rows if r[1] >= 400),
        "p50": _percentile(latencies, 0.5),
        "p95": _percentile(latencies, 0.95),
        "tokens": sum(r[3] for r in rows),
    }


def endpoint_monitoring(endpoint: Any, *, window: str = "24h", now: Any = None) -> dict[str, Any]:
    """Requests, errors (status >= 400), p50 / p95 latency (ms) and tokens of the window, in total, per
    deployment and per time bucket (oldest first)."""
    import datetime as dt

    from django.utils import timezone

    from runs_app.models import EndpointRequest

    hours, buckets = ENDPOINT_MONITOR_WINDOWS.get(window, ENDPOINT_MONITOR_WINDOWS["24h"])
    window = window if window in ENDPOINT_MONITOR_WINDOWS else "24h"
    end = now or timezone.now()
    start = end - dt.timedelta(hours=hours)
    step = (end - start) / buckets
    rows = list(
        EndpointRequest.objects.filter(endpoint=endpoint, time__gte=start, time__lte=end)
        .order_by("time")
        .values_list("time", "status", "latency_ms", "total_tokens", "deployment__name")[:200_000]
    )
    grouped: list[list[tuple[Any, ...]]] = [[] for _ in range(buckets)]
    for row in rows:
        grouped[min(buckets - 1, int((row[0] - start) / step))].append(row)
    series = [{"start": start + step * i, **_monitor_numbers(group)} for i, group in enumerate(grouped)]
    by_deployment: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_deployment.setdefault(row[4] or "(deleted)", []).append(row)
    return {
        "window": window,
        "start": start,
        "end": end,
        "total": _monitor_numbers(rows),
        "deployments": [
            {"name": name, **_monitor_numbers(group)} for name, group in sorted(by_deployment.items())
        ],
        "series": series,
    }
