"""Writes of the runs app: datasets, run submission, chunk execution on Celery workers, cancel, resume.

How a run executes (DESIGN.md "Execution modes"):

- `run_create` resolves the column mapping once (refusing a bad one before anything is stored), stores the
  Run with an immutable snapshot, splits its line numbers into RunChunk rows and enqueues one Celery task
  per chunk when the transaction commits.
- A chunk task (`run_execute_chunk`) claims its chunk with a conditional update, materialises the snapshot
  locally (cached by hash, read from the database only), starts or reuses ONE runner process for the run and
  runs the chunk's missing lines concurrently in it. Line results are written once per (run, line number);
  a chunk delivered again after its worker died computes only what is still missing.
- The chunk that finishes last claims the aggregation on the run with a conditional update, so it runs once.
- Heartbeats on chunks and runs let `run_reap_stale` requeue the chunks of dead workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import itertools
import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connection as db_connection
from django.db import transaction
from django.db.models import F, Q
from django.db.utils import DataError as UnstorableData
from django.utils import timezone

from runs_app import streaming
from runs_app.models import (
    ACTIVE_STATUSES,
    ChunkStatus,
    Dataset,
    LineResult,
    LineStatus,
    Run,
    RunChunk,
    RunLog,
    RunStatus,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser

    from flowengine.model import Flow as EngineFlow
    from flows_app.models import Flow, FlowVersion, Snapshot

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32
MAX_CONCURRENCY = 512
DEFAULT_LINE_TIMEOUT = 600
# Sync tools of the lines in flight share one thread pool in the runner; each thread reserves address space
# that the runner's memory limit counts, so the pool stays smaller than the lines in flight.
MAX_TOOL_THREADS = 64
# A chunk claimed this many times without finishing (its workers kept dying) fails its missing lines.
MAX_CHUNK_ATTEMPTS = 5
# A line whose runner died while it ran is retried alone; this many deaths fail it with the runner's reason.
MAX_LINE_DEATHS = 3
FLUSH_SECONDS = 0.5
FLUSH_LINES = 200
WRITE_BATCH = 100
DATASET_PREVIEW_ROWS = 20
DATA_SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "json"}
# The events a batch line sends back: results, logs, spans for the line's trace.
LINE_EVENTS = ("line_completed", "log", "error", "trace_span")
DEATH_TYPES = ("RunnerDied", "RunnerStopped")


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


def heartbeat_seconds() -> float:
    """How often a running chunk writes its heartbeat."""
    return float(_setting("STUDIO_RUN_HEARTBEAT_SECONDS", 2))


def stale_seconds() -> float:
    """A running chunk whose heartbeat is older than this belongs to a dead worker."""
    return float(_setting("STUDIO_RUN_STALE_SECONDS", 30))


def requeue_seconds() -> float:
    """A queued chunk waiting longer than this is enqueued again (the broker may have lost its message)."""
    return float(_setting("STUDIO_RUN_REQUEUE_SECONDS", 300))


def reaper_interval_seconds() -> float:
    """How often each worker runs `run_reap_stale`."""
    return float(_setting("STUDIO_RUN_REAPER_SECONDS", 15))


class DatasetError(ValueError):
    """A data file cannot be used; `.problems` names every broken line as `file:line: message`."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunError(ValueError):
    """A run cannot be created or changed; `.field` names the field at fault when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# --- datasets -------------------------------------------------------------------------------------------


def dataset_parse(*, filename: str, data: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The format and rows of a data file; raises DatasetError naming every broken line of `filename`."""
    from flowengine.batch import DataError, load_data

    name = Path(filename or "data.jsonl").name
    suffix = Path(name).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DatasetError([f"{name}: a dataset must be a .jsonl, .csv, .tsv or .json file"])
    if not data.strip():
        raise DatasetError([f"{name}: the file is empty"])
    with tempfile.TemporaryDirectory(prefix="flowstudio-dataset-") as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        try:
            rows = load_data(path)
        except DataError as exc:
            raise DatasetError([p.replace(str(path), name) for p in exc.problems]) from None
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DatasetError([f"{name}:{line}: line {line} is not valid UTF-8"]) from None
    if not rows:
        raise DatasetError([f"{name}: the file has no rows"])
    return DATA_SUFFIXES[suffix], rows


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


@transaction.atomic
def dataset_create(
    *, owner: AbstractBaseUser, name: str, filename: str, data: bytes, team: Any = None
) -> Dataset:
    """Validate every line of a jsonl/csv file, then store it as a blob; nothing is stored on error."""
    from flows_app.services import snapshot_from_files

    if team is not None:
        from accounts_app.selectors import user_team_ids

        if team.pk not in set(user_team_ids(owner)):
            raise RunError(f"You are not a member of team '{team}'.", field="team")
    fmt, rows = dataset_parse(filename=filename, data=data)
    base = Path(filename).name
    # A one-file snapshot stores the content as a deduplicated blob through the storage service.
    snapshot = snapshot_from_files(files={f"data{Path(base).suffix.lower()}": data})
    blob_sha = next(iter(snapshot.manifest.values()))
    dataset = Dataset.objects.create(
        owner=owner,
        team=team,
        name=(name or Path(base).stem)[:200],
        filename=base[:255],
        blob_id=blob_sha,
        format=fmt,
        size=len(data),
        row_count=len(rows),
        columns=_columns(rows),
    )
    _rows_cache_put(blob_sha, fmt, rows)
    return dataset


def dataset_delete(*, user: AbstractBaseUser, dataset: Dataset) -> None:
    """Delete a dataset its owner no longer needs; refused while a run refers to it."""
    if dataset.owner_id != user.pk:
        raise RunError("Only the owner of a dataset may delete it.")
    if dataset.runs.exists():
        raise RunError(f"Dataset '{dataset.name}' is used by runs; delete those runs first.")
    dataset.delete()


_ROWS_CACHE: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
_ROWS_LOCK = threading.Lock()
_ROWS_CACHE_SIZE = 4


def _rows_cache_put(blob_sha: str, fmt: str, rows: list[dict[str, Any]]) -> None:
    with _ROWS_LOCK:
        _ROWS_CACHE[f"{blob_sha}.{fmt}"] = rows
        _ROWS_CACHE.move_to_end(f"{blob_sha}.{fmt}")
        while len(_ROWS_CACHE) > _ROWS_CACHE_SIZE:
            _ROWS_CACHE.popitem(last=False)


def dataset_rows(dataset: Dataset) -> list[dict[str, Any]]:
    """Every row of the dataset, parsed once per process (a blob never changes)."""
    from flows_app.models import Blob

    key = f"{dataset.blob_id}.{dataset.format}"
    with _ROWS_LOCK:
        rows = _ROWS_CACHE.get(key)
        if rows is not None:
            _ROWS_CACHE.move_to_end(key)
            return rows
    data = bytes(Blob.objects.values_list("data", flat=True).get(sha256=dataset.blob_id))
    _, rows = dataset_parse(filename=f"{dataset.name}.{dataset.format}", data=data)
    _rows_cache_put(dataset.blob_id, dataset.format, rows)
    return rows


# --- run submission --------------------------------------------------------------------------------------


def _load_engine_flow(snapshot_sha: str) -> EngineFlow:
    from flowengine import FlowValidationError, load_flow
    from flows_app.services import snapshot_materialize

    try:
        return load_flow(snapshot_materialize(snapshot_sha=snapshot_sha))
    except FlowValidationError as exc:
        raise RunError(
            "The flow cannot be loaded:\n" + "\n".join(str(p) for p in exc.problems), field="flow"
        ) from None


def _check_flow(flow: EngineFlow, variant: str | None) -> EngineFlow:
    from flowengine import FlowValidationError, validate

    problems = validate(flow)
    if problems:
        raise RunError("The flow is not valid:\n" + "\n".join(str(p) for p in problems), field="flow")
    try:
        return flow.with_variant(variant) if variant else flow
    except FlowValidationError as exc:
        raise RunError("; ".join(str(p) for p in exc.problems), field="variant") from None


def _base_lines(base_run: Run) -> Any:
    """What `${run.outputs.x}` / `${run.inputs.x}` read: the completed lines of the base run."""
    from flowengine.batch import BaseRunLines

    outputs: dict[int, dict[str, Any]] = {}
    inputs: dict[int, dict[str, Any]] = {}
    rows = dataset_rows(base_run.dataset) if base_run.dataset_id else None
    completed = LineResult.objects.filter(run=base_run, status=LineStatus.COMPLETED).order_by("line_number")
    for number, line_outputs, line_inputs in completed.values_list("line_number", "outputs", "inputs"):
        outputs[number] = dict(line_outputs or {})
        # `${run.inputs.x}` reads the base run's data row, as local `flowstudio run create` does.
        inputs[number] = dict(rows[number]) if rows is not None and number < len(rows) else dict(line_inputs)
    return BaseRunLines(name=base_run.name, outputs=outputs, inputs=inputs)


def _resolve(
    *,
    flow: EngineFlow,
    rows: list[dict[str, Any]] | None,
    mapping: Mapping[str, Any] | None,
    base: Any,
    data_name: str,
) -> list[tuple[int, dict[str, Any]]]:
    from flowengine.batch import MappingError, resolve_lines

    try:
        return resolve_lines(
            flow_inputs=flow.inputs, data=rows, mapping=mapping, base=base, data_name=data_name
        )
    except MappingError as exc:
        raise RunError(str(exc), field="column_mapping") from None


def _default_name(flow_name: str, kind: str, variant: str | None) -> str:
    from flowengine.runs import default_run_name

    name = default_run_name(Path(flow_name or "flow"), kind, variant)
    while Run.objects.filter(name=name).exists():
        name = f"{name}_{uuid.uuid4().hex[:4]}"
    return name


# Pool processes a run's chunks are likely spread over: one to four workers at the default pool size.
CHUNK_SPREADS = (2, 4, 6, 8)
# What starting and finishing a chunk (claim, runner hand-over, writes, the next message) costs, in waves.
CHUNK_START_WAVES = 0.5


def _chunk_size(total: int, concurrency: int) -> int:
    """The most lines a chunk may take: about 50 to 200, in whole waves of the lines in flight (at least three).

    Of the few whole-wave sizes near that, the one whose chunks split most evenly over 2, 4, 6 or 8 pool
    processes: 21 chunks on 4 processes take 6 rounds, the last with one chunk running alone, where 16
    slightly larger chunks take 4 (a second worker then adds its full share). `_chunk_parts` then cuts the
    run into that many chunks of equal length.
    """
    base = 50 if total <= 1000 else 100 if total <= 10000 else 200
    concurrency = max(1, concurrency)
    least = max(3, round(base / concurrency))
    waves_total = max(1, -(-total // concurrency))

    def cost(waves: int) -> float:
        chunks = -(-total // (waves * concurrency))
        rounds = (-(-chunks // spread) for spread in CHUNK_SPREADS)
        # Time to finish on each spread, relative to its ideal of every process busy all along.
        return sum(
            r * (waves + CHUNK_START_WAVES) * spread / waves_total
            for r, spread in zip(rounds, CHUNK_SPREADS, strict=True)
        )

    waves = min(range(least, least + 3), key=lambda w: (round(cost(w), 6), w))
    return min(waves * concurrency, 2000)


def _chunk_parts(numbers: Sequence[int], size: int) -> list[Sequence[int]]:
    """`numbers` cut into as few chunks as `size` allows, of equal length (one line apart at most).

    An execution takes on the run's next chunk while its last lines finish, so a chunk's lines need not fill
    whole waves; what counts is that the processes sharing a run get equal shares: 2,000 lines at 64 in
    flight are 8 chunks of 250, 1,000 lines for each of two processes, not 1,024 for one and 976 for the other.
    """
    count = -(-len(numbers) // max(1, size))
    bounds = [len(numbers) * i // count for i in range(count + 1)]
    return [numbers[a:b] for a, b in itertools.pairwise(bounds)]


def _node_connection_overrides(
    files: dict[str, bytes], flow_file: str, overrides: Mapping[str, Any]
) -> dict[str, bytes]:
    """The snapshot files with run.yml `connections` baked into the DAG (node -> {connection, deployment_name})."""
    import yaml

    data = yaml.safe_load(files[flow_file].decode("utf-8")) or {}
    nodes = list(data.get("nodes") or [])
    for variants in (data.get("node_variants") or {}).values():
        for variant in (variants.get("variants") or {}).values():
            if isinstance(variant.get("node"), dict):
                nodes.append(variant["node"])
    by_connection = {str(k): str(v) for k, v in overrides.items() if isinstance(v, str)}
    for key, value in overrides.items():
        if isinstance(value, str):
            continue
        if not isinstance(value, Mapping):
            raise RunError(f"connections: '{key}' must map to {{connection: name}}", field="connections")
        targets = [n for n in nodes if n.get("name") == key]
        if not targets:
            raise RunError(f"connections: the flow has no node '{key}'", field="connections")
        for node in targets:
            for name, setting in value.items():
                if name == "connection":
                    node["connection"] = setting
                else:
                    node.setdefault("inputs", {})[name] = setting
    if by_connection:
        # The studio's form maps a connection name the flow uses to another connection of the user's.
        for node in nodes:
            if node.get("connection") in by_connection:
                node["connection"] = by_connection[node["connection"]]
    changed = dict(files)
    changed[flow_file] = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")
    return changed


def _snapshot_with_overrides(snapshot: Snapshot, flow: EngineFlow, overrides: Mapping[str, Any]) -> Snapshot:
    from flows_app.services import snapshot_files, snapshot_from_files

    if not overrides:
        return snapshot
    if flow.kind != "dag":
        raise RunError("connections overrides apply to the nodes of DAG flows only", field="connections")
    return snapshot_from_files(
        files=_node_connection_overrides(snapshot_files(snapshot=snapshot), flow.file, overrides)
    )


def _copy_lines(*, source: Run, target: Run, exclude: set[int]) -> int:
    """Copy the source run's completed line results into `target` (resume, rerun); returns how many."""
    copied = 0
    batch: list[LineResult] = []
    completed = LineResult.objects.filter(run=source, status=LineStatus.COMPLETED).order_by("line_number")
    for line in completed.iterator(chunk_size=1000):
        if line.line_number in exclude:
            continue
        batch.append(
            LineResult(
                run=target,
                line_number=line.line_number,
                status=line.status,
                inputs=line.inputs,
                outputs=line.outputs,
                error=line.error,
                duration_ms=line.duration_ms,
                usage=line.usage,
                aggregation_inputs=line.aggregation_inputs,
                trace=line.trace,
            )
        )
        if len(batch) >= 500:
            LineResult.objects.bulk_create(batch, ignore_conflicts=True)
            copied += len(batch)
            batch = []
    if batch:
        LineResult.objects.bulk_create(batch, ignore_conflicts=True)
        copied += len(batch)
    return copied


@transaction.atomic
def run_create(
    *,
    user: AbstractBaseUser,
    flow_version: FlowVersion | None = None,
    snapshot: Snapshot | None = None,
    flow: Flow | None = None,
    dataset: Dataset | None = None,
    data_path: str | None = None,
    column_mapping: Mapping[str, Any] | None = None,
    variant: str | None = None,
    base_run: Run | None = None,
    name: str | None = None,
    display_name: str = "",
    connections: Mapping[str, Any] | None = None,
    environment_variables: Mapping[str, Any] | None = None,
    init: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
    line_timeout: int | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str = "",
    resumed_from: Run | None = None,
    reuse_lines_from: Run | None = None,
    rerun_lines: Iterable[int] | None = None,
) -> Run:
    """Submit a batch run (dataset) or an evaluation run (`base_run`) of a flow version or bare snapshot.

    The column mapping is resolved against every line now, so a mapping that does not fit is refused before
    anything is stored. Chunk tasks are enqueued when the transaction commits. With `reuse_lines_from`, that
    run's completed lines (except `rerun_lines`) are copied and only the others run.
    """
    if flow_version is not None:
        snapshot = flow_version.snapshot
        flow = flow_version.flow
    if snapshot is None:
        raise RunError("a run needs a flow version or a snapshot", field="flow")
    if base_run is not None and base_run.status != RunStatus.COMPLETED:
        raise RunError(
            f"run '{base_run.name}' has status {base_run.status}; only a Completed run can be evaluated",
            field="run",
        )
    if data_path:
        from flows_app.services import FlowPathError, snapshot_file_read

        try:
            data = snapshot_file_read(snapshot=snapshot, path=data_path)
        except FlowPathError as exc:
            raise RunError(f"data: {exc}", field="data") from None
        try:
            dataset = dataset_create(
                owner=user, name=f"{flow.name if flow else 'flow'}/{data_path}", filename=data_path, data=data
            )
        except DatasetError as exc:
            raise RunError(str(exc), field="data") from None
    if dataset is None and base_run is None:
        raise RunError("a run needs data (a dataset or a data file of the flow) or a base run", field="data")
    engine_flow = _check_flow(_load_engine_flow(snapshot.sha256), variant)
    snapshot = _snapshot_with_overrides(snapshot, engine_flow, dict(connections or {}))
    rows = dataset_rows(dataset) if dataset is not None else None
    base = _base_lines(base_run) if base_run is not None else None
    lines = _resolve(
        flow=engine_flow,
        rows=rows,
        mapping=dict(column_mapping or {}) or None,
        base=base,
        data_name=dataset.filename if dataset is not None else "data",
    )
    env = {str(k): str(v) for k, v in (environment_variables or {}).items()}
    if concurrency is None and env.get("PF_WORKER_COUNT", "").isdigit():
        concurrency = int(env["PF_WORKER_COUNT"])
    concurrency = max(
        1, min(int(concurrency or _setting("STUDIO_RUN_CONCURRENCY", DEFAULT_CONCURRENCY)), MAX_CONCURRENCY)
    )
    line_timeout = max(
        1, int(line_timeout or _setting("STUDIO_RUNNER_TIMEOUT_SECONDS", DEFAULT_LINE_TIMEOUT))
    )
    name = (name or "").strip()
    if name and Run.objects.filter(name=name).exists():
        raise RunError(f"a run named '{name}' already exists; choose another name", field="name")
    numbers = [n for n, _ in lines]
    size = _chunk_size(len(numbers), concurrency)
    parts = _chunk_parts(numbers, size)
    run = Run.objects.create(
        name=name or _default_name(flow.name if flow else "flow", engine_flow.kind, variant),
        display_name=display_name or "",
        description=description or "",
        tags={str(k): str(v) for k, v in (tags or {}).items()},
        owner=user,
        flow=flow,
        flow_version=flow_version,
        snapshot=snapshot,
        flow_kind=engine_flow.kind,
        dataset=dataset,
        column_mapping=dict(column_mapping or {}),
        variant=variant or "",
        base_run=base_run,
        resumed_from=resumed_from,
        connections=dict(connections or {}),
        environment_variables=env,
        init=dict(init or {}),
        concurrency=concurrency,
        line_timeout=line_timeout,
        chunk_size=max((len(part) for part in parts), default=size),
        total_lines=len(numbers),
    )
    if not run.display_name:
        run.display_name = run.name
        run.save(update_fields=["display_name"])
    # The copied lines' usage, by line number: a chunk copied whole is done, with its lines' tokens.
    existing: dict[int, Any] = {}
    if reuse_lines_from is not None:
        _copy_lines(source=reuse_lines_from, target=run, exclude=set(rerun_lines or ()))
        existing = dict(LineResult.objects.filter(run=run).values_list("line_number", "usage"))
    now = timezone.now()
    chunks = []
    for index, part in enumerate(parts):
        done = all(n in existing for n in part)
        chunks.append(
            RunChunk(
                run=run,
                index=index,
                start=part[0],
                stop=part[-1] + 1,
                status=ChunkStatus.DONE if done else ChunkStatus.QUEUED,
                enqueued_at=None if done else now,
                finished_at=now if done else None,
                tokens=_sum_usage(existing[n] for n in part) if done else {},
            )
        )
    RunChunk.objects.bulk_create(chunks, batch_size=500)
    run_log_write(run=run, text=_submit_summary(run, len(existing)))
    queued = list(RunChunk.objects.filter(run=run, status=ChunkStatus.QUEUED).values_list("pk", flat=True))
    if queued:
        transaction.on_commit(lambda: _enqueue_chunks(queued))
    else:
        # Nothing left to compute (no lines, or every line copied): aggregate and finish right away.
        Run.objects.filter(pk=run.pk).update(aggregation_claimed_at=now, started_at=now)
        transaction.on_commit(lambda: _enqueue_aggregate(run.pk))
    return run


@transaction.atomic
def run_submit(
    *,
    user: AbstractBaseUser,
    flow_version: FlowVersion,
    dataset: Dataset | None = None,
    column_mapping: Mapping[str, Any] | None = None,
    variants: Sequence[str] = (),
    base_run: Run | None = None,
    name: str | None = None,
    connections: Mapping[str, Any] | None = None,
    concurrency: int | None = None,
    line_timeout: int | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str = "",
    evaluations: Sequence[Mapping[str, Any]] = (),
) -> list[Run]:
    """The submit wizard: one run per variant (or one run), each evaluated by `evaluations` once it completes.

    `evaluations` items are {"flow_version": FlowVersion, "column_mapping": {...}}; each becomes an evaluation
    run over its batch run (and the same dataset) as soon as that run is Completed. All or nothing.
    """
    from flows_app.selectors import flow_version_get_for

    pending = []
    for evaluation in evaluations:
        version = evaluation["flow_version"]
        # Only flows the submitter can see may evaluate; the check is repeated when the evaluation starts.
        flow_version_get_for(user, version.flow_id, version.number)
        pending.append(
            {"flow_version": version.pk, "column_mapping": dict(evaluation.get("column_mapping") or {})}
        )
    runs = []
    for index, variant in enumerate(list(variants) or [None]):
        run = run_create(
            user=user,
            flow_version=flow_version,
            dataset=dataset,
            column_mapping=column_mapping,
            variant=variant,
            base_run=base_run,
            name=(f"{name}_{index}" if name and len(variants) > 1 else name),
            connections=connections,
            concurrency=concurrency,
            line_timeout=line_timeout,
            tags=tags,
            description=description,
        )
        if pending:
            Run.objects.filter(pk=run.pk).update(pending_evaluations=pending)
            run.pending_evaluations = pending
        runs.append(run)
    return runs


def _start_pending_evaluations(run: Run) -> None:
    """Create the evaluation runs the wizard queued behind `run`; a failing one is logged, not raised."""
    from flows_app.models import FlowVersion

    for item in run.pending_evaluations or []:
        version = (
            FlowVersion.objects.select_related("flow", "snapshot").filter(pk=item.get("flow_version")).first()
        )
        if version is None:
            run_log_write(run=run, text="evaluation not started: its flow version no longer exists")
            continue
        try:
            evaluation = run_create(
                user=run.owner,
                flow_version=version,
                base_run=run,
                dataset=run.dataset,
                column_mapping=item.get("column_mapping") or {},
                concurrency=run.concurrency,
                line_timeout=run.line_timeout,
                tags=run.tags,
            )
        except (RunError, DatasetError) as exc:
            run_log_write(
                run=run, text=f"evaluation with {version.flow.name} v{version.number} not started: {exc}"
            )
            continue
        run_log_write(run=run, text=f"evaluation run {evaluation.name} started")
    Run.objects.filter(pk=run.pk).update(pending_evaluations=[])


def _submit_summary(run: Run, reused: int) -> str:
    what = f"evaluation of run {run.base_run.name}" if run.base_run_id else "batch run"
    text = (
        f"{what} {run.name}: {run.total_lines} lines in chunks of {run.chunk_size}, "
        f"{run.concurrency} lines in flight per chunk, snapshot {run.snapshot_id[:12]}"
    )
    if reused:
        text += (
            f"; {reused} completed lines reused from run {run.resumed_from.name if run.resumed_from else ''}"
        )
    return text


def _enqueue_chunks(chunk_ids: Sequence[int]) -> None:
    from runs_app.tasks import run_chunk_task

    for chunk_id in chunk_ids:
        run_chunk_task.delay(chunk_id)


def _enqueue_aggregate(run_id: uuid.UUID | str) -> None:
    from runs_app.tasks import run_aggregate_task

    run_aggregate_task.delay(str(run_id))


def _rel(value: Any, base: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value)).replace(os.sep, "/")


def _folder_files(files: Mapping[str, bytes], folder: str) -> dict[str, bytes]:
    prefix = folder.strip("/") + "/" if folder.strip("/.") else ""
    return {path[len(prefix) :]: data for path, data in files.items() if path.startswith(prefix)}


def run_yaml_parse(run_yml: bytes) -> dict[str, Any]:
    """The fields of a prompt flow run.yml; RunError names the line of a YAML error."""
    import yaml

    try:
        data = yaml.safe_load(run_yml.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise RunError("run.yml is not UTF-8 text", field="run_yml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RunError(
            f"run.yml{where}: not valid YAML: {getattr(exc, 'problem', exc)}", field="run_yml"
        ) from None
    if not isinstance(data, dict):
        raise RunError("run.yml must be a mapping of run fields", field="run_yml")
    return data


def run_create_from_yaml(
    *, user: AbstractBaseUser, run_yml: bytes, files: Mapping[str, bytes] | None = None, **overrides: Any
) -> Run:
    """Submit a run described by prompt flow's run.yml.

    `flow` is `name`, `name@version` (a studio flow the user can see) or a folder among `files` (paths
    relative to the run.yml, e.g. an uploaded folder); `data` is a file among `files`, a file of the flow, or
    `dataset:<id>`; `run` names the base run. `environment_variables` and `init` may name files among `files`.
    """
    from flows_app.services import snapshot_from_files

    spec = run_yaml_parse(run_yml)
    spec.update({k: v for k, v in overrides.items() if v is not None})
    files = dict(files or {})
    flow_ref = spec.get("flow")
    if not isinstance(flow_ref, str) or not flow_ref.strip():
        raise RunError("run.yml: 'flow' is required", field="flow")
    flow_version = None
    snapshot = None
    folder_files = _folder_files(files, _rel(flow_ref, ".")) if files else {}
    if folder_files:
        snapshot = snapshot_from_files(files=folder_files)
    else:
        flow_version = flow_version_from_ref(user, flow_ref)
    dataset = None
    data_path = None
    data_ref = spec.get("data")
    if isinstance(data_ref, str) and data_ref.strip():
        data_ref = data_ref.strip()
        if data_ref.startswith("dataset:"):
            from runs_app.selectors import dataset_get_for

            dataset = dataset_get_for(user, data_ref.removeprefix("dataset:"))
        elif _rel(data_ref, ".") in files:
            try:
                dataset = dataset_create(
                    owner=user, name=Path(data_ref).stem, filename=data_ref, data=files[_rel(data_ref, ".")]
                )
            except DatasetError as exc:
                raise RunError(str(exc), field="data") from None
        else:
            prefix = _rel(flow_ref, ".").strip("/.") + "/"
            inside = _rel(data_ref, ".")
            data_path = inside[len(prefix) :] if inside.startswith(prefix) else data_ref
    base_run = None
    if spec.get("run"):
        from runs_app.selectors import run_get_for

        base_run = run_get_for(user, str(spec["run"]))
    env = spec.get("environment_variables") or {}
    if isinstance(env, str):
        if _rel(env, ".") not in files:
            raise RunError(
                f"environment_variables: file '{env}' was not uploaded", field="environment_variables"
            )
        env = _dotenv(files[_rel(env, ".")].decode("utf-8"))
    init = spec.get("init") or {}
    if isinstance(init, str):
        if _rel(init, ".") not in files:
            raise RunError(f"init: file '{init}' was not uploaded", field="init")
        init = json.loads(files[_rel(init, ".")].decode("utf-8"))
    mappings = {key: spec.get(key) for key in ("column_mapping", "connections", "tags")}
    mappings.update(environment_variables=env, init=init)
    for key, value in mappings.items():
        if value is not None and not isinstance(value, Mapping):
            raise RunError(f"run.yml: '{key}' must be a mapping", field=key)
    mapping = {str(k): v for k, v in (spec.get("column_mapping") or {}).items()}
    return run_create(
        user=user,
        flow_version=flow_version,
        snapshot=snapshot,
        dataset=dataset,
        data_path=data_path,
        column_mapping=mapping,
        variant=spec.get("variant"),
        base_run=base_run,
        name=spec.get("name"),
        display_name=spec.get("display_name") or "",
        description=spec.get("description") or "",
        tags=spec.get("tags") or {},
        connections=spec.get("connections") or {},
        environment_variables=env,
        init=init,
        concurrency=spec.get("concurrency"),
        line_timeout=spec.get("line_timeout"),
    )


def _dotenv(text: str) -> dict[str, str]:
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def flow_version_from_ref(user: AbstractBaseUser, ref: str) -> FlowVersion:
    """`name` (head) or `name@number` of a studio flow the user can see."""
    from django.http import Http404

    from flows_app.selectors import flow_list_for, flow_version_get_for

    name, _, number = ref.strip().partition("@")
    # The user's own flow of that name wins over flows shared with them.
    flow = flow_list_for(user).filter(name=name, owner=user).first()
    flow = flow or flow_list_for(user).filter(name=name).order_by("id").first()
    if flow is None:
        raise RunError(
            f"flow: you have no flow named '{name}' (upload the folder with the run.yml instead)",
            field="flow",
        )
    try:
        return flow_version_get_for(user, flow.pk, int(number) if number else None)
    except (Http404, ValueError):
        raise RunError(f"flow: flow '{name}' has no version '{number}'", field="flow") from None


# --- run actions ---------------------------------------------------------------------------------------------


def _require_owner(user: AbstractBaseUser, run: Run, action: str) -> None:
    if run.owner_id != user.pk:
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied(f"Only the owner of run {run.name} may {action} it.")


def run_cancel(*, user: AbstractBaseUser, run: Run) -> Run:
    """Cancel a run: queued chunks never start, running ones stop within seconds. Idempotent."""
    _require_owner(user, run, "cancel")
    now = timezone.now()
    with transaction.atomic():
        RunChunk.objects.filter(run=run, status=ChunkStatus.QUEUED).update(
            status=ChunkStatus.CANCELED, finished_at=now
        )
        Run.objects.filter(
            pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING]
        ).update(status=RunStatus.CANCELING)
    if Run.objects.filter(pk=run.pk, status=RunStatus.CANCELING).exists():
        run_log_write(run=run, text="cancel requested")
    _finish_cancel(run.pk)
    run.refresh_from_db()
    streaming.publish_progress(run, force=True)
    return run


def _finish_cancel(run_id: Any) -> bool:
    """Canceling -> Canceled once no chunk is running any more."""
    if RunChunk.objects.filter(run_id=run_id, status=ChunkStatus.RUNNING).exists():
        return False
    changed = Run.objects.filter(pk=run_id, status=RunStatus.CANCELING).update(
        status=RunStatus.CANCELED, finished_at=timezone.now()
    )
    if changed:
        _recount(run_id)
        run = Run.objects.get(pk=run_id)
        run_log_write(run=run, text="run canceled")
        streaming.publish_progress(run, force=True)
    return bool(changed)


def _same_run_kwargs(run: Run) -> dict[str, Any]:
    return {
        "flow_version": run.flow_version if run.flow_version_id else None,
        "snapshot": run.snapshot,
        "flow": run.flow,
        "dataset": run.dataset,
        "column_mapping": run.column_mapping,
        "variant": run.variant or None,
        "base_run": run.base_run,
        "environment_variables": run.environment_variables,
        "init": run.init,
        "concurrency": run.concurrency,
        "line_timeout": run.line_timeout,
        "tags": run.tags,
        "description": run.description,
    }


def run_resume(*, user: AbstractBaseUser, run: Run, name: str | None = None) -> Run:
    """A new run linked to `run` that reuses its completed lines and computes only failed or missing ones."""
    _require_owner(user, run, "resume")
    if run.is_active:
        raise RunError(
            f"run {run.name} is still {run.status}; cancel it or wait before resuming", field="run"
        )
    return _rerun(user=user, run=run, name=name, rerun=())


def run_rerun_lines(
    *, user: AbstractBaseUser, run: Run, line_numbers: Iterable[int], name: str | None = None
) -> Run:
    """A new run linked to `run` that computes `line_numbers` again (plus failed or missing lines)."""
    _require_owner(user, run, "rerun")
    if run.is_active:
        raise RunError(f"run {run.name} is still {run.status}; wait before rerunning lines", field="run")
    numbers = sorted({int(n) for n in line_numbers})
    if not numbers:
        raise RunError("choose at least one line to rerun", field="line_numbers")
    return _rerun(user=user, run=run, name=name, rerun=numbers)


def _rerun(*, user: AbstractBaseUser, run: Run, name: str | None, rerun: Sequence[int]) -> Run:
    if run.base_run_id and run.base_run.status != RunStatus.COMPLETED:
        raise RunError(f"the base run {run.base_run.name} is no longer Completed", field="run")
    kwargs = _same_run_kwargs(run)
    kwargs.pop("flow_version")
    run_new = run_create(
        user=user,
        name=name,
        display_name=f"{run.display_name or run.name} (resumed)"
        if not rerun
        else f"{run.display_name or run.name} (rerun)",
        resumed_from=run,
        reuse_lines_from=run,
        rerun_lines=rerun,
        **kwargs,
    )
    if run.flow_version_id:
        Run.objects.filter(pk=run_new.pk).update(flow_version=run.flow_version_id)
        run_new.refresh_from_db()
    return run_new


def run_clone(*, user: AbstractBaseUser, run: Run, **changes: Any) -> Run:
    """A new run with the same settings as `run`, changed by `changes` (any `run_create` argument)."""
    kwargs = _same_run_kwargs(run)
    if "flow_version" in changes or "snapshot" in changes:
        kwargs.pop("snapshot", None)
    else:
        # Same files: reuse the snapshot the run ran (its connection overrides are already in it).
        kwargs.pop("flow_version")
        kwargs["connections"] = {}
    kwargs.update(changes)
    run_new = run_create(user=user, **kwargs)
    if "flow_version" not in changes and "snapshot" not in changes and run.flow_version_id:
        Run.objects.filter(pk=run_new.pk).update(flow_version=run.flow_version_id)
        run_new.refresh_from_db()
    return run_new


def run_evaluate(
    *,
    user: AbstractBaseUser,
    run: Run,
    flow_version: FlowVersion,
    column_mapping: Mapping[str, Any],
    **kw: Any,
) -> Run:
    """A new evaluation run over the finished `run` (which is not run again)."""
    return run_create(
        user=user,
        flow_version=flow_version,
        base_run=run,
        column_mapping=column_mapping,
        dataset=kw.pop("dataset", run.dataset),
        **kw,
    )


def run_archive(*, user: AbstractBaseUser, run: Run, archived: bool = True) -> Run:
    """Archive (hide from the default list) or restore a run."""
    _require_owner(user, run, "archive")
    Run.objects.filter(pk=run.pk).update(archived=archived)
    run.archived = archived
    return run


def run_update(
    *,
    user: AbstractBaseUser,
    run: Run,
    display_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Run:
    """Change a run's display name, description or tags (like `pf run update --set`)."""
    _require_owner(user, run, "update")
    fields = []
    if display_name is not None:
        run.display_name = display_name[:255]
        fields.append("display_name")
    if description is not None:
        run.description = description
        fields.append("description")
    if tags is not None:
        run.tags = {str(k): str(v) for k, v in tags.items()}
        fields.append("tags")
    if fields:
        run.save(update_fields=fields)
    return run


def run_delete(*, user: AbstractBaseUser, run: Run) -> None:
    """Delete a finished run with its lines, chunks and logs (irreversible)."""
    _require_owner(user, run, "delete")
    if run.is_active:
        raise RunError(f"run {run.name} is {run.status}; cancel it before deleting it", field="run")
    run.delete()


def run_log_write(*, run: Run, text: str, line_number: int | None = None, stream: str = "system") -> None:
    """Append one line to the run's log."""
    from flows_app.services import storable

    RunLog.objects.create(
        run=run, time=timezone.now(), line_number=line_number, stream=stream, text=storable(text)
    )


# --- counters ------------------------------------------------------------------------------------------------


def _counts(run_id: Any) -> tuple[int, int]:
    lines = LineResult.objects.filter(run_id=run_id)
    return lines.count(), lines.filter(status=LineStatus.FAILED).count()


def _recount(run_id: Any, **extra: Any) -> None:
    done, failed = _counts(run_id)
    Run.objects.filter(pk=run_id).update(done_lines=done, failed_lines=failed, **extra)


def _chunk_tokens(run: Run, start: int, stop: int) -> dict[str, int]:
    """The token usage of the run's lines in [start, stop): a done chunk keeps it, and the run's total sums them."""
    return _sum_usage(
        LineResult.objects.filter(run=run, line_number__gte=start, line_number__lt=stop).values_list(
            "usage", flat=True
        )
    )


def _sum_usage(usages: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    total: dict[str, int] = {}
    for usage in usages:
        for key, value in (usage or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + int(value)
    return total


# --- execution: one asyncio loop per worker process, one warm runner per run -----------------------------


class _LoopThread:
    """A daemon thread running one asyncio loop for this process; runners live on it between chunks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self.loop.run_forever, name="runs-runner-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the loop; a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


_loop_thread: _LoopThread | None = None
_loop_lock = threading.Lock()


def _loop() -> _LoopThread:
    global _loop_thread
    with _loop_lock:
        # A forked pool process inherits the parent's object but not its thread.
        if _loop_thread is None or _loop_thread.pid != os.getpid() or not _loop_thread.thread.is_alive():
            _loop_thread = _LoopThread()
        return _loop_thread


@dataclass
class _Warm:
    key: str
    runner: Any
    started: float


# Only touched on the loop thread.
_warm: dict[str, _Warm] = {}
WARM_MAX_AGE_SECONDS = 600.0


async def _close_warm(key: str | None = None) -> None:
    for name in list(_warm):
        if key is None or name == key:
            warm = _warm.pop(name)
            with contextlib.suppress(Exception):
                await warm.runner.close()


@dataclass
class _RunnerSpec:
    key: str
    flow_dir: Path
    connections: dict[str, Any]
    variant: str | None
    init: dict[str, Any]
    environment_variables: dict[str, str]
    concurrency: int
    line_timeout: float


def _new_runner(concurrency: int) -> Any:
    """A runner process object (not yet spawned) with the studio's limits, `concurrency` lines at a time."""
    from flowengine.runner import Limits
    from flowengine.runner_client import RunnerProcess

    limits = Limits(
        memory_mb=int(_setting("STUDIO_RUNNER_MEMORY_MB", 1024)),
        cpu_seconds=int(_setting("STUDIO_RUNNER_CPU_SECONDS", 600)),
        open_files=1024,
        file_size_mb=1024,
    )
    return RunnerProcess(
        env_mode="scrubbed",
        limits=limits,
        line_timeout=float(_setting("STUDIO_RUNNER_TIMEOUT_SECONDS", DEFAULT_LINE_TIMEOUT)),
        concurrency=max(concurrency, 1),
        max_concurrency=min(concurrency, MAX_TOOL_THREADS),
    )


# A spare runner per worker process: by the time a new run's first chunk arrives it has imported the engine
# and the LLM SDK, about a CPU second that every pool process would otherwise spend at once, at the start of
# every run, while that run's lines wait. It holds no flow and no secret until `start` sends them. It is
# started when the process starts, when it finishes its part of a run (the other processes are finishing
# theirs, so there is CPU to spare) and after SPARE_IDLE_SECONDS without a chunk. Only touched on the loop
# thread.
SPARE_IDLE_SECONDS = 1.0
_spare: Any = None
_spare_timer: asyncio.TimerHandle | None = None
_background: set[asyncio.Task[None]] = set()
_busy_chunks = 0


def _spare_concurrency() -> int:
    return max(1, min(int(_setting("STUDIO_RUN_CONCURRENCY", DEFAULT_CONCURRENCY)), MAX_CONCURRENCY))


def _soon(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` in the background on this loop, its task held until it ends."""
    task = asyncio.get_running_loop().create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _close_soon(runner: Any) -> None:
    """Close a runner in the background: what comes next does not wait for its exit."""

    async def close() -> None:
        with contextlib.suppress(Exception):
            await runner.close()

    _soon(close())


def _spawn_spare_soon(*, when_idle: bool) -> None:
    _soon(_spawn_spare(when_idle=when_idle))


async def _spawn_spare(*, when_idle: bool = True) -> None:
    global _spare
    if when_idle and _busy_chunks:
        return
    if _spare is not None and _spare.proc is not None and _spare.proc.returncode is None:
        return
    runner = _new_runner(_spare_concurrency())
    try:
        await runner.spawn(prepare=True)
    except Exception:
        logger.warning("could not start a spare runner; the next run starts its own", exc_info=True)
        with contextlib.suppress(Exception):
            await runner.close()
        return
    _spare = runner


def _take_spare(concurrency: int) -> Any:
    """The idle spare runner, set up for a run of `concurrency` lines in flight (sent with its flow), or None."""
    global _spare
    spare, _spare = _spare, None
    if spare is None:
        return None
    if spare.proc is None or spare.proc.returncode is not None:
        _close_soon(spare)
        return None
    spare.concurrency = max(concurrency, 1)
    spare.max_concurrency = min(spare.concurrency, MAX_TOOL_THREADS)
    return spare


def _chunk_busy(delta: int) -> None:
    """Count chunks executing in this process; once none has run for SPARE_IDLE_SECONDS, spawn a spare."""
    global _busy_chunks, _spare_timer
    _busy_chunks = max(0, _busy_chunks + delta)
    if _spare_timer is not None:
        _spare_timer.cancel()
        _spare_timer = None
    if not _busy_chunks:
        _spare_timer = asyncio.get_running_loop().call_later(
            SPARE_IDLE_SECONDS, lambda: _spawn_spare_soon(when_idle=True)
        )


def run_runner_prepare() -> None:
    """Have a spare runner ready in this (idle, just started) worker process for the next run's first chunk."""
    thread = _loop()
    thread.loop.call_soon_threadsafe(_chunk_busy, 0)


async def _runner_for(spec: _RunnerSpec) -> Any:
    """The warm runner of this run in this process, or a new one (closing runners of other runs)."""
    warm = _warm.get(spec.key)
    if (
        warm is not None
        and time.monotonic() - warm.started < WARM_MAX_AGE_SECONDS
        and not warm.runner._expired
    ):
        return warm.runner
    # Other runs' runners exit in the background (they may take a while to close their connections).
    for name in list(_warm):
        _close_soon(_warm.pop(name).runner)
    runner = _take_spare(spec.concurrency) or _new_runner(spec.concurrency)
    runner.line_timeout = spec.line_timeout
    try:
        await runner.start(
            spec.flow_dir,
            spec.connections,
            spec.variant,
            spec.init,
            environment_variables=spec.environment_variables,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.close()
        raise
    _warm[spec.key] = _Warm(key=spec.key, runner=runner, started=time.monotonic())
    return runner


def _error_dict(error: Any) -> dict[str, Any] | None:
    if error is None:
        return None
    return error.to_dict() if hasattr(error, "to_dict") else dict(error)


async def _run_lines(
    spec: _RunnerSpec,
    lines: Sequence[tuple[int, dict[str, Any]]],
    out: queue.Queue[tuple[str, Any]],
    deaths: Mapping[int, int],
    feed: asyncio.Queue[list[tuple[int, dict[str, Any]]] | None] | None = None,
) -> None:
    """Run `lines` in the run's runner, `concurrency` at a time (and as many sent ahead); results and logs go
    to `out`.

    With `feed`, once every line has been sent, ("hungry", None) goes to `out` and the next lines (another chunk's)
    are taken from `feed` as they come, until None: they fill the runner's slots while the last lines before them
    finish, so the runner never idles between chunks.

    A line whose runner died under it is retried alone afterwards, so the line that kills the runner is
    found; MAX_LINE_DEATHS deaths fail it with the runner's reason.
    """
    from flowengine import events
    from flowengine.runner_client import QUEUE_AHEAD

    runner = await _runner_for(spec)

    def on_log(_rid: str | None, ev: Any) -> None:
        out.put(
            ("log", {"line_number": ev.line_number, "stream": ev.stream, "text": ev.text, "node": ev.node})
        )

    runner.on_log = on_log
    death_count = dict(deaths)
    semaphore = asyncio.Semaphore(max(1, spec.concurrency) * QUEUE_AHEAD)
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[tuple[int, dict[str, Any]] | None]] = set()
    retry: list[tuple[int, dict[str, Any]]] = []
    errors: list[BaseException] = []

    async def one(number: int, inputs: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        completed = None
        spans: list[dict[str, Any]] = []
        async for ev in runner.run_line(
            inputs, line_number=number, event_types=LINE_EVENTS, raw_types=("trace_span",), hold=True
        ):
            if isinstance(ev, events.LineCompleted):
                completed = ev
            elif isinstance(ev, dict):
                spans.append(ev)  # a trace span, stored as the runner sent it
            elif isinstance(ev, events.LogLine):
                on_log(None, ev)
        assert completed is not None
        error = completed.error
        if completed.status != "Completed" and error is not None and error.type in DEATH_TYPES:
            death_count[number] = death_count.get(number, 0) + 1
            out.put(
                ("death", {"line_number": number, "deaths": death_count[number], "message": error.message})
            )
            if death_count[number] < MAX_LINE_DEATHS:
                return number, inputs
            error = events.ErrorInfo(
                code="SystemError",
                type=error.type,
                message=f"line {number} stopped its runner {death_count[number]} times: {error.message}",
                node=error.node,
                traceback=None,
            )
        out.put(
            (
                "line",
                {
                    "line_number": number,
                    "status": completed.status,
                    "inputs": inputs,
                    "outputs": dict(completed.outputs or {}) if completed.status == "Completed" else {},
                    "error": _error_dict(error) if completed.status != "Completed" else None,
                    "duration_ms": float(completed.duration_ms or 0.0),
                    "usage": dict(completed.usage or {}),
                    "aggregation_inputs": dict(completed.aggregation_inputs or {}),
                    "trace": spans,
                },
            )
        )
        return None

    async def bounded(number: int, inputs: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        try:
            return await one(number, inputs)
        finally:
            semaphore.release()

    def finished(task: asyncio.Task[tuple[int, dict[str, Any]] | None]) -> None:
        # Finished tasks are dropped at once: an execution that goes on from chunk to chunk keeps none.
        running.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]
        elif task.result() is not None:
            retry.append(task.result())  # type: ignore[arg-type]

    async def start(batch: Sequence[tuple[int, dict[str, Any]]]) -> None:
        for number, inputs in batch:
            await semaphore.acquire()
            task = loop.create_task(bounded(number, inputs))
            running.add(task)
            task.add_done_callback(finished)

    try:
        await start(lines)
        while feed is not None:
            out.put(("hungry", None))
            batch = await feed.get()
            if batch is None:
                break
            await start(batch)
        while running:
            await asyncio.wait(set(running))
        if errors:
            raise errors[0]
        # Alone, a line can only die of its own doing: innocent bystanders of a death complete here.
        while retry:
            again = []
            for number, inputs in retry:
                result = await one(number, inputs)
                if result is not None:
                    again.append(result)
            retry = again
    except asyncio.CancelledError:
        # Canceled run or a lost claim: stop the runner now so no line keeps running.
        for task in list(running):
            task.cancel()
        await _close_warm(spec.key)
        raise


async def _aggregate_in_runner(
    spec: _RunnerSpec, results: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    from flowengine.batch import read_aggregation

    runner = await _runner_for(spec)
    outcome = read_aggregation(await runner.aggregate(results))
    return outcome.metrics, outcome.error, [ev.text for ev in outcome.logs]


def _connection_names(flow: EngineFlow, init: Mapping[str, Any]) -> set[str]:
    """Names a flow may use as connections: node connections, prompty's, and literal strings in inputs."""
    names: set[str] = set()
    nodes = list(flow.nodes)
    for variants in flow.node_variants.values():
        nodes.extend(v.node for v in variants.variants.values())
    for node in nodes:
        if node.connection:
            names.add(node.connection)
        for value in node.inputs.values():
            if isinstance(value, str) and not value.startswith("${"):
                names.add(value)
    prompty = getattr(flow, "prompty", None)
    configuration = getattr(prompty, "configuration", None) or {}
    if isinstance(configuration, Mapping) and isinstance(configuration.get("connection"), str):
        names.add(configuration["connection"])
    for value in init.values():
        if isinstance(value, str):
            names.add(value)
    if flow.kind != "dag":
        # Flex code and prompty files name connections in places the model does not list.
        names.add("*")
    return names


def _runner_connections(run: Run, flow: EngineFlow) -> dict[str, Any]:
    """The run owner's connections the flow refers to, decrypted for the runner only."""
    from flows_app.selectors import connection_list_for, connection_map_for_runner
    from flows_app.services import connection_secrets_for_runner

    names = _connection_names(flow, run.init)
    if "*" in names:
        names = set(connection_list_for(run.owner).values_list("name", flat=True))
    found = connection_map_for_runner(run.owner, names=names)
    return {name: connection_secrets_for_runner(conn) for name, conn in found.items()}


def _chunk_lines(run: Run, chunk: RunChunk, flow: EngineFlow) -> list[tuple[int, dict[str, Any]]]:
    """The (line number, inputs) of the chunk's range, after column mapping, exactly as run_create saw them."""
    rows = dataset_rows(run.dataset) if run.dataset_id else None
    base = _base_lines(run.base_run) if run.base_run_id else None
    mapping = dict(run.column_mapping or {}) or None
    data_name = run.dataset.filename if run.dataset_id else "data"
    if rows is not None:
        window = rows[chunk.start : chunk.stop]
        shifted = None
        if base is not None:
            from flowengine.batch import BaseRunLines

            shifted = BaseRunLines(
                name=base.name,
                outputs={
                    n - chunk.start: v for n, v in base.outputs.items() if chunk.start <= n < chunk.stop
                },
                inputs={n - chunk.start: v for n, v in base.inputs.items() if chunk.start <= n < chunk.stop},
            )
        try:
            lines = _resolve(flow=flow, rows=window, mapping=mapping, base=shifted, data_name=data_name)
            return [(n + chunk.start, inputs) for n, inputs in lines]
        except RunError:
            pass  # a column that only other chunks' rows have: resolve over all rows (as run_create did)
    lines = _resolve(flow=flow, rows=rows, mapping=mapping, base=base, data_name=data_name)
    return [(n, inputs) for n, inputs in lines if chunk.start <= n < chunk.stop]


def _claim(chunk_id: int, task_id: str) -> tuple[RunChunk, str] | None:
    """Take the chunk: queued, or running under this same message (delivered again), or abandoned."""
    stale = timezone.now() - dt.timedelta(seconds=stale_seconds())
    takeable = Q(status=ChunkStatus.QUEUED) | Q(status=ChunkStatus.RUNNING, heartbeat_at__lt=stale)
    if task_id:
        takeable |= Q(status=ChunkStatus.RUNNING, task_id=task_id)
    return _take(RunChunk.objects.filter(pk=chunk_id).filter(takeable), chunk_id, task_id)


def _claim_next(run_id: Any) -> tuple[RunChunk, str] | None:
    """Take the run's first queued chunk for an execution that has room for it, or None when none is left.

    Its own message then finds it running and leaves it; should this process die, the reaper sends it again.
    """
    queued = RunChunk.objects.filter(run_id=run_id, status=ChunkStatus.QUEUED).order_by("index")
    for chunk_id in queued.values_list("pk", flat=True)[:4]:
        taken = _take(RunChunk.objects.filter(pk=chunk_id, status=ChunkStatus.QUEUED), chunk_id, "")
        if taken is not None:
            return taken
    return None


def _take(chunks: Any, chunk_id: int, task_id: str) -> tuple[RunChunk, str] | None:
    now = timezone.now()
    token = uuid.uuid4().hex
    active_runs = Run.objects.filter(status__in=[RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING])
    claimed = chunks.filter(run_id__in=active_runs.values("pk")).update(
        status=ChunkStatus.RUNNING,
        task_id=task_id or "",
        claim_token=token,
        worker=_worker_name(),
        claimed_at=now,
        heartbeat_at=now,
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return None
    return RunChunk.objects.select_related("run", "run__dataset", "run__base_run", "run__owner").get(
        pk=chunk_id
    ), token


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_LINE_VALUE_FIELDS = ("inputs", "outputs", "error", "usage", "aggregation_inputs", "trace")
_UNSTORABLE_NOTE = (
    "its values hold characters the database cannot store (NUL or a lone surrogate), stored as U+FFFD"
)


def _bulk_create_storable(
    model: type[Any], rows: list[Any], fields: Sequence[str], **options: Any
) -> list[Any]:
    """Insert `rows`; when the database refuses them, they are inserted with storable `fields` instead, and
    the rows that changed are returned.

    PostgreSQL's text and jsonb refuse NUL, and a lone surrogate cannot be encoded as UTF-8 for either
    database (line values are stored as raw text, see RawTextEncoder). A dataset or a flow's outputs may hold
    both, and a batch refused once would be refused again on every delivery.
    """
    try:
        with transaction.atomic():
            model.objects.bulk_create(rows, **options)
    except (UnstorableData, UnicodeEncodeError):
        pass
    else:
        return []
    from flows_app.services import storable

    changed = []
    for row in rows:
        row.pk = None  # a batch before the refused one had its keys assigned, then rolled back
        before = [getattr(row, field) for field in fields]
        after = [storable(value) for value in before]
        if after != before:
            for field, value in zip(fields, after, strict=True):
                setattr(row, field, value)
            changed.append(row)
    model.objects.bulk_create(rows, **options)
    return changed


class _ChunkWriter:
    """Buffers a chunk's results and logs and writes them in small batches from the task's thread."""

    def __init__(self, run: Run, chunk: RunChunk, token: str) -> None:
        self.run = run
        self.chunk = chunk
        self.token = token
        self.lines: list[LineResult] = []
        self.logs: list[RunLog] = []
        self.last_flush = time.monotonic()
        self.last_beat = 0.0
        self.written = 0
        self.failed_here = 0

    def take(self, kind: str, item: dict[str, Any]) -> None:
        now = timezone.now()
        if kind == "line":
            self.lines.append(LineResult(run_id=self.run.pk, **item))
            if item["status"] != LineStatus.COMPLETED:
                self.failed_here += 1
                message = (item.get("error") or {}).get("message") or "failed"
                self.logs.append(
                    RunLog(
                        run_id=self.run.pk,
                        time=now,
                        line_number=item["line_number"],
                        stream="system",
                        text=f"line {item['line_number']} failed: {message}",
                    )
                )
        elif kind == "log":
            node = f"[{item['node']}] " if item.get("node") else ""
            self.logs.append(
                RunLog(
                    run_id=self.run.pk,
                    time=now,
                    line_number=item.get("line_number"),
                    stream=item.get("stream") or "stdout",
                    text=f"{node}{item.get('text', '')}",
                )
            )
        elif kind == "death":
            self.logs.append(
                RunLog(
                    run_id=self.run.pk,
                    time=now,
                    line_number=item["line_number"],
                    stream="system",
                    text=f"the runner stopped while line {item['line_number']} ran (death {item['deaths']} of {MAX_LINE_DEATHS}): {item['message'].splitlines()[0] if item['message'] else ''}",
                )
            )

    def due(self) -> bool:
        return len(self.lines) >= FLUSH_LINES or time.monotonic() - self.last_flush >= FLUSH_SECONDS

    def flush(self) -> None:
        if self.lines:
            changed = _bulk_create_storable(
                LineResult, self.lines, _LINE_VALUE_FIELDS, ignore_conflicts=True, batch_size=WRITE_BATCH
            )
            now = timezone.now()
            self.logs.extend(
                RunLog(
                    run_id=self.run.pk,
                    time=now,
                    line_number=line.line_number,
                    stream="system",
                    text=f"line {line.line_number}: {_UNSTORABLE_NOTE}",
                )
                for line in changed
            )
            self.written += len(self.lines)
            self.lines = []
        if self.logs:
            _bulk_create_storable(RunLog, self.logs, ("text",), batch_size=500)
            self.logs = []
        self.last_flush = time.monotonic()

    def beat(self, *, force: bool = False) -> bool:
        """Heartbeat chunk and run, refresh the counters; False when this execution must stop."""
        now_m = time.monotonic()
        if not force and now_m - self.last_beat < min(heartbeat_seconds(), FLUSH_SECONDS * 2):
            return True
        self.last_beat = now_m
        now = timezone.now()
        kept = RunChunk.objects.filter(
            pk=self.chunk.pk, claim_token=self.token, status=ChunkStatus.RUNNING
        ).update(heartbeat_at=now)
        _recount(self.run.pk, heartbeat_at=now)
        self.run.refresh_from_db(
            fields=["status", "done_lines", "failed_lines", "tokens", "started_at", "finished_at", "error"]
        )
        streaming.publish_progress(self.run)
        return bool(kept) and self.run.status == RunStatus.RUNNING


def run_execute_chunk(*, chunk_id: int, task_id: str = "") -> None:
    """Execute one chunk: claim it, compute its missing lines in one runner, write each result once.

    Idempotent: a chunk that is done, canceled or held by a live execution is left alone; a chunk delivered
    again after its worker died recomputes only the lines without a result.
    """
    claim = _claim(chunk_id, task_id)
    if claim is None:
        return
    chunk, token = claim
    run = chunk.run
    loop = _loop().loop
    loop.call_soon_threadsafe(_chunk_busy, 1)
    try:
        _execute_claimed(run, chunk, token)
    finally:
        loop.call_soon_threadsafe(_chunk_busy, -1)
        # A long-lived worker must not keep a broken connection for the next task.
        db_connection.close_if_unusable_or_obsolete()


@dataclass
class _Held:
    """A chunk this execution holds: its claim, its writer and how many of its lines have reported."""

    chunk: RunChunk
    token: str
    writer: _ChunkWriter
    to_run: int
    reported: int = 0
    closed: bool = False

    def holds(self, line_number: int | None) -> bool:
        return line_number is not None and self.chunk.start <= line_number < self.chunk.stop


def _execute_claimed(run: Run, chunk: RunChunk, token: str) -> None:

    now = timezone.now()
    if Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.PREPARING, started_at=now, heartbeat_at=now
    ):
        run.status = RunStatus.PREPARING
        streaming.publish_progress(run, force=True)
    if chunk.attempts > MAX_CHUNK_ATTEMPTS:
        _fail_lost_chunk(run, chunk, token, _existing_lines(run, chunk))
        return
    try:
        engine_flow = _check_flow(_load_engine_flow(run.snapshot_id), None)
        lines = _lines_to_run(run, chunk, engine_flow)
        flow_dir = _flow_dir(run.snapshot_id)
        spec = _RunnerSpec(
            key=f"{run.pk}:{run.snapshot_id}",
            flow_dir=flow_dir,
            connections=_runner_connections(run, engine_flow) if lines else {},
            variant=run.variant or None,
            init=dict(run.init or {}),
            environment_variables=dict(run.environment_variables or {}),
            concurrency=run.concurrency,
            line_timeout=float(run.line_timeout),
        )
    except RunError as exc:
        _fail_run(run, {"code": "UserError", "type": "RunError", "message": str(exc)})
        return
    first = _Held(chunk=chunk, token=token, writer=_ChunkWriter(run, chunk, token), to_run=len(lines))
    if not lines:
        Run.objects.filter(pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.PREPARING]).update(
            status=RunStatus.RUNNING
        )
        _close_chunk(run, first, None)
        return
    execution = _Execution(run, spec, engine_flow, first, lines)
    Run.objects.filter(pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.PREPARING]).update(
        status=RunStatus.RUNNING
    )
    first.writer.beat(force=True)
    try:
        execution.follow()
    except BaseException:
        execution.future.cancel()
        raise


class _Execution:
    """The chunks one execution holds, its runner's lines on the loop thread, and what they report."""

    def __init__(
        self,
        run: Run,
        spec: _RunnerSpec,
        engine_flow: EngineFlow,
        first: _Held,
        lines: Sequence[tuple[int, dict[str, Any]]],
    ) -> None:
        self.run, self.spec, self.engine_flow = run, spec, engine_flow
        self.held = [first]
        self.out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.feed: asyncio.Queue[list[tuple[int, dict[str, Any]]] | None] = asyncio.Queue()
        self.future = _loop().submit(_run_lines(spec, lines, self.out, {}, self.feed))
        # Wakes `follow` the moment the lines are over, rather than at its next look.
        self.future.add_done_callback(lambda _future: self.out.put(("over", None)))

    def take(self, kind: str, item: Any) -> None:
        """One report of the execution: a line, a log, a death, hunger for more lines, or the end of its lines."""
        if kind == "over":
            return
        if kind == "hungry":
            more = _take_on(self.run, self.engine_flow, self.held)
            if more is None:
                # Nothing left to hand out: this process is done with the run, so it starts the next run's
                # spare runner now, while its last lines finish, rather than when that run's first chunk
                # would wait for it (evaluations and scripts start one right after the other).
                _loop().loop.call_soon_threadsafe(functools.partial(_spawn_spare_soon, when_idle=False))
            _loop().loop.call_soon_threadsafe(self.feed.put_nowait, more)
            return
        number = item.get("line_number")
        holder = next((h for h in reversed(self.held) if h.holds(number)), self.held[-1])
        holder.writer.take(kind, item)
        if kind == "line":
            holder.reported += 1

    def follow(self) -> None:
        """Write what the execution reports, chunk by chunk, until its lines are all done or it must stop."""
        from flowengine.runner_client import RunnerError

        run, out, future = self.run, self.out, self.future
        stopped = False
        while True:
            try:
                self.take(*out.get(timeout=0.1))
                while True:
                    try:
                        self.take(*out.get_nowait())
                    except queue.Empty:
                        break
            except queue.Empty:
                pass
            finished = future.done() and out.empty()
            for holder in [h for h in self.held if not h.closed]:
                complete = holder.reported >= holder.to_run
                if holder.writer.due() or finished or complete:
                    holder.writer.flush()
                    # A chunk that is through gets its heartbeat and counts when it is closed, below.
                    if not (finished or complete) and not holder.writer.beat():
                        stopped = True
                if complete and not stopped:
                    _close_chunk(run, holder, self.spec)
            if stopped:
                future.cancel()
                for holder in [h for h in self.held if not h.closed]:
                    _stop_execution(run, holder.chunk, holder.token, future)
                return
            if finished:
                break
        try:
            future.result()
        except RunnerError as exc:
            for holder in self.held:
                holder.writer.flush()
            error = (
                exc.error.to_dict()
                if exc.error is not None
                else {"code": "UserError", "type": "RunnerError", "message": str(exc)}
            )
            _fail_run(run, error)
            return
        for holder in [h for h in self.held if not h.closed]:
            _close_chunk(run, holder, self.spec)


def _existing_lines(run: Run, chunk: RunChunk) -> set[int]:
    return set(
        LineResult.objects.filter(
            run=run, line_number__gte=chunk.start, line_number__lt=chunk.stop
        ).values_list("line_number", flat=True)
    )


def _lines_to_run(run: Run, chunk: RunChunk, engine_flow: EngineFlow) -> list[tuple[int, dict[str, Any]]]:
    """The chunk's lines without a result yet, logged with the attempt."""
    existing = _existing_lines(run, chunk)
    lines = [(n, inputs) for n, inputs in _chunk_lines(run, chunk, engine_flow) if n not in existing]
    run_log_write(
        run=run,
        text=f"chunk {chunk.index} [{chunk.start}, {chunk.stop}) on {_worker_name()}, attempt {chunk.attempts}: {len(lines)} lines to run, {len(existing)} already done",
    )
    return lines


def _take_on(run: Run, engine_flow: EngineFlow, held: list[_Held]) -> list[tuple[int, dict[str, Any]]] | None:
    """Claim the run's next queued chunk for the running execution: its lines to run, or None when none is left."""
    while True:
        claim = _claim_next(run.pk)
        if claim is None:
            return None
        chunk, token = claim
        if chunk.attempts > MAX_CHUNK_ATTEMPTS:
            _fail_lost_chunk(run, chunk, token, _existing_lines(run, chunk))
            continue
        try:
            lines = _lines_to_run(run, chunk, engine_flow)
        except RunError as exc:
            _fail_run(run, {"code": "UserError", "type": "RunError", "message": str(exc)})
            return None
        holder = _Held(chunk=chunk, token=token, writer=_ChunkWriter(run, chunk, token), to_run=len(lines))
        held.append(holder)
        if lines:
            return lines
        _close_chunk(run, holder, None)


def _close_chunk(run: Run, holder: _Held, spec: _RunnerSpec | None) -> None:
    """A held chunk whose lines have all reported: mark it done and, after the run's last one, aggregate."""
    holder.closed = True
    chunk = holder.chunk
    tokens = _chunk_tokens(run, chunk.start, chunk.stop)
    finished_at = timezone.now()
    done = RunChunk.objects.filter(pk=chunk.pk, claim_token=holder.token, status=ChunkStatus.RUNNING).update(
        status=ChunkStatus.DONE, finished_at=finished_at, heartbeat_at=finished_at, tokens=tokens
    )
    _recount(run.pk, heartbeat_at=finished_at)
    # A cancel that came while the last lines finished: this chunk was the last one running.
    if _finish_cancel(run.pk) or not done:
        return
    # Without lines to run, this chunk never decrypted connections: the aggregation fetches its own.
    _maybe_aggregate(run.pk, spec if holder.to_run else None)


def _flow_dir(snapshot_sha: str) -> Path:
    from flows_app.services import snapshot_materialize

    return snapshot_materialize(snapshot_sha=snapshot_sha)


def _stop_execution(run: Run, chunk: RunChunk, token: str, future: concurrent.futures.Future[Any]) -> None:
    """Wait briefly for the canceled lines to let go, then mark the chunk canceled if it is still ours."""
    with contextlib.suppress(Exception):
        future.exception(timeout=10)
    run.refresh_from_db(fields=["status"])
    if run.status in (RunStatus.CANCELING, RunStatus.CANCELED, RunStatus.FAILED):
        RunChunk.objects.filter(pk=chunk.pk, claim_token=token).update(
            status=ChunkStatus.CANCELED, finished_at=timezone.now()
        )
        _finish_cancel(run.pk)


def _fail_lost_chunk(run: Run, chunk: RunChunk, token: str, existing: set[int]) -> None:
    """A chunk whose workers kept dying: its missing lines fail, naming why, and the run goes on."""
    engine_flow = _load_engine_flow(run.snapshot_id)
    message = (
        f"the worker running lines [{chunk.start}, {chunk.stop}) was lost {chunk.attempts - 1} times; "
        "these lines were not run again"
    )
    rows = []
    for number, inputs in _chunk_lines(run, chunk, engine_flow):
        if number in existing:
            continue
        rows.append(
            LineResult(
                run=run,
                line_number=number,
                status=LineStatus.FAILED,
                inputs=inputs,
                outputs={},
                error={"code": "SystemError", "type": "WorkerLost", "message": message},
            )
        )
    _bulk_create_storable(LineResult, rows, _LINE_VALUE_FIELDS, ignore_conflicts=True, batch_size=WRITE_BATCH)
    run_log_write(run=run, text=message)
    now = timezone.now()
    if RunChunk.objects.filter(pk=chunk.pk, claim_token=token).update(
        status=ChunkStatus.DONE, finished_at=now, tokens=_chunk_tokens(run, chunk.start, chunk.stop)
    ):
        _recount(run.pk)
        _maybe_aggregate(run.pk, None)


def _fail_run(run: Run, error: dict[str, Any]) -> None:
    """The run cannot execute at all (its flow does not load): Failed, and no other chunk starts."""
    from flows_app.services import storable

    now = timezone.now()
    RunChunk.objects.filter(run=run, status__in=[ChunkStatus.QUEUED, ChunkStatus.RUNNING]).update(
        status=ChunkStatus.CANCELED, finished_at=now
    )
    changed = Run.objects.filter(pk=run.pk, status__in=ACTIVE_STATUSES).update(
        status=RunStatus.FAILED, error=storable(error), finished_at=now
    )
    if changed:
        _recount(run.pk)
        run_log_write(run=run, text=f"run failed: {error.get('message')}")
        run.refresh_from_db()
        streaming.publish_progress(run, force=True)


def _maybe_aggregate(run_id: Any, spec: _RunnerSpec | None) -> None:
    """The chunk that sees every chunk done claims the aggregation (one conditional update) and runs it."""
    if RunChunk.objects.filter(run_id=run_id).exclude(status=ChunkStatus.DONE).exists():
        return
    claimed = Run.objects.filter(
        pk=run_id,
        status__in=[RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING],
        aggregation_claimed_at__isnull=True,
    ).update(aggregation_claimed_at=timezone.now())
    if claimed:
        run_aggregate(run_id=run_id, spec=spec)


def run_aggregate(*, run_id: Any, spec: Any = None) -> None:
    """Run the flow's aggregation over the completed lines, store metrics and totals, complete the run.

    Idempotent: a run that is no longer running is left alone; a repeated call recomputes the same metrics.
    """
    from flows_app.services import storable

    run = Run.objects.select_related("owner").filter(pk=run_id).first()
    if run is None or run.status not in (RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING):
        return
    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(heartbeat_at=now)
    metrics: dict[str, Any] = {}
    error = None
    engine_flow = _load_engine_flow(run.snapshot_id)
    completed = LineResult.objects.filter(run=run, status=LineStatus.COMPLETED).order_by("line_number")
    if engine_flow.has_aggregation and completed.exists():
        results = [
            {
                "type": "line_completed",
                "line_number": number,
                "outputs": outputs,
                "status": "Completed",
                "error": None,
                "aggregation_inputs": aggregation_inputs,
                "duration_ms": 0.0,
                "usage": {},
                "inputs": inputs,
            }
            for number, outputs, aggregation_inputs, inputs in completed.values_list(
                "line_number", "outputs", "aggregation_inputs", "inputs"
            ).iterator(chunk_size=2000)
        ]
        if spec is None:
            spec = _RunnerSpec(
                key=f"{run.pk}:{run.snapshot_id}",
                flow_dir=_flow_dir(run.snapshot_id),
                connections=_runner_connections(run, engine_flow),
                variant=run.variant or None,
                init=dict(run.init or {}),
                environment_variables=dict(run.environment_variables or {}),
                concurrency=run.concurrency,
                line_timeout=float(run.line_timeout),
            )
        future = _loop().submit(_aggregate_in_runner(spec, results))
        while True:
            try:
                metrics, error, logs = future.result(timeout=heartbeat_seconds())
                break
            except concurrent.futures.TimeoutError:
                Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
            except Exception as exc:
                error = {"code": "SystemError", "type": type(exc).__name__, "message": str(exc)}
                logs = []
                break
        for text in logs:
            run_log_write(run=run, text=text, stream="stdout")
        if error:
            run_log_write(run=run, text=f"aggregation failed: {error.get('message')}")
    _loop().submit(_close_warm(f"{run.pk}:{run.snapshot_id}"))
    done, failed = _counts(run.pk)
    tokens = _sum_usage(RunChunk.objects.filter(run=run).values_list("tokens", flat=True))
    finished = timezone.now()
    # A run with failed lines is still Completed, as in prompt flow.
    changed = Run.objects.filter(
        pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING]
    ).update(
        status=RunStatus.COMPLETED,
        metrics=storable(metrics),
        error=storable(error),
        tokens=tokens,
        done_lines=done,
        failed_lines=failed,
        finished_at=finished,
        heartbeat_at=finished,
        started_at=run.started_at or finished,
    )
    if changed:
        run.refresh_from_db()
        run_log_write(run=run, text=f"run completed: {done - failed} lines completed, {failed} failed")
        streaming.publish_progress(run, force=True)
        if run.pending_evaluations:
            _start_pending_evaluations(run)


# --- crash recovery -------------------------------------------------------------------------------------------


def run_reap_stale(*, stale_after: float | None = None, requeue_after: float | None = None) -> int:
    """Requeue chunks of dead workers and lost messages; finish cancels and aggregations nobody finished.

    Safe to run from every worker at once: each change is a conditional update. Returns how many chunks or
    runs it acted on.
    """
    from runs_app.tasks import run_chunk_task

    now = timezone.now()
    stale = now - dt.timedelta(seconds=stale_seconds() if stale_after is None else stale_after)
    lost = now - dt.timedelta(seconds=requeue_seconds() if requeue_after is None else requeue_after)
    acted = 0
    active = [RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING]
    dead = RunChunk.objects.filter(status=ChunkStatus.RUNNING).filter(
        Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True, claimed_at__lt=stale)
    )
    for chunk in dead.select_related("run"):
        if chunk.run.status in (
            RunStatus.CANCELING,
            RunStatus.CANCELED,
            RunStatus.FAILED,
            RunStatus.COMPLETED,
        ):
            if RunChunk.objects.filter(
                pk=chunk.pk, status=ChunkStatus.RUNNING, heartbeat_at=chunk.heartbeat_at
            ).update(status=ChunkStatus.CANCELED, finished_at=now):
                acted += 1
                _finish_cancel(chunk.run_id)
            continue
        task_id = uuid.uuid4().hex
        if RunChunk.objects.filter(
            pk=chunk.pk, status=ChunkStatus.RUNNING, heartbeat_at=chunk.heartbeat_at
        ).update(status=ChunkStatus.QUEUED, task_id=task_id, claim_token="", enqueued_at=now):
            acted += 1
            run_log_write(
                run=chunk.run,
                text=f"chunk {chunk.index}: worker {chunk.worker} stopped heartbeating; requeued",
            )
            transaction.on_commit(lambda c=chunk.pk, t=task_id: run_chunk_task.apply_async((c,), task_id=t))
    acted += run_resend_queued(enqueued_before=lost, reason="no worker took them; their messages may be lost")
    for run_id in Run.objects.filter(status=RunStatus.CANCELING).values_list("pk", flat=True):
        acted += int(_finish_cancel(run_id))
    # Every chunk done but no live aggregation: the worker that claimed it died, or nobody claimed it.
    unfinished = Run.objects.filter(status__in=active).exclude(
        chunks__status__in=[ChunkStatus.QUEUED, ChunkStatus.RUNNING, ChunkStatus.CANCELED]
    )
    unfinished = unfinished.filter(
        Q(aggregation_claimed_at__isnull=True)
        | Q(heartbeat_at__lt=stale)
        | Q(heartbeat_at__isnull=True, aggregation_claimed_at__lt=stale)
    )
    for run in unfinished.distinct():
        if Run.objects.filter(pk=run.pk, aggregation_claimed_at=run.aggregation_claimed_at).update(
            aggregation_claimed_at=now, heartbeat_at=now
        ):
            acted += 1
            transaction.on_commit(lambda r=run.pk: _enqueue_aggregate(r))
    return acted


def run_resend_queued(*, enqueued_before: dt.datetime, reason: str) -> int:
    """Send a new message for every queued chunk of an active run enqueued before `enqueued_before`.

    For a broker that lost its messages (a restart without persistence): those chunks stay Queued in the
    database and nothing else would bring them back before STUDIO_RUN_REQUEUE_SECONDS. A chunk whose old
    message survived is still executed once (claims are conditional). Returns how many chunks were sent.
    """
    from runs_app.tasks import run_chunk_task

    now = timezone.now()
    active = [RunStatus.QUEUED, RunStatus.PREPARING, RunStatus.RUNNING]
    waiting = RunChunk.objects.filter(status=ChunkStatus.QUEUED, run__status__in=active).filter(
        Q(enqueued_at__lt=enqueued_before) | Q(enqueued_at__isnull=True)
    )
    sent: dict[Any, list[int]] = {}
    for chunk in waiting.only("pk", "run_id", "index", "enqueued_at").order_by("run_id", "index"):
        task_id = uuid.uuid4().hex
        # Another worker that reconnected at the same time may have sent it already: only one wins.
        if RunChunk.objects.filter(
            pk=chunk.pk, status=ChunkStatus.QUEUED, enqueued_at=chunk.enqueued_at
        ).update(enqueued_at=now, task_id=task_id):
            run_chunk_task.apply_async((chunk.pk,), task_id=task_id)
            sent.setdefault(chunk.run_id, []).append(chunk.index)
    for run_id, indexes in sent.items():
        RunLog.objects.create(
            run_id=run_id,
            time=now,
            stream="system",
            text=f"chunks {', '.join(map(str, indexes))} sent again: {reason}",
        )
    return sum(len(indexes) for indexes in sent.values())


_reaper_started = False


def run_reaper_start(*, interval: float | None = None) -> threading.Thread | None:
    """Start the reaper loop in a daemon thread of this process (each worker runs one); once per process."""
    global _reaper_started
    if _reaper_started:
        return None
    _reaper_started = True
    every = reaper_interval_seconds() if interval is None else interval

    def loop() -> None:
        while True:
            try:
                run_reap_stale()
            except Exception:
                logger.exception("the run reaper failed; trying again in %s s", every)
            finally:
                db_connection.close()
            time.sleep(every)

    thread = threading.Thread(target=loop, name="runs-reaper", daemon=True)
    thread.start()
    return thread


# --- online endpoints and deployments ----------------------------------------------------------------------
#
# An endpoint is a stable URL (/endpoints/<name>/score, served by runs_app/endpoints_asgi.py) with two keys;
# its deployments each serve one immutable snapshot and split the traffic. Keys are stored as sha256 only and
# shown once. The serving process caches a successful key check for ENDPOINT_AUTH_CACHE_SECONDS; every change
# made here drops the endpoint's cached entries when its transaction commits, so in the same web process a
# regenerated key or a disabled endpoint takes effect on the very next request (other web processes, if any,
# within the cache time).

ENDPOINT_KEY_PREFIX = "fse_"
ENDPOINT_TEST_TOKEN_PREFIX = "fset_"
ENDPOINT_TEST_TOKEN_SALT = "runs_app.endpoint-test-token"
ENDPOINT_TEST_TOKEN_SECONDS = 900
ENDPOINT_AUTH_CACHE_SECONDS = 2.0
ENDPOINT_AUTH_CACHE_SIZE = 1024
ENDPOINT_MAX_INSTANCES = 8
ENDPOINT_KEY_SLOTS = ("primary", "secondary")


class EndpointError(ValueError):
    """A deployment or endpoint change that cannot be made; `field` names the form field at fault."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class EndpointKeys:
    """An endpoint's two plaintext keys: returned once, at creation, and never stored."""

    primary: str
    secondary: str


@dataclass(frozen=True)
class ServedDeployment:
    """One deployment as the serving process routes to it."""

    id: int
    name: str
    traffic: int
    snapshot: str


@dataclass(frozen=True)
class EndpointAuth:
    """The endpoint a scoring request authenticated for, as the serving process caches it."""

    endpoint_id: int
    name: str
    disabled: bool
    deployments: tuple[ServedDeployment, ...]


@dataclass(frozen=True)
class DeploymentServing:
    """Everything a runner pool needs to serve one deployment (connections decrypted: runners only)."""

    deployment_id: int
    endpoint: str
    name: str
    snapshot: str
    flow_name: str
    flow_dir: Path
    connections: dict[str, Any]
    variant: str | None
    init: dict[str, Any]
    environment_variables: dict[str, str]
    outputs: list[str]
    instance_count: int
    line_timeout: float
    limits: Any


_endpoint_auth_cache: dict[tuple[str, str], tuple[float, EndpointAuth]] = {}
_endpoint_auth_lock = threading.Lock()


def endpoint_key_hash(key: str) -> str:
    """The sha256 hex digest an endpoint key is stored as."""
    import hashlib

    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _endpoint_key_new() -> str:
    import secrets

    # 256 random bits: a plain sha256 is enough to store keys this strong.
    return ENDPOINT_KEY_PREFIX + secrets.token_urlsafe(32)


def _endpoint_forget(name: str) -> None:
    """Drop the cached key checks of an endpoint (called when a change commits)."""
    with _endpoint_auth_lock:
        for key in [k for k in _endpoint_auth_cache if k[0] == name]:
            _endpoint_auth_cache.pop(key, None)


def _endpoint_changed(name: str) -> None:
    transaction.on_commit(lambda: _endpoint_forget(name))


def _endpoint_name_check(name: str, field: str) -> str:
    import re

    from runs_app.models import ENDPOINT_NAME_PATTERN, ENDPOINT_NAME_RULE

    name = (name or "").strip()
    if not re.fullmatch(ENDPOINT_NAME_PATTERN, name):
        raise EndpointError(f"'{name}' is not a valid name: use {ENDPOINT_NAME_RULE}.", field=field)
    return name


def _endpoint_owner_check(user: AbstractBaseUser, endpoint: Any, action: str) -> None:
    from django.core.exceptions import PermissionDenied

    if endpoint.owner_id != user.pk:
        raise PermissionDenied(f"Only the owner of endpoint '{endpoint.name}' may {action}.")


def _endpoint_keys_store(endpoint: Any, slots: Sequence[str]) -> dict[str, str]:
    from runs_app.models import EndpointKey

    plain: dict[str, str] = {}
    now = timezone.now()
    for slot in slots:
        key = _endpoint_key_new()
        EndpointKey.objects.update_or_create(
            endpoint=endpoint,
            slot=slot,
            defaults={"key_hash": endpoint_key_hash(key), "prefix": key[:10], "created_at": now},
        )
        plain[slot] = key
    return plain


def endpoint_create(*, user: AbstractBaseUser, name: str, description: str = "") -> tuple[Any, EndpointKeys]:
    """A new endpoint with fresh primary and secondary keys, returned in plain text this once."""
    from django.db import IntegrityError

    from runs_app.models import Endpoint

    name = _endpoint_name_check(name, "endpoint")
    try:
        with transaction.atomic():
            endpoint = Endpoint.objects.create(name=name, owner=user, description=description.strip())
            keys = _endpoint_keys_store(endpoint, ENDPOINT_KEY_SLOTS)
    except IntegrityError:
        raise EndpointError(f"The endpoint name '{name}' is taken.", field="endpoint", status=409) from None
    _endpoint_changed(name)
    return endpoint, EndpointKeys(primary=keys["primary"], secondary=keys["secondary"])


def endpoint_key_regenerate(*, user: AbstractBaseUser, endpoint: Any, slot: str) -> str:
    """Replace one key (the other keeps working, so clients can move over); the old one fails from now on."""
    slot = (slot or "").lower()
    if slot not in ENDPOINT_KEY_SLOTS:
        raise EndpointError(f"key_type must be 'primary' or 'secondary', not '{slot}'.", field="key_type")
    _endpoint_owner_check(user, endpoint, "regenerate its keys")
    with transaction.atomic():
        key = _endpoint_keys_store(endpoint, [slot])[slot]
    _endpoint_changed(endpoint.name)
    return key


def endpoint_update(
    *,
    user: AbstractBaseUser,
    endpoint: Any,
    traffic: Mapping[str, Any] | None = None,
    disabled: bool | None = None,
    description: str | None = None,
) -> Any:
    """Change the traffic split (deployment name -> percent; missing ones get 0; the sum is 0 or 100),
    enable or disable the endpoint, or its description."""
    from runs_app.models import Deployment, Endpoint

    _endpoint_owner_check(user, endpoint, "change it")
    with transaction.atomic():
        endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        if traffic is not None:
            deployments = {d.name: d for d in Deployment.objects.filter(endpoint=endpoint)}
            shares: dict[str, int] = {}
            for name, value in traffic.items():
                if name not in deployments:
                    raise EndpointError(
                        f"traffic: endpoint '{endpoint.name}' has no deployment '{name}'.", field="traffic"
                    )
                try:
                    share = int(value)
                except (TypeError, ValueError):
                    raise EndpointError(
                        f"traffic: '{name}' must be a whole percent.", field="traffic"
                    ) from None
                if not 0 <= share <= 100 or str(share) != str(value).strip():
                    raise EndpointError(
                        f"traffic: '{name}' must be a whole percent from 0 to 100, not {value!r}.",
                        field="traffic",
                    )
                shares[name] = share
            total = sum(shares.values())
            if total not in (0, 100):
                raise EndpointError(
                    f"traffic: the shares add up to {total}%; they must add up to 100% (or 0% to stop serving).",
                    field="traffic",
                )
            for name, deployment in deployments.items():
                share = shares.get(name, 0)
                if deployment.traffic != share:
                    Deployment.objects.filter(pk=deployment.pk).update(traffic=share)
        changed = []
        if disabled is not None and endpoint.disabled != bool(disabled):
            endpoint.disabled = bool(disabled)
            changed.append("disabled")
        if description is not None:
            endpoint.description = description.strip()
            changed.append("description")
        endpoint.save(update_fields=[*changed, "updated_at"])
    _endpoint_changed(endpoint.name)
    return endpoint


def endpoint_delete(*, user: AbstractBaseUser, endpoint: Any) -> None:
    """Delete an endpoint, its deployments, keys and request history; both keys fail from the next request."""
    _endpoint_owner_check(user, endpoint, "delete it")
    name = endpoint.name
    endpoint.delete()
    _endpoint_changed(name)


def _flow_connection_names(flow: EngineFlow) -> set[str]:
    """The connections a flow names for sure (node and prompty connections), which must exist to serve it."""
    names: set[str] = set()
    nodes = list(flow.nodes)
    for variants in flow.node_variants.values():
        nodes.extend(v.node for v in variants.variants.values())
    names.update(n.connection for n in nodes if n.connection)
    configuration = getattr(getattr(flow, "prompty", None), "configuration", None) or {}
    if isinstance(configuration, Mapping) and isinstance(configuration.get("connection"), str):
        names.add(configuration["connection"])
    return names


def deployment_source(*, run: Run | None = None, flow_version: FlowVersion | None = None) -> dict[str, Any]:
    """What a deployment of a run (its snapshot, variant, init, environment) or a flow version would serve,
    with the loaded flow; EndpointError when it cannot be served."""
    from flowengine import FlowValidationError, validate
    from flowengine.serving import FlowInterface

    if (run is None) == (flow_version is None):
        raise EndpointError("Deploy either a run or a flow version.", field="source")
    if run is not None:
        source = {
            "snapshot": run.snapshot,
            "run": run,
            "flow": run.flow,
            "flow_version": run.flow_version,
            "flow_name": run.flow.name if run.flow_id else run.name,
            "variant": run.variant or "",
            "init": dict(run.init or {}),
            "environment_variables": dict(run.environment_variables or {}),
        }
    else:
        assert flow_version is not None
        source = {
            "snapshot": flow_version.snapshot,
            "run": None,
            "flow": flow_version.flow,
            "flow_version": flow_version,
            "flow_name": flow_version.flow.name,
            "variant": "",
            "init": {},
            "environment_variables": {},
        }
    try:
        flow = _load_engine_flow(source["snapshot"].sha256)
    except RunError as exc:
        raise EndpointError(str(exc), field="source") from None
    problems = validate(flow)
    if problems:
        raise EndpointError(
            "The flow is not valid:\n" + "\n".join(str(p) for p in problems), field="source"
        ) from None
    if source["variant"]:
        try:
            flow.with_variant(source["variant"])
        except FlowValidationError as exc:
            raise EndpointError("; ".join(str(p) for p in exc.problems), field="source") from None
    source["engine_flow"] = flow
    source["interface"] = FlowInterface.from_flow(flow)
    source["connections_used"] = sorted(_flow_connection_names(flow))
    return source


def _deployment_outputs(interface: Any, outputs: Sequence[str] | None) -> list[str]:
    names = [o.name for o in interface.outputs if not o.evaluation_only]
    if outputs is None:
        return []
    chosen = [str(o) for o in outputs]
    unknown = [o for o in chosen if o not in names]
    if unknown:
        raise EndpointError(
            f"outputs: the flow has no output {', '.join(repr(o) for o in unknown)} "
            f"(it has {', '.join(names) or 'none'}).",
            field="outputs",
        )
    if not chosen:
        raise EndpointError("outputs: choose at least one output the endpoint returns.", field="outputs")
    return [] if set(chosen) == set(names) else [n for n in names if n in chosen]


def _deployment_overrides(
    user: AbstractBaseUser, flow: EngineFlow, init: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, str]:
    from flows_app.selectors import connection_map_for_runner

    used = _connection_names(flow, init)
    clean = {str(k): str(v).strip() for k, v in (overrides or {}).items() if str(v or "").strip()}
    clean = {k: v for k, v in clean.items() if k != v}
    if "*" not in used:
        unknown = sorted(set(clean) - used)
        if unknown:
            raise EndpointError(
                f"connections: the flow uses no connection {', '.join(repr(u) for u in unknown)}.",
                field="connections",
            )
    required = _flow_connection_names(flow)
    wanted = {clean.get(n, n) for n in required} | set(clean.values())
    found = connection_map_for_runner(user, names=wanted)
    for name in sorted(required | set(clean)):
        target = clean.get(name, name)
        if target not in found:
            where = f"'{name}'" if target == name else f"'{target}' (for '{name}')"
            raise EndpointError(
                f"connections: you have no connection {where}; create it or pick one of yours.",
                field="connections",
            )
    return clean


def deployment_create(
    *,
    user: AbstractBaseUser,
    endpoint: str,
    deployment: str,
    run: Run | None = None,
    flow_version: FlowVersion | None = None,
    new_endpoint: bool | None = None,
    outputs: Sequence[str] | None = None,
    connections: Mapping[str, Any] | None = None,
    instance_count: int = 1,
    description: str = "",
) -> tuple[Any, EndpointKeys | None]:
    """Deploy a run's snapshot (or a flow version's) behind an endpoint, creating the endpoint when it is new.

    `new_endpoint`: True must create, False must reuse, None either. The first deployment of an endpoint takes
    all its traffic, later ones none (move it with `endpoint_update`). Returns the deployment and, for a new
    endpoint, its two keys in plain text (the only time they are shown).
    """
    from django.db import IntegrityError

    from runs_app.models import Deployment, Endpoint

    endpoint_name = _endpoint_name_check(endpoint, "endpoint")
    deployment_name = _endpoint_name_check(deployment, "deployment")
    try:
        instances = int(instance_count)
    except (TypeError, ValueError):
        instances = 0
    if not 1 <= instances <= ENDPOINT_MAX_INSTANCES:
        raise EndpointError(
            f"instance_count must be from 1 to {ENDPOINT_MAX_INSTANCES}, not {instance_count!r}.",
            field="instance_count",
        )
    source = deployment_source(run=run, flow_version=flow_version)
    chosen = _deployment_outputs(source["interface"], outputs)
    overrides = _deployment_overrides(user, source["engine_flow"], source["init"], connections)
    existing = Endpoint.objects.filter(name=endpoint_name).first()
    if existing is not None and existing.owner_id != user.pk:
        raise EndpointError(f"The endpoint name '{endpoint_name}' is taken.", field="endpoint", status=409)
    if existing is not None and new_endpoint:
        raise EndpointError(
            f"You already have an endpoint '{endpoint_name}': add the deployment to it or pick a new name.",
            field="endpoint",
            status=409,
        )
    if existing is None and new_endpoint is False:
        raise EndpointError(f"You have no endpoint '{endpoint_name}'.", field="endpoint", status=404)
    keys = None
    with transaction.atomic():
        if existing is None:
            target, keys = endpoint_create(user=user, name=endpoint_name, description=description)
        else:
            target = Endpoint.objects.select_for_update().get(pk=existing.pk)
        first = not Deployment.objects.filter(endpoint=target).exists()
        try:
            with transaction.atomic():
                created = Deployment.objects.create(
                    endpoint=target,
                    name=deployment_name,
                    snapshot=source["snapshot"],
                    run=source["run"],
                    flow=source["flow"],
                    flow_version=source["flow_version"],
                    flow_name=source["flow_name"],
                    flow_kind=source["engine_flow"].kind,
                    outputs=chosen,
                    connection_overrides=overrides,
                    variant=source["variant"],
                    init=source["init"],
                    environment_variables=source["environment_variables"],
                    instance_count=instances,
                    traffic=100 if first else 0,
                    created_by=user,
                )
        except IntegrityError:
            raise EndpointError(
                f"Endpoint '{endpoint_name}' already has a deployment '{deployment_name}'.",
                field="deployment",
                status=409,
            ) from None
    _endpoint_changed(endpoint_name)
    return created, keys


def deployment_delete(*, user: AbstractBaseUser, deployment: Any) -> None:
    """Delete a deployment that takes no traffic (or the endpoint's only one); its snapshot stays."""
    from runs_app.models import Deployment

    endpoint = deployment.endpoint
    _endpoint_owner_check(user, endpoint, "delete its deployments")
    others = Deployment.objects.filter(endpoint=endpoint).exclude(pk=deployment.pk)
    if deployment.traffic and others.exists():
        raise EndpointError(
            f"Deployment '{deployment.name}' takes {deployment.traffic}% of the traffic: move it to another "
            "deployment first.",
            field="traffic",
        )
    deployment.delete()
    _endpoint_changed(endpoint.name)


def _endpoint_auth_of(endpoint: Any) -> EndpointAuth:
    from runs_app.models import Deployment

    deployments = Deployment.objects.filter(endpoint=endpoint).values_list(
        "id", "name", "traffic", "snapshot_id"
    )
    return EndpointAuth(
        endpoint_id=endpoint.pk,
        name=endpoint.name,
        disabled=endpoint.disabled,
        deployments=tuple(
            ServedDeployment(id=i, name=n, traffic=t, snapshot=s) for i, n, t, s in deployments
        ),
    )


def endpoint_test_token(*, user: AbstractBaseUser, endpoint: Any) -> str:
    """A short-lived credential for the endpoint's own Test tab (signed, nothing stored)."""
    from django.core.signing import TimestampSigner

    _endpoint_owner_check(user, endpoint, "test it")
    signed = TimestampSigner(salt=ENDPOINT_TEST_TOKEN_SALT).sign(f"{endpoint.pk}.{user.pk}")
    return ENDPOINT_TEST_TOKEN_PREFIX + signed


def endpoint_auth_cached(name: str, credential: str) -> EndpointAuth | None:
    """A recent successful check of this credential for this endpoint, or None (no database access)."""
    key = (name, endpoint_key_hash(credential))
    entry = _endpoint_auth_cache.get(key)
    if entry is None or entry[0] < time.monotonic():
        return None
    return entry[1]


def endpoint_authenticate(*, name: str, credential: str) -> EndpointAuth | None:
    """The endpoint and its deployments when `credential` is one of its keys (or a live test token)."""
    import hmac

    from django.core import signing

    from runs_app.models import Endpoint, EndpointKey

    digest = endpoint_key_hash(credential)
    endpoint = None
    if credential.startswith(ENDPOINT_TEST_TOKEN_PREFIX):
        try:
            value = signing.TimestampSigner(salt=ENDPOINT_TEST_TOKEN_SALT).unsign(
                credential.removeprefix(ENDPOINT_TEST_TOKEN_PREFIX), max_age=ENDPOINT_TEST_TOKEN_SECONDS
            )
            endpoint_id, user_id = (int(part) for part in value.split("."))
        except (signing.BadSignature, ValueError):
            return None
        endpoint = Endpoint.objects.filter(pk=endpoint_id, name=name, owner_id=user_id).first()
    else:
        found = EndpointKey.objects.select_related("endpoint").filter(key_hash=digest).first()
        if found is not None and found.endpoint.name == name and hmac.compare_digest(found.key_hash, digest):
            endpoint = found.endpoint
    if endpoint is None:
        return None
    auth = _endpoint_auth_of(endpoint)
    now = time.monotonic()
    with _endpoint_auth_lock:
        if len(_endpoint_auth_cache) >= ENDPOINT_AUTH_CACHE_SIZE:
            # Every test token is a new credential: forget the checks that have run out.
            for key in [k for k, (until, _) in _endpoint_auth_cache.items() if until < now]:
                _endpoint_auth_cache.pop(key, None)
        _endpoint_auth_cache[(name, digest)] = (now + ENDPOINT_AUTH_CACHE_SECONDS, auth)
    return auth


def _deployment_connections(deployment: Any, flow: EngineFlow) -> dict[str, Any]:
    """The endpoint owner's connections the flow uses, decrypted, under the names the flow uses."""
    import dataclasses

    from flows_app.selectors import connection_list_for, connection_map_for_runner
    from flows_app.services import connection_secrets_for_runner

    owner = deployment.endpoint.owner
    overrides = dict(deployment.connection_overrides or {})
    names = _connection_names(flow, deployment.init or {})
    if "*" in names:
        names = set(connection_list_for(owner).values_list("name", flat=True))
    names |= set(overrides)
    found = connection_map_for_runner(owner, names={overrides.get(n, n) for n in names})
    served: dict[str, Any] = {}
    for name in names:
        source = found.get(overrides.get(name, name))
        if source is not None:
            served[name] = dataclasses.replace(connection_secrets_for_runner(source), name=name)
    return served


def deployment_serving(*, deployment_id: int) -> DeploymentServing:
    """How to serve one deployment: its materialised snapshot, decrypted connections and runner limits."""
    from flowengine import load_flow
    from flowengine.runner import Limits
    from flows_app.services import snapshot_materialize
    from runs_app.models import Deployment

    deployment = Deployment.objects.select_related("endpoint", "endpoint__owner").get(pk=deployment_id)
    flow_dir = snapshot_materialize(snapshot_sha=deployment.snapshot_id)
    flow = load_flow(flow_dir)
    limits = Limits(
        memory_mb=int(_setting("STUDIO_RUNNER_MEMORY_MB", 1024)),
        # A served runner lives for hours: a CPU-seconds budget would kill it sooner or later.
        cpu_seconds=None,
        open_files=1024,
        file_size_mb=1024,
    )
    return DeploymentServing(
        deployment_id=deployment.pk,
        endpoint=deployment.endpoint.name,
        name=deployment.name,
        snapshot=deployment.snapshot_id,
        flow_name=deployment.flow_name or deployment.endpoint.name,
        flow_dir=flow_dir,
        connections=_deployment_connections(deployment, flow),
        variant=deployment.variant or None,
        init=dict(deployment.init or {}),
        environment_variables=dict(deployment.environment_variables or {}),
        outputs=list(deployment.outputs or []),
        instance_count=deployment.instance_count,
        line_timeout=float(_setting("STUDIO_RUNNER_TIMEOUT_SECONDS", 600)),
        limits=limits,
    )


def endpoint_requests_record(*, rows: Sequence[Mapping[str, Any]]) -> int:
    """Store scoring requests for monitoring (rows of endpoints deleted meanwhile are dropped)."""
    from runs_app.models import Deployment, Endpoint, EndpointRequest

    if not rows:
        return 0
    endpoints = set(
        Endpoint.objects.filter(pk__in={r["endpoint_id"] for r in rows}).values_list("pk", flat=True)
    )
    deployments = set(
        Deployment.objects.filter(
            pk__in={r.get("deployment_id") for r in rows if r.get("deployment_id")}
        ).values_list("pk", flat=True)
    )
    objects = []
    for row in rows:
        if row["endpoint_id"] not in endpoints:
            continue
        data = dict(row)
        if data.get("deployment_id") not in deployments:
            data["deployment_id"] = None
        objects.append(EndpointRequest(**data))
    EndpointRequest.objects.bulk_create(objects, batch_size=500)
    return len(objects)
