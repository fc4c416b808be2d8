"""`flowstudio` against a studio: `--server URL` (or FLOWSTUDIO_SERVER) with FLOWSTUDIO_TOKEN.

The run commands of the local CLI go to the studio when a server is set; `flow push|pull`, `run stream|cancel`
and `deploy` exist only there. `run show-metrics --fail-if` gates local and studio runs alike.
Kept apart from cli.py so that the local commands load nothing of the HTTP client.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowengine.cli import CLIError, _err, _print_json

Handler = Callable[[argparse.Namespace], int]
ServerHandler = Callable[[argparse.Namespace, Any], int]

GATE_RE = re.compile(
    r"^\s*(?P<name>[^<>=!\s](?:[^<>=!]*[^<>=!\s])?)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>.*?)\s*$"
)
GATE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
POLL_SECONDS = 1.0
SERVER_HELP = "studio URL (default: $FLOWSTUDIO_SERVER); the token comes from $FLOWSTUDIO_TOKEN"


# -- metric gates -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """`--fail-if 'accuracy<0.8'`: the run fails the gate when the comparison holds."""

    text: str
    name: str
    op: str
    value: float | str

    @classmethod
    def parse(cls, text: str) -> Gate:
        """Parse `name OP value` with OP one of < <= > >= == !=; CLIError names what is wrong."""
        match = GATE_RE.match(text)
        if not match or not match["value"]:
            raise CLIError(
                f"--fail-if {text!r}: write it as METRIC OP VALUE, e.g. 'accuracy<0.8' (OP: < <= > >= == !=)"
            )
        value: float | str = match["value"]
        try:
            value = float(value)
        except ValueError:
            if match["op"] not in ("==", "!="):
                raise CLIError(f"--fail-if {text!r}: {match['op']} needs a number, not {value!r}") from None
            value = str(value).strip("'\"")
        return cls(text=text, name=match["name"], op=match["op"], value=value)

    def check(self, metrics: Mapping[str, Any]) -> str | None:
        """None when the run passes this gate, else why it fails (a missing metric fails too)."""
        if self.name not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            return f"{self.text}: the run has no metric '{self.name}' (its metrics: {known})"
        actual = metrics[self.name]
        number = _number(actual)
        if isinstance(self.value, float):
            if number is None:
                return f"{self.text}: metric '{self.name}' is {actual!r}, not a number"
            if math.isnan(number) or GATE_OPS[self.op](number, self.value):
                return f"{self.text}: {self.name} = {_shown(actual)}"
            return None
        if GATE_OPS[self.op](_shown(actual), self.value):
            return f"{self.text}: {self.name} = {_shown(actual)}"
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def apply_gates(gates: Sequence[Gate], metrics: Mapping[str, Any], *, note: str = "") -> int:
    """Report each gate on stderr; 1 when any fails, else 0."""
    failed = False
    for gate in gates:
        reason = gate.check(metrics)
        if reason is None:
            _err(f"gate passed: {gate.name} = {_shown(metrics[gate.name])} (fails if {gate.text})")
        else:
            failed = True
            _err(f"gate failed: {reason}")
    if failed and note:
        _err(note)
    return 1 if failed else 0


# -- show-details rendering ------------------------------------------------------------------------------


def _details_columns(lines: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    input_keys: list[str] = []
    output_keys: list[str] = []
    for line in lines:
        input_keys += [k for k in line.get("inputs") or {} if k not in input_keys]
        output_keys += [k for k in line.get("outputs") or {} if k not in output_keys]
    return input_keys, output_keys


def details_csv(lines: Sequence[Mapping[str, Any]]) -> str:
    """CSV of a run's lines: line_number, status, inputs.*, outputs.*, error (as the studio exports it)."""
    input_keys, output_keys = _details_columns(lines)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["line_number", "status"]
        + [f"inputs.{k}" for k in input_keys]
        + [f"outputs.{k}" for k in output_keys]
        + ["error"]
    )
    for line in lines:
        inputs, outputs = line.get("inputs") or {}, line.get("outputs") or {}
        writer.writerow(
            [line.get("line_number"), line.get("status")]
            + [_shown(inputs[k]) if k in inputs else "" for k in input_keys]
            + [_shown(outputs[k]) if k in outputs else "" for k in output_keys]
            + [(line.get("error") or {}).get("message", "")]
        )
    return buffer.getvalue()


def details_table(lines: Sequence[Mapping[str, Any]]) -> str:
    """The `show-details` table: one row per line, long cells cut at 60 characters."""
    from tabulate import tabulate

    input_keys, output_keys = _details_columns(lines)

    def cell(value: Any) -> str:
        text = _shown(value)
        return text if len(text) <= 60 else text[:57] + "..."

    rows = []
    for line in lines:
        inputs, outputs = line.get("inputs") or {}, line.get("outputs") or {}
        failed = line.get("status") != "Completed"
        rows.append(
            [line.get("line_number")]
            + [cell(inputs[k]) if k in inputs else "" for k in input_keys]
            + [("(Failed)" if failed else cell(outputs[k]) if k in outputs else "") for k in output_keys]
            + [line.get("status")]
        )
    headers = ["line_number"] + [f"inputs.{k}" for k in input_keys] + [f"outputs.{k}" for k in output_keys]
    return tabulate(rows, headers=headers + ["status"], tablefmt="simple")


def _line_json(line: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("line_number", "inputs", "outputs", "status", "error")
    return {key: line.get(key) for key in keys}


# -- plumbing ---------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    """A StudioClient when a server is set (flag or environment), else None."""
    from flowengine.client import StudioClient, StudioConfig, StudioError

    try:
        config = StudioConfig.resolve(getattr(args, "server", None))
    except StudioError as exc:
        raise CLIError(str(exc)) from None
    return StudioClient(config) if config is not None else None


def _guarded(handler: Handler) -> Handler:
    """Report CLIError and StudioError as `error: ...` with exit status 1.

    cli.py's own main() does this for its commands, but under `python -m flowengine.cli` that module runs as
    __main__, a second copy whose CLIError is another class than the one imported here.
    """
    from flowengine.client import StudioError

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (CLIError, StudioError) as exc:
            _err(f"error: {exc}")
            return 1

    run.__doc__ = handler.__doc__
    return run


def _call(handler: ServerHandler, args: argparse.Namespace, client: Any) -> int:
    with client:
        return handler(args, client)


def either(local: Handler, remote: ServerHandler) -> Handler:
    """A command that runs locally, or against the studio when a server is set."""

    def run(args: argparse.Namespace) -> int:
        client = _client(args)
        if client is None:
            return local(args)
        return _call(remote, args, client)

    run.__doc__ = remote.__doc__
    return _guarded(run)


def server_only(command: str, remote: ServerHandler) -> Handler:
    """A command that needs a studio."""

    def run(args: argparse.Namespace) -> int:
        client = _client(args)
        if client is None:
            raise CLIError(
                f"`flowstudio {command}` needs a studio: pass --server URL or set FLOWSTUDIO_SERVER"
            )
        return _call(remote, args, client)

    run.__doc__ = remote.__doc__
    return _guarded(run)


# -- flow push / pull -------------------------------------------------------------------------------------


def server_flow_push(args: argparse.Namespace, client: Any) -> int:
    """Upload a flow folder as a new version (the flow is created on the first push); prints its URL."""
    folder = Path(args.path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"flow folder not found: {args.path}")
    _warn_problems(folder)
    name = args.name or folder.resolve().name
    flow, version = client.flow_push(folder, name=name, message=args.message or "")
    number = version["number"]
    _err(f"Pushed flow '{flow['name']}' as version {number} (refer to it as {flow['name']}@{number})")
    sys.stdout.write(client.flow_url(flow["id"], number) + "\n")
    return 0


def _warn_problems(folder: Path) -> None:
    from flowengine import FlowValidationError, validate

    try:
        problems = list(validate(folder))
    except FlowValidationError as exc:
        problems = list(exc.problems)
    except Exception as exc:  # validation is advice here; the studio stores any folder
        _err(f"warning: could not validate {folder}: {exc}")
        return
    for problem in problems:
        _err(f"warning: {problem}")


def server_flow_pull(args: argparse.Namespace, client: Any) -> int:
    """Download a flow (head, `name@N` or --version) into a folder."""
    from flowengine.client import unzip_into

    name, _, number = args.name.partition("@")
    version = args.version if args.version is not None else (int(number) if number.isdigit() else None)
    if number and not number.isdigit():
        raise CLIError(f"{args.name!r}: the version after '@' must be a number")
    flow = client.flow_find(name)
    if flow is None:
        raise CLIError(f"the studio has no flow named '{name}' that you can see")
    target = Path(args.path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not args.force:
        raise CLIError(f"{target} is not empty; pass --force to write the flow's files into it")
    written = unzip_into(client.flow_export(flow["id"], version), target)
    shown_version = version if version is not None else flow.get("head")
    _err(f"Pulled flow '{name}' version {shown_version} into {target} ({len(written)} files)")
    return 0


# -- runs ---------------------------------------------------------------------------------------------------


def _local_path(value: Any, base: Path) -> Path | None:
    if not isinstance(value, str) or not value.strip() or value.startswith("dataset:"):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    return path if path.exists() else None


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "/" in value or "\\" in value


def run_request(args: argparse.Namespace) -> tuple[bytes, bytes | None]:
    """The run.yml to upload and a zip of the local files it refers to (None when it refers to none).

    A local flow folder goes in as `flow/`, a local data file as `data/<name>`: the studio stores the folder
    as a snapshot and the file as a dataset. Command-line paths are relative to the working directory,
    run.yml paths to the run.yml's folder, as with local runs.
    """
    import yaml

    spec: dict[str, Any] = {}
    yml_base = Path.cwd()
    if args.file:
        path = Path(args.file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise CLIError(f"{args.file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise CLIError(f"{args.file}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise CLIError(f"{args.file}: a run file must be a mapping of run fields")
        spec = loaded
        yml_base = path.parent
    bases = {key: yml_base for key in ("flow", "data", "environment_variables", "init")}
    for key in ("flow", "data", "run", "variant", "name"):
        value = getattr(args, key, None)
        if value:
            spec[key] = value
            bases[key] = Path.cwd()
    _apply_flag_overrides(args, spec)
    if not spec.get("flow"):
        raise CLIError("run create needs --flow (or flow: in --file)")
    if not spec.get("data") and not spec.get("run"):
        raise CLIError("run create needs --data or --run (or data:/run: in --file)")
    files: dict[str, bytes] = {}
    flow_path = _local_path(spec["flow"], bases["flow"])
    if flow_path is not None:
        from flowengine.client import folder_files

        folder = flow_path if flow_path.is_dir() else flow_path.parent
        files.update({f"flow/{rel}": data for rel, data in folder_files(folder).items()})
        spec["flow"] = "flow"
    elif _looks_like_path(str(spec["flow"])):
        raise CLIError(
            f"flow folder not found: {spec['flow']} (a studio flow is given as name or name@version)"
        )
    data_path = _local_path(spec.get("data"), bases["data"])
    if data_path is not None and data_path.is_file():
        files[f"data/{data_path.name}"] = data_path.read_bytes()
        spec["data"] = f"data/{data_path.name}"
    for key in ("environment_variables", "init"):
        ref = _local_path(spec.get(key), bases[key])
        if ref is not None and ref.is_file():
            files[f"extra/{key}/{ref.name}"] = ref.read_bytes()
            spec[key] = f"extra/{key}/{ref.name}"
    run_yml = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode("utf-8")
    if not files:
        return run_yml, None
    from flowengine.client import zip_files

    # run.yml at the root keeps the studio from unwrapping `flow/` as the archive's single top folder.
    files["run.yml"] = run_yml
    return run_yml, zip_files(files)


def _apply_flag_overrides(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    from flowengine.cli import _load_values, _parse_pairs

    if args.column_mapping:
        mapping = dict(spec.get("column_mapping") or {})
        for pair in args.column_mapping:
            if "=" not in pair:
                raise CLIError(f"--column-mapping {pair!r} must have the form input='${{data.column}}'")
            key, value = pair.split("=", 1)
            mapping[key.strip()] = value
        spec["column_mapping"] = mapping
    if args.environment_variables:
        env = spec.get("environment_variables")
        env = dict(env) if isinstance(env, Mapping) else {}
        pairs = _parse_pairs(args.environment_variables, "--environment-variables")
        env.update({k: str(v) for k, v in pairs.items()})
        spec["environment_variables"] = env
    if args.init:
        init = spec.get("init")
        init = dict(init) if isinstance(init, Mapping) else {}
        init.update(_load_values(args.init, "init"))
        spec["init"] = init
    for pair in args.set or []:
        key, _, value = pair.partition("=")
        if key in ("display_name", "description"):
            spec[key] = value
        elif key.startswith("tags."):
            spec.setdefault("tags", {})[key[5:]] = value
        else:
            raise CLIError(f"--set {pair!r}: only display_name, description and tags.<key> can be set")


def server_run_create(args: argparse.Namespace, client: Any) -> int:
    """Submit a run to the studio; with --stream, follow it and exit with its status."""
    run_yml, folder = run_request(args)
    run = client.run_create_from_yaml(run_yml, folder)
    _err(f"Run '{run['name']}' submitted: {client.run_url(run['id'])}")
    if getattr(args, "stream", False):
        return stream_run(client, run["name"], timeout=None)
    _print_json(run)
    return 0


def stream_run(client: Any, name: str, *, timeout: float | None, poll: float = POLL_SECONDS) -> int:
    """Print the run's log lines (stdout) and progress (stderr) until it ends; 0 only when it Completed."""
    from flowengine.client import TERMINAL_STATUSES

    deadline = None if timeout is None else time.monotonic() + timeout
    after = 0
    shown_progress: tuple[Any, ...] | None = None
    while True:
        # Read the log before the status: a run that ended after this read still gets its last lines below.
        after = _print_logs(client, name, after)
        progress = client.run_progress(name)
        state = (progress["status"], progress["done"], progress["total"], progress["failed"])
        if state != shown_progress:
            shown_progress = state
            _err(
                f"[{progress['status']}] {progress['done']}/{progress['total']} lines"
                + (f", {progress['failed']} failed" if progress["failed"] else "")
            )
        if progress["status"] in TERMINAL_STATUSES:
            _print_logs(client, name, after)
            break
        if deadline is not None and time.monotonic() > deadline:
            raise CLIError(f"run '{name}' is still {progress['status']} after {timeout:g} s")
        time.sleep(poll)
    run = client.run_get(name)
    _print_json(run)
    if run["status"] == "Completed":
        _err(f"Run '{name}' Completed: {run['completed_lines']} lines, {run['failed_lines']} failed")
        return 0
    message = (run.get("error") or {}).get("message") or ""
    _err(f"Run '{name}' {run['status']}" + (f": {message}" if message else ""))
    return 1


def _print_logs(client: Any, name: str, after: int) -> int:
    while True:
        answer = client.run_logs(name, after=after)
        for line in answer["lines"]:
            where = f"[line {line['line_number']}] " if line.get("line_number") is not None else ""
            sys.stdout.write(f"{where}{line['text'].rstrip()}\n")
        sys.stdout.flush()
        after = int(answer["next_after"])
        if len(answer["lines"]) < 500:
            return after


def server_run_stream(args: argparse.Namespace, client: Any) -> int:
    """Follow a run's log and progress until it ends; exit 0 when Completed, 1 when Failed or Canceled."""
    return stream_run(client, args.name, timeout=args.timeout)


def server_run_show(args: argparse.Namespace, client: Any) -> int:
    """Show a studio run."""
    _print_json(client.run_get(args.name))
    return 0


def server_run_list(args: argparse.Namespace, client: Any) -> int:
    """List the newest studio runs."""
    limit = 1000 if args.all_results else args.max_results
    runs = client.run_list(limit=limit)
    if args.output == "table":
        from tabulate import tabulate

        rows = [
            (
                r["name"],
                r["status"],
                str(r["created_at"])[:19],
                f"{r['completed_lines']}/{r['total_lines']}",
                r["failed_lines"],
            )
            for r in runs
        ]
        sys.stdout.write(tabulate(rows, headers=["name", "status", "created", "completed", "failed"]) + "\n")
    else:
        _print_json(runs)
    return 0


def _max_results(args: argparse.Namespace) -> int | None:
    return None if args.all_results or not args.max_results else args.max_results


def _write_details(args: argparse.Namespace, lines: Sequence[Mapping[str, Any]]) -> int:
    if getattr(args, "csv", False):
        sys.stdout.write(details_csv(lines))
    elif args.json:
        _print_json([_line_json(line) for line in lines])
    else:
        sys.stdout.write(details_table(lines) + "\n")
    return 0


def server_run_show_details(args: argparse.Namespace, client: Any) -> int:
    """A studio run's lines as a table, `--json` or `--csv`."""
    return _write_details(args, list(client.run_lines(args.name, max_results=_max_results(args))))


def server_run_show_metrics(args: argparse.Namespace, client: Any) -> int:
    """A studio run's metrics as one JSON object; `--fail-if` gates exit 1 when they fail."""
    gates = [Gate.parse(text) for text in args.fail_if or []]
    answer = client.run_metrics(args.name)
    _print_json(answer["metrics"])
    if not gates:
        return 0
    note = ""
    if answer["status"] != "Completed":
        note = f"run '{args.name}' is {answer['status']}: metrics are final once it has Completed"
    # Gates may also name the system metrics (`__pf__.lines.failed`, tokens, duration).
    return apply_gates(gates, {**answer.get("system", {}), **answer["metrics"]}, note=note)


def server_run_cancel(args: argparse.Namespace, client: Any) -> int:
    """Cancel a studio run."""
    run = client.run_cancel(args.name)
    _err(f"Run '{run['name']}' is {run['status']}")
    _print_json(run)
    return 0


def _names(values: Iterable[str]) -> list[str]:
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise CLIError("--name needs at least one run name")
    return list(dict.fromkeys(names))


def server_run_visualize(args: argparse.Namespace, client: Any) -> int:
    """Write an HTML page comparing studio runs side by side; prints its path and the studio's compare URL."""
    from flowengine.visualize import static_comparison_html

    names = _names(args.name)
    runs = [
        (name, list(client.run_lines(name, max_results=None)), client.run_metrics(name)["metrics"])
        for name in names
    ]
    target = Path(args.output or f"visualize-{names[0]}.html")
    target.write_text(static_comparison_html(runs), encoding="utf-8")
    url = client.compare_url(names)
    _err(f"In the studio: {url}")
    sys.stdout.write(f"{target.resolve()}\n")
    _open_when_interactive(url)
    return 0


def _open_when_interactive(url: str) -> None:
    """Open the page in the user's browser when a person is at the terminal (never in pipelines or CI)."""
    from flowengine.visualize import open_in_browser

    if sys.stdout.isatty() and not os.environ.get("CI"):
        open_in_browser(url)


def local_run_visualize(args: argparse.Namespace) -> int:
    """Write an HTML page comparing local runs side by side (into the first run's folder); prints its path."""
    from flowengine.cli import _run_call, _store
    from flowengine.visualize import static_comparison_html

    names = _names(args.name)
    store = _store()
    runs = [(name, _run_call(store.details, name), _run_call(store.metrics, name)) for name in names]
    target = Path(args.output) if args.output else store.path(names[0]) / "visualize.html"
    target.write_text(static_comparison_html(runs), encoding="utf-8")
    sys.stdout.write(f"{target.resolve()}\n")
    _open_when_interactive(target.resolve().as_uri())
    return 0


def local_show_details(original: Handler) -> Handler:
    """The local show-details, plus `--csv`."""

    def run(args: argparse.Namespace) -> int:
        if not getattr(args, "csv", False):
            return original(args)
        from flowengine.cli import _run_call, _store

        details = _run_call(_store().details, args.name)
        limit = _max_results(args)
        return _write_details(args, details[:limit] if limit is not None else details)

    return run


def local_show_metrics(original: Handler) -> Handler:
    """The local show-metrics, plus `--fail-if` gates."""

    def run(args: argparse.Namespace) -> int:
        if not args.fail_if:
            return original(args)
        from flowengine.cli import _run_call, _store

        gates = [Gate.parse(text) for text in args.fail_if]
        metrics = _run_call(_store().metrics, args.name)
        _print_json(metrics)
        return apply_gates(gates, metrics)

    return run


# -- deploy -------------------------------------------------------------------------------------------------


def server_deploy(args: argparse.Namespace, client: Any) -> int:
    """Deploy the snapshot a run ran to an online endpoint (created when missing); prints the answer.

    A new endpoint's keys are in the answer this once: with --keys-file they go to that file (mode 0600)
    instead of stdout, so that CI logs never hold them.
    """
    answer = client.deploy(run=args.run, endpoint=args.endpoint, deployment=args.deployment)
    keys = answer.get("keys")
    if keys and args.keys_file:
        target = Path(args.keys_file)
        target.touch(mode=0o600)
        target.chmod(0o600)
        target.write_text(json.dumps(keys, indent=2) + "\n", encoding="utf-8")
        answer = {**answer, "keys": f"written to {target}"}
    deployment = (answer.get("deployment") or {}).get("name", args.deployment)
    if args.all_traffic:
        answer = {**answer, "endpoint": client.endpoint_traffic(args.endpoint, {deployment: 100})}
    _print_json(answer)
    endpoint = answer.get("endpoint") or {}
    score = endpoint.get("scoring_uri") or f"{client.config.server}/endpoints/{args.endpoint}/score"
    _err(
        f"Deployed run '{args.run}' as deployment '{deployment}' of endpoint '{args.endpoint}': POST {score}"
    )
    traffic = endpoint.get("traffic") or {}
    if traffic and not traffic.get(deployment):
        _err(f"note: deployment '{deployment}' gets no traffic yet ({traffic}); shift it in the studio")
    if keys and not args.keys_file:
        _err(
            "The endpoint's keys are in the output above and are shown only now: keep them in a secret store."
        )
    return 0


# -- parser ---------------------------------------------------------------------------------------------------


def _server_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help=SERVER_HELP)


def add_server_commands(groups: Any, flow: Any, run: Any) -> None:
    """Give the run commands `--server`, add the studio-only commands and the metric gate."""
    choices = run.choices
    for command, remote in (
        ("create", server_run_create),
        ("show", server_run_show),
        ("list", server_run_list),
        ("show-details", server_run_show_details),
        ("show-metrics", server_run_show_metrics),
    ):
        parser = choices[command]
        _server_arg(parser)
        local = parser.get_default("func")
        if command == "show-details":
            parser.add_argument("--csv", action="store_true", help="CSV instead of a table")
            local = local_show_details(local)
        elif command == "show-metrics":
            parser.add_argument(
                "--fail-if",
                action="append",
                metavar="'METRIC OP VALUE'",
                help="exit 1 when the comparison holds, e.g. 'accuracy<0.8' (OP: < <= > >= == !=); repeatable;"
                " a missing metric fails",
            )
            local = local_show_metrics(local)
        elif command == "create":
            parser.add_argument(
                "--stream", "-s", action="store_true", help="with --server: follow the run until it ends"
            )
        parser.set_defaults(func=either(local, remote))

    p = run.add_parser("stream", help="follow a studio run's log and progress until it ends")
    p.add_argument("--name", "-n", required=True)
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    _server_arg(p)
    p.set_defaults(func=server_only("run stream", server_run_stream))

    p = run.add_parser("cancel", help="cancel a studio run")
    p.add_argument("--name", "-n", required=True)
    _server_arg(p)
    p.set_defaults(func=server_only("run cancel", server_run_cancel))

    if "visualize" not in choices:
        p = run.add_parser("visualize", help="an HTML page comparing runs side by side")
        p.add_argument("--name", "-n", required=True, nargs="+", help="run names (a,b or a b)")
        p.add_argument("--output", "-o", help="HTML file to write")
        _server_arg(p)
        p.set_defaults(func=either(local_run_visualize, server_run_visualize))

    p = flow.add_parser("push", help="upload a flow folder to the studio as a new version")
    p.add_argument("path", help="the flow folder")
    p.add_argument("--name", help="the studio flow's name (default: the folder's name)")
    p.add_argument("--message", "-m", default="", help="what changed, for the flow's history")
    _server_arg(p)
    p.set_defaults(func=server_only("flow push", server_flow_push))

    p = flow.add_parser("pull", help="download a studio flow into a folder")
    p.add_argument("name", help="the flow's name, or name@version")
    p.add_argument("path", help="the folder to write")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    _server_arg(p)
    p.set_defaults(func=server_only("flow pull", server_flow_pull))

    p = groups.add_parser("deploy", help="deploy a studio run's flow snapshot to an online endpoint")
    p.add_argument("--run", required=True, help="the run whose snapshot to serve")
    p.add_argument("--endpoint", required=True, help="the endpoint's name (created when missing)")
    p.add_argument("--deployment", help="the deployment's name (default: the studio's, 'blue')")
    p.add_argument(
        "--all-traffic", action="store_true", help="send all of the endpoint's traffic to this deployment"
    )
    p.add_argument("--keys-file", help="write a new endpoint's keys to this file (mode 0600), not stdout")
    _server_arg(p)
    p.set_defaults(func=server_only("deploy", server_deploy))
    groups.metavar = "{flow,connection,run,deploy}"
