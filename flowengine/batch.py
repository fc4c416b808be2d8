"""Batch inputs and execution: read data files, apply column mapping, run every line in one runner.

Column mapping follows prompt flow (`promptflow/batch/_batch_inputs_processor.py`,
`promptflow/_utils/inputs_mapping_utils.py`):

- every flow input without a default is mapped to the same-named data column (`${data.<input>}`) unless
  the mapping says otherwise; an input with a default is filled from the data only when mapped explicitly;
- `${data.x}` reads column x of the data, `${run.outputs.x}` / `${run.inputs.x}` read the output / the
  original data row of the base run's line with the same line number; any other value is a literal;
- a line whose base-run line failed (or does not exist) is skipped, as prompt flow does;
- a reference to a column that no line of its source has refuses the whole run, naming the mapping;
  a line that lacks a column other lines have simply leaves that input out (the flow default, or a
  "missing input" failure of that one line, follows).
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
LINE_NUMBER_KEY = "line_number"
_MAPPING_RE = re.compile(r"^\$\{([^{}]+)\}$")
DEFAULT_BATCH_CONCURRENCY = 128
# A local batch run keeps only results and logs; node events and spans would cost both processes time.
BATCH_EVENTS = ("line_completed", "log", "error")


class DataError(Exception):
    """The data file cannot be used; `.problems` lists every problem, each naming file and line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class MappingError(Exception):
    """The column mapping does not fit the data, the base run or the flow."""


def load_data(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json, .csv or .tsv file (or a folder of them); broken JSON lines are refused."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"{path}: data file not found"])
    if path.is_dir():
        rows: list[dict[str, Any]] = []
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError([f"{path}: no .jsonl, .json, .csv or .tsv files in the folder"])
        for file in files:
            rows.extend(load_data(file))
        return rows
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _load_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        return _load_json(path)
    return _load_jsonl(path)


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8-sig") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(
                    f"{path}:{number}: line {number} is not valid JSON: {exc.msg} (column {exc.colno})"
                )
                continue
            if not isinstance(value, dict):
                problems.append(
                    f"{path}:{number}: line {number} must be a JSON object, not {type(value).__name__}"
                )
                continue
            rows.append(value)
    if problems:
        raise DataError(problems)
    return rows


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError([f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"]) from None
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DataError([f"{path}: a .json data file must hold an object or a list of objects"])
    return value


def _load_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        rows = []
        problems = []
        for row in reader:
            if None in row:
                problems.append(
                    f"{path}:{reader.line_num}: line {reader.line_num} has more fields than the header"
                )
                continue
            # Values stay strings, as prompt flow reads csv; the executor converts them to the input types.
            rows.append({k: ("" if v is None else v) for k, v in row.items()})
    if problems:
        raise DataError(problems)
    return rows


def parse_assignments(pairs: Sequence[str] | None, *, what: str = "value") -> dict[str, Any]:
    """`k=v` pairs into a dict; values are parsed as JSON when they parse, else kept as strings."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"{what} {pair!r} must have the form key=value")
        key, value = pair.split("=", 1)
        result[key.strip()] = parse_value(value)
    return result


def parse_value(text: str) -> Any:
    """JSON when `text` parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass
class BaseRunLines:
    """What a run referenced by `run:` offers to the mapping: its completed lines' outputs and data rows."""

    name: str
    outputs: dict[int, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[int, dict[str, Any]] = field(default_factory=dict)


def complete_mapping(flow_inputs: Mapping[str, Any], mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mapping prompt flow uses: same-named data columns for inputs without a default, then `mapping`."""
    result: dict[str, Any] = {}
    for name, definition in flow_inputs.items():
        if getattr(definition, "default", None) is None:
            result[name] = "${data." + name + "}"
    result.update(mapping or {})
    result.pop(LINE_NUMBER_KEY, None)
    return result


def check_mapping_has_binding(mapping: Mapping[str, Any] | None) -> None:
    """Refuse a mapping made only of literals, as prompt flow does."""
    if not mapping:
        return
    if not any(isinstance(v, str) and v.startswith("$") for v in mapping.values()):
        raise MappingError(
            "column mapping must contain at least one ${data.x} or ${run.outputs.x} binding, "
            f"but all its values are literals: {dict(mapping)}"
        )


def resolve_lines(
    *,
    flow_inputs: Mapping[str, Any],
    data: list[dict[str, Any]] | None,
    mapping: Mapping[str, Any] | None,
    base: BaseRunLines | None = None,
    data_name: str = "data",
) -> list[tuple[int, dict[str, Any]]]:
    """The (line_number, inputs) of every line to run, after column mapping."""
    check_mapping_has_binding(mapping)
    full = complete_mapping(flow_inputs, mapping)
    if not flow_inputs and not mapping and data:
        # A flow that declares no inputs takes the data columns as they are.
        full = {k: "${data." + k + "}" for row in data for k in row}
    sources: dict[str, dict[int, dict[str, Any]]] = {}
    if data is not None:
        sources["data"] = dict(enumerate(data))
    if base is not None:
        sources["run.outputs"] = base.outputs
        sources["run.inputs"] = base.inputs
    if not sources:
        raise MappingError("a run needs data (--data) or a base run (--run)")
    columns = {name: {k for row in rows.values() for k in row} for name, rows in sources.items()}
    bindings: dict[str, tuple[str, str] | None] = {}
    missing: list[str] = []
    for key, value in full.items():
        if not isinstance(value, str):
            bindings[key] = None
            continue
        match = _MAPPING_RE.match(value.strip())
        if match is None:
            bindings[key] = None
            continue
        binding = _split_reference(match.group(1), sources)
        if binding is None or binding[1] not in columns[binding[0]]:
            missing.append(_describe_missing(key, value, binding, columns, data_name, base))
            continue
        bindings[key] = binding
    if missing:
        raise MappingError("column mapping does not fit the inputs:\n" + "\n".join(missing))
    line_numbers = set.intersection(*(set(rows) for rows in sources.values()))
    lines = []
    for line_number in sorted(line_numbers):
        inputs: dict[str, Any] = {}
        for key, value in full.items():
            binding = bindings[key]
            if binding is None:
                inputs[key] = value
                continue
            row = sources[binding[0]][line_number]
            if binding[1] in row:
                inputs[key] = row[binding[1]]
        lines.append((line_number, inputs))
    return lines


def _split_reference(body: str, sources: Mapping[str, Any]) -> tuple[str, str] | None:
    # Prompt flow tries the shortest source prefix first: `run.outputs.a.b` -> ("run.outputs", "a.b").
    parts = body.split(".")
    for i in range(1, len(parts)):
        key = ".".join(parts[:i])
        if key in sources:
            return key, ".".join(parts[i:])
    return None


def _describe_missing(
    key: str,
    value: str,
    binding: tuple[str, str] | None,
    columns: Mapping[str, set[str]],
    data_name: str,
    base: BaseRunLines | None,
) -> str:
    if binding is None:
        known = ", ".join("${" + s + ".x}" for s in columns) or "none"
        return f"  {key}: {value}: unknown source (known: {known})"
    source, column = binding
    have = ", ".join(sorted(columns[source])) or "none"
    where = data_name if source == "data" else f"{source} of run '{base.name if base else ''}'"
    return f"  {key}: {value}: no column '{column}' in {where} (columns: {have})"


@dataclass
class LineRecord:
    """The result of one line of a batch run."""

    line_number: int
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    status: str
    error: dict[str, Any] | None
    duration_ms: float
    usage: dict[str, Any]
    completed: Any = None  # the LineCompleted event, for aggregation

    def detail(self) -> dict[str, Any]:
        """The details.jsonl record."""
        return {
            "line_number": self.line_number,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "status": self.status,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 3),
            "usage": self.usage,
        }


@dataclass
class BatchOutcome:
    """Every line's record (by line number) plus the aggregation's metrics and error."""

    lines: list[LineRecord]
    metrics: dict[str, Any]
    aggregation_error: dict[str, Any] | None = None

    @property
    def completed(self) -> int:
        """Lines that completed."""
        return sum(1 for r in self.lines if r.status == "Completed")

    @property
    def failed(self) -> int:
        """Lines that failed."""
        return sum(1 for r in self.lines if r.status != "Completed")


@dataclass
class AggregationOutcome:
    """What a run's aggregation gave: its metrics, its error (or None) and the log lines it printed."""

    metrics: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    logs: list[Any] = field(default_factory=list)


def read_aggregation(evs: Sequence[Any]) -> AggregationOutcome:
    """The outcome in the events of a runner's aggregation: the error is the first one, the aggregation's own
    or that of the aggregation node (or `__aggregate__`) that raised."""
    from flowengine import events

    outcome = AggregationOutcome()
    for ev in evs:
        if isinstance(ev, events.Metrics):
            outcome.metrics.update(ev.metrics or {})
        elif isinstance(ev, events.ErrorEvent | events.NodeFailed) and ev.error is not None:
            outcome.error = outcome.error or ev.error.to_dict()
        elif isinstance(ev, events.LogLine):
            outcome.logs.append(ev)
    return outcome


async def execute_batch(
    *,
    flow_path: str | Path,
    lines: Sequence[tuple[int, dict[str, Any]]],
    connections: Mapping[str, Any] | None = None,
    variant: str | None = None,
    init: Mapping[str, Any] | None = None,
    environment_variables: Mapping[str, str] | None = None,
    concurrency: int = DEFAULT_BATCH_CONCURRENCY,
    aggregate: bool = True,
    on_line: Callable[[LineRecord], None] | None = None,
    on_log: Callable[[str | None, Any], None] | None = None,
    runner_kw: Mapping[str, Any] | None = None,
) -> BatchOutcome:
    """Run `lines` as tasks in one runner process, then aggregate over the completed ones."""
    from flowengine import events
    from flowengine.runner_client import QUEUE_AHEAD, RunnerProcess

    records: dict[int, LineRecord] = {}
    kw = dict(runner_kw or {})
    kw.setdefault("concurrency", concurrency)
    # Sync tools of all lines in flight share the executor's thread pool.
    kw.setdefault("max_concurrency", concurrency)
    semaphore = asyncio.Semaphore(max(1, concurrency) * QUEUE_AHEAD)
    async with RunnerProcess(on_log=on_log, **kw) as rp:
        await rp.start(flow_path, connections, variant, init, environment_variables=environment_variables)

        async def one(line_number: int, inputs: dict[str, Any]) -> None:
            async with semaphore:
                completed = None
                async for ev in rp.run_line(inputs, line_number=line_number, event_types=BATCH_EVENTS):
                    if isinstance(ev, events.LogLine) and on_log is not None:
                        on_log(None, ev)
                    elif isinstance(ev, events.LineCompleted):
                        completed = ev
            assert completed is not None
            record = LineRecord(
                line_number=line_number,
                inputs=inputs,
                outputs=dict(completed.outputs or {}) if completed.status == "Completed" else {},
                status=completed.status,
                error=completed.error.to_dict() if completed.error is not None else None,
                duration_ms=float(completed.duration_ms or 0.0),
                usage=dict(completed.usage or {}),
                completed=completed,
            )
            records[line_number] = record
            if on_line is not None:
                on_line(record)

        await asyncio.gather(*(one(n, i) for n, i in lines))
        aggregation = AggregationOutcome()
        ok = [records[n].completed for n, _ in lines if records[n].status == "Completed"]
        if aggregate and ok:
            aggregation = read_aggregation(await rp.aggregate(ok))
            for ev in aggregation.logs:
                if on_log is not None:
                    on_log(None, ev)
    ordered = [records[n] for n in sorted(records)]
    return BatchOutcome(lines=ordered, metrics=aggregation.metrics, aggregation_error=aggregation.error)
