"""The local run store: one folder per batch run under `$FLOWSTUDIO_HOME/runs/<name>/`.

A run folder holds `run.json` (name, flow, status, times, counts, column mapping, variant, base run),
`inputs.jsonl` (the mapped inputs, with line_number), `outputs.jsonl` (one record per input line, with
line_number; a failed line has only its line_number), `details.jsonl` (status and error of every line),
`metrics.json`, `logs.txt` and `snapshot/` (the flow folder as it ran: additional_includes copied in,
`.promptflow/` and `__pycache__` left out).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flowengine.batch import (
    DEFAULT_BATCH_CONCURRENCY,
    BaseRunLines,
    LineRecord,
    execute_batch,
    load_data,
    resolve_lines,
)

RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshot"
SNAPSHOT_IGNORE = (".promptflow", "__pycache__", ".git", ".runs")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


class RunError(Exception):
    """A run cannot be created, found or read; the message says which and why."""


def flowstudio_home() -> Path:
    """$FLOWSTUDIO_HOME or ~/.flowstudio."""
    return Path(os.environ.get("FLOWSTUDIO_HOME") or Path.home() / ".flowstudio")


@dataclass
class RunRecord:
    """What run.json holds."""

    name: str
    flow: str
    status: str = "NotStarted"
    display_name: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    run: str | None = None
    column_mapping: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    init: dict[str, Any] = field(default_factory=dict)
    environment_variables: dict[str, str] = field(default_factory=dict)
    connections: dict[str, Any] = field(default_factory=dict)
    flow_kind: str = "dag"
    created_on: str = ""
    start_time: str | None = None
    end_time: str | None = None
    duration_s: float | None = None
    total_lines: int = 0
    completed_lines: int = 0
    failed_lines: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The run.json content."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """Read run.json content, ignoring keys this version does not know."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="microseconds")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class RunStore:
    """Run folders under `<home>/runs`."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.root = Path(home) if home is not None else flowstudio_home()
        self.runs_dir = self.root / "runs"

    def path(self, name: str) -> Path:
        """The folder of run `name` (validated so it cannot escape the runs folder)."""
        if not _NAME_RE.match(name or "") or name in (".", ".."):
            raise RunError(f"invalid run name {name!r}: use letters, digits, '_', '-' and '.'")
        return self.runs_dir / name

    def exists(self, name: str) -> bool:
        """Whether run `name` exists."""
        return (self.path(name) / RUN_FILE).exists()

    def get(self, name: str) -> RunRecord:
        """The run record; raises RunError when there is no such run."""
        file = self.path(name) / RUN_FILE
        if not file.exists():
            raise RunError(f"run '{name}' not found in {self.runs_dir}")
        return RunRecord.from_dict(json.loads(file.read_text(encoding="utf-8")))

    def save(self, record: RunRecord) -> None:
        """Write run.json."""
        folder = self.path(record.name)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / RUN_FILE, record.to_dict())

    def list(self, *, max_results: int | None = 50) -> list[RunRecord]:
        """Runs, newest first."""
        if not self.runs_dir.exists():
            return []
        records = []
        for folder in self.runs_dir.iterdir():
            file = folder / RUN_FILE
            if file.exists():
                try:
                    records.append(RunRecord.from_dict(json.loads(file.read_text(encoding="utf-8"))))
                except (ValueError, TypeError):
                    continue
        records.sort(key=lambda r: r.created_on, reverse=True)
        return records[:max_results] if max_results else records

    def details(self, name: str) -> list[dict[str, Any]]:
        """details.jsonl of a run: one record per line, by line number."""
        self.get(name)
        return _read_jsonl(self.path(name) / "details.jsonl")

    def metrics(self, name: str) -> dict[str, Any]:
        """metrics.json of a run."""
        self.get(name)
        file = self.path(name) / "metrics.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}

    def base_lines(self, name: str) -> BaseRunLines:
        """The completed lines of run `name`, for `${run.outputs.x}` / `${run.inputs.x}`."""
        record = self.get(name)
        if record.status != "Completed":
            raise RunError(f"run '{name}' has status {record.status}; only a Completed run can be referenced")
        folder = self.path(name)
        details = _read_jsonl(folder / "details.jsonl")
        ok = {d["line_number"] for d in details if d.get("status") == "Completed"}
        outputs = {
            int(d["line_number"]): dict(d.get("outputs") or {}) for d in details if d["line_number"] in ok
        }
        # `${run.inputs.x}` reads the base run's original data row, as prompt flow's local runs do.
        data_rows: dict[int, dict[str, Any]] = {}
        if record.data and Path(record.data).exists():
            data_rows = dict(enumerate(load_data(record.data)))
        else:
            data_rows = {int(r["line_number"]): r for r in _read_jsonl(folder / "inputs.jsonl")}
        inputs = {n: row for n, row in data_rows.items() if n in ok}
        return BaseRunLines(name=name, outputs=outputs, inputs=inputs)


def default_run_name(flow_dir: Path, kind: str, variant: str | None) -> str:
    """Prompt flow's default: `<flow folder>_<variant>_<YYYYmmdd_HHMMSS_ffffff>` (no variant for flex/prompty)."""
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    base = re.sub(r"[^A-Za-z0-9_.\-]", "_", flow_dir.name) or "flow"
    if kind == "dag":
        variant_id = "variant_0"
        if variant:
            match = re.match(r"^\$\{[^.{}]+\.([^.{}]+)\}$", variant.strip())
            variant_id = match.group(1) if match else variant_id
        return f"{base}_{variant_id}_{stamp}"
    return f"{base}_{stamp}"


def make_snapshot(flow: Any, target: Path, *, node_connections: Mapping[str, Any] | None = None) -> Path:
    """Copy the flow folder to `target` as prompt flow does; returns the flow file inside the copy."""
    source = Path(flow.path)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SNAPSHOT_IGNORE), symlinks=False)
    includes = list(getattr(flow, "additional_includes", ()) or ())
    for item in includes:
        src = Path(item)
        if not src.is_absolute():
            src = (source / item).resolve()
        if not src.exists():
            raise RunError(f"{flow.file}: additional include '{item}' not found ({src})")
        dst = target / src.name
        if src.is_dir():
            shutil.copytree(
                src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*SNAPSHOT_IGNORE), symlinks=False
            )
        else:
            shutil.copy2(src, dst)
    if (includes or node_connections) and flow.kind != "prompty":
        _rewrite_flow_yaml(
            target / flow.file, drop_includes=bool(includes), node_connections=node_connections
        )
    return target / flow.file


def _rewrite_flow_yaml(
    path: Path, *, drop_includes: bool, node_connections: Mapping[str, Any] | None
) -> None:
    """Drop additional_includes (now copied in) and apply run.yml `connections` overrides to the YAML."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if drop_includes:
        data.pop("additional_includes", None)
    for node_name, overrides in (node_connections or {}).items():
        node = next((n for n in data.get("nodes") or [] if n.get("name") == node_name), None)
        if node is None:
            raise RunError(f"connections: the flow has no node '{node_name}'")
        for key, value in (overrides or {}).items():
            if key == "connection":
                node["connection"] = value
            else:
                node.setdefault("inputs", {})[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


@dataclass
class RunRequest:
    """What `run create` asks for (the fields of prompt flow's run.yml)."""

    flow: str
    data: str | None = None
    run: str | None = None
    column_mapping: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    name: str | None = None
    display_name: str | None = None
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    environment_variables: dict[str, str] = field(default_factory=dict)
    connections: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)


RUN_YAML_FIELDS = {
    "flow",
    "data",
    "run",
    "column_mapping",
    "variant",
    "name",
    "display_name",
    "description",
    "tags",
    "environment_variables",
    "connections",
    "init",
}


def load_run_yaml(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The fields of a run.yml with paths made absolute, plus warnings for keys it ignores."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RunError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise RunError(f"{path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: a run file must be a mapping of run fields")
    warnings = [
        f"{path}: ignoring unknown field '{k}'"
        for k in data
        if k not in RUN_YAML_FIELDS
        and not str(k).startswith("$")
        and k not in ("properties", "resources", "identity", "runtime", "status")
    ]
    base = path.parent
    result = {k: v for k, v in data.items() if k in RUN_YAML_FIELDS}
    for key in ("flow", "data"):
        if isinstance(result.get(key), str):
            result[key] = str((base / result[key]).resolve())
    env = result.get("environment_variables")
    if isinstance(env, str):
        result["environment_variables"] = _read_dotenv(base / env)
    init = result.get("init")
    if isinstance(init, str):
        result["init"] = json.loads((base / init).read_text(encoding="utf-8"))
    return result, warnings


def _read_dotenv(path: Path) -> dict[str, str]:
    values = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


class _Progress:
    """Prints `Finished x / n lines` to a stream at most every `interval` seconds."""

    def __init__(self, total: int, stream: TextIO | None, interval: float = 1.0) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0

    def line(self, record: LineRecord) -> None:
        self.done += 1
        if record.status != "Completed":
            self.failed += 1
        now = time.monotonic()
        if self.stream is not None and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            self.stream.write(
                f"Finished {self.done} / {self.total} lines ({self.failed} failed), {rate:.1f} lines/s\n"
            )
            self.stream.flush()


def run_create(
    request: RunRequest,
    *,
    store: RunStore | None = None,
    connections: Mapping[str, Any] | None = None,
    concurrency: int = DEFAULT_BATCH_CONCURRENCY,
    progress: TextIO | None = None,
    runner_kw: Mapping[str, Any] | None = None,
) -> RunRecord:
    """Create and execute a local batch run; returns its final record. Refuses bad data before starting."""
    return asyncio.run(
        arun_create(
            request,
            store=store,
            connections=connections,
            concurrency=concurrency,
            progress=progress,
            runner_kw=runner_kw,
        )
    )


async def arun_create(
    request: RunRequest,
    *,
    store: RunStore | None = None,
    connections: Mapping[str, Any] | None = None,
    concurrency: int = DEFAULT_BATCH_CONCURRENCY,
    progress: TextIO | None = None,
    runner_kw: Mapping[str, Any] | None = None,
    on_line: Callable[[LineRecord], None] | None = None,
) -> RunRecord:
    """The async form of `run_create`."""
    from flowengine import load_flow
    from flowengine.runner_client import RunnerError

    store = store or RunStore()
    flow = load_flow(request.flow)
    flow_dir = Path(flow.path)
    name = request.name or default_run_name(flow_dir, flow.kind, request.variant)
    if store.exists(name):
        raise RunError(f"run '{name}' already exists; choose another --name")
    base = store.base_lines(request.run) if request.run else None
    data_rows = load_data(request.data) if request.data else None
    lines = resolve_lines(
        flow_inputs=flow.inputs,
        data=data_rows,
        mapping=request.column_mapping,
        base=base,
        data_name=str(request.data or "data"),
    )
    env = dict(request.environment_variables or {})
    if env.get("PF_WORKER_COUNT", "").isdigit():
        concurrency = max(1, int(env["PF_WORKER_COUNT"]))

    folder = store.path(name)
    folder.mkdir(parents=True, exist_ok=False)
    record = RunRecord(
        name=name,
        flow=str(flow_dir),
        status="Preparing",
        display_name=request.display_name or name,
        description=request.description or "",
        tags={str(k): str(v) for k, v in (request.tags or {}).items()},
        data=str(Path(request.data).resolve()) if request.data else None,
        run=request.run,
        column_mapping=dict(request.column_mapping or {}),
        variant=request.variant,
        init=dict(request.init or {}),
        environment_variables={str(k): str(v) for k, v in env.items()},
        connections=dict(request.connections or {}),
        flow_kind=flow.kind,
        created_on=_now(),
        total_lines=len(lines),
    )
    store.save(record)
    _write_jsonl(folder / "inputs.jsonl", [dict(inputs, line_number=n) for n, inputs in lines])
    log_lock = threading.Lock()
    log_file = (folder / "logs.txt").open("a", encoding="utf-8")

    def log(text: str) -> None:
        with log_lock:
            log_file.write(f"{_now()} {text}\n")
            log_file.flush()

    def on_log(_rid: str | None, ev: Any) -> None:
        prefix = f"[line {ev.line_number}]" if ev.line_number is not None else "[run]"
        node = f" [{ev.node}]" if getattr(ev, "node", None) else ""
        log(f"{prefix}{node} {ev.stream}: {ev.text}")

    tracker = _Progress(len(lines), progress)

    def line_done(rec: LineRecord) -> None:
        tracker.line(rec)
        if rec.status != "Completed" and rec.error:
            log(f"[line {rec.line_number}] failed: {rec.error.get('message')}")
        if on_line is not None:
            on_line(rec)

    try:
        snapshot_flow = make_snapshot(flow, folder / SNAPSHOT_DIR, node_connections=request.connections)
        record.status = "Running"
        record.start_time = _now()
        store.save(record)
        log(f"run {name}: {len(lines)} lines of flow {flow_dir}")
        started = time.monotonic()
        outcome = await execute_batch(
            flow_path=snapshot_flow,
            lines=lines,
            connections=connections,
            variant=request.variant,
            init=request.init,
            environment_variables=env,
            concurrency=concurrency,
            aggregate=flow.has_aggregation,
            on_line=line_done,
            on_log=on_log,
            runner_kw=runner_kw,
        )
        record.duration_s = round(time.monotonic() - started, 3)
        _write_jsonl(
            folder / "outputs.jsonl",
            [dict(r.outputs, line_number=r.line_number) for r in outcome.lines],
        )
        _write_jsonl(folder / "details.jsonl", [r.detail() for r in outcome.lines])
        _write_json(folder / "metrics.json", outcome.metrics)
        usage: dict[str, int] = {}
        for r in outcome.lines:
            for key, value in (r.usage or {}).items():
                if isinstance(value, int | float):
                    usage[key] = usage.get(key, 0) + int(value)
        record.usage = usage
        record.completed_lines = outcome.completed
        record.failed_lines = outcome.failed
        if outcome.aggregation_error:
            record.error = outcome.aggregation_error
            log(f"aggregation failed: {outcome.aggregation_error.get('message')}")
        # A run with failed lines is still Completed, as in prompt flow; only a run that cannot execute fails.
        record.status = "Completed"
    except RunnerError as exc:
        record.status = "Failed"
        record.error = exc.error.to_dict() if exc.error is not None else {"message": str(exc)}
        log(f"run failed: {exc}")
    except (RunError, OSError) as exc:
        record.status = "Failed"
        record.error = {"code": "UserError", "type": type(exc).__name__, "message": str(exc)}
        log(f"run failed: {exc}")
    finally:
        record.end_time = _now()
        store.save(record)
        log_file.close()
    return record


def summary(record: RunRecord) -> dict[str, Any]:
    """What `run create` and `run show` print."""
    data = record.to_dict()
    data.pop("connections", None)
    return data


def print_json(value: Any, stream: TextIO = sys.stdout) -> None:
    """Print `value` as indented JSON."""
    stream.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
