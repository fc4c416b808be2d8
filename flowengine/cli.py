"""The `flowstudio` command line: prompt-flow shaped `flow`, `connection` and `run` commands.

Heavy modules are imported inside the commands that need them so that start-up stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FLOW_TYPES = ("standard", "chat", "evaluation", "flex", "prompty")


class CLIError(Exception):
    """A user-facing failure: printed to stderr, exit status 1."""


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=4, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _parse_pairs(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    from flowengine.batch import parse_assignments

    try:
        return parse_assignments(pairs, what=what)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _load_values(values: Sequence[str] | None, what: str) -> dict[str, Any]:
    """`k=v ...` pairs, or one .json file (or the first line of a .jsonl file)."""
    values = list(values or [])
    result: dict[str, Any] = {}
    pairs = []
    for value in values:
        if "=" not in value and value.lower().endswith((".json", ".jsonl")):
            path = Path(value)
            if not path.is_file():
                raise CLIError(f"--{what}: file not found: {value}")
            try:
                if path.suffix.lower() == ".jsonl":
                    first = next(
                        (line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}"
                    )
                    loaded = json.loads(first)
                else:
                    loaded = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CLIError(f"{value}:{exc.lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(loaded, dict):
                raise CLIError(f"{value}: --{what} file must hold a JSON object")
            result.update(loaded)
        else:
            pairs.append(value)
    result.update(_parse_pairs(pairs, f"--{what}"))
    return result


def _local_connections() -> dict[str, Any]:
    from flowengine.connections import LocalConnectionStore

    try:
        return LocalConnectionStore().as_mapping()
    except Exception as exc:  # an unreadable store should not stop flows that need no connection
        _err(f"warning: cannot read local connections: {exc}")
        return {}


def _load_flow(path: str) -> Any:
    from flowengine import FlowValidationError, load_flow

    if not Path(path).exists():
        raise CLIError(f"flow not found: {path}")
    try:
        return load_flow(path)
    except FlowValidationError as exc:
        raise CLIError(str(exc)) from None


# -- flow ---------------------------------------------------------------------------------------------


def cmd_flow_init(args: argparse.Namespace) -> int:
    """Create a runnable flow folder from a template."""
    import shutil

    template = Path(__file__).parent / "templates_init" / args.type
    target = Path(args.flow)
    if target.exists() and any(
        (target / f).exists() for f in ("flow.dag.yaml", "flow.flex.yaml", "chat.prompty", "basic.prompty")
    ):
        if not args.yes:
            raise CLIError(f"{target} already holds a flow; pass --yes to overwrite its files")
    shutil.copytree(template, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    _err(f"Created a {args.type} flow in {target.resolve()}")
    _err(f"Try it: flowstudio flow test --flow {target}")
    return 0


def cmd_flow_validate(args: argparse.Namespace) -> int:
    """Print every problem of a flow, one per line; exit 1 if there is any."""
    from flowengine import FlowValidationError, validate

    if not Path(args.flow).exists():
        raise CLIError(f"flow not found: {args.flow}")
    try:
        problems = list(validate(args.flow))
    except FlowValidationError as exc:
        problems = list(exc.problems)
    for problem in problems:
        sys.stdout.write(f"{problem}\n")
    if problems:
        _err(f"{len(problems)} problem(s) found in {args.flow}")
        return 1
    _err(f"Flow is valid: {args.flow}")
    return 0


def _sample_parts(flow: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    sample = dict(flow.sample or {})
    if flow.kind == "flex" and isinstance(sample.get("inputs"), Mapping):
        return dict(sample["inputs"]), dict(sample.get("init") or {})
    if flow.kind == "flex" and isinstance(sample.get("init"), Mapping):
        return {k: v for k, v in sample.items() if k != "init"}, dict(sample["init"])
    return sample, {}


def resolve_test_inputs(flow: Any, given: Mapping[str, Any], *, node: str | None = None) -> dict[str, Any]:
    """Given inputs, then flow defaults, then the flow's sample; raises CLIError naming missing inputs."""
    inputs = dict(given)
    sample_inputs, _ = _sample_parts(flow)
    if node:
        return _node_test_inputs(flow, node, inputs, sample_inputs)
    if (flow.kind == "prompty" and not given) or not flow.inputs:
        # Prompty, and flex flows that declare no inputs, take the sample for what is not given.
        inputs = {**sample_inputs, **inputs}
    missing = []
    for name, definition in flow.inputs.items():
        if name in inputs:
            continue
        if definition.default is not None:
            inputs[name] = definition.default
        elif name in sample_inputs:
            inputs[name] = sample_inputs[name]
        elif definition.is_chat_history or name == flow.chat_history_name:
            inputs[name] = []
        else:
            missing.append(name)
    if missing:
        raise CLIError(
            f'Required input(s) {missing} are missing for "flow"; pass them with --inputs name=value'
        )
    unknown = [k for k in inputs if flow.inputs and k not in flow.inputs]
    if unknown:
        _err(f"warning: unknown input(s) of flow: {unknown}")
    return inputs


def _node_test_inputs(
    flow: Any, node: str, given: dict[str, Any], sample_inputs: Mapping[str, Any]
) -> dict[str, Any]:
    """Inputs for testing one node: a value may be given by the node's own input name, as prompt flow allows."""
    from flowengine.model import parse_reference

    target = flow.node(node)
    if target is None:
        raise CLIError(f"{flow.file}: the flow has no node '{node}'")
    inputs = dict(given)
    for key, value in target.inputs.items():
        ref = parse_reference(value)
        if ref is None or key not in given:
            continue
        if ref.kind == "input":
            inputs.setdefault(ref.name, given[key])
        elif ref.property:
            merged = inputs.setdefault(f"{ref.name}.{ref.section}", {})
            if isinstance(merged, dict):
                merged.setdefault(ref.property, given[key])
        else:
            inputs.setdefault(f"{ref.name}.{ref.section}", given[key])
    for name, definition in flow.inputs.items():
        if name not in inputs and definition.default is not None:
            inputs[name] = definition.default
        elif name not in inputs and name in sample_inputs:
            inputs[name] = sample_inputs[name]
    return inputs


def cmd_flow_test(args: argparse.Namespace) -> int:
    """Run one line of a flow through a runner process; outputs as one JSON object on stdout."""
    import asyncio

    return asyncio.run(_flow_test(args))


async def _flow_test(args: argparse.Namespace) -> int:
    from flowengine.runner_client import RunnerProcess

    async with RunnerProcess(on_log=_on_log(args.verbose), **_runner_kw(args)) as rp:
        if Path(args.flow).exists():
            # The runner boots while this process loads the flow and decrypts the connections.
            await rp.spawn()
        flow = _load_flow(args.flow)
        given = _load_values(args.inputs, "inputs")
        init = _load_values(args.init, "init")
        _, sample_init = _sample_parts(flow)
        for key, value in sample_init.items():
            init.setdefault(key, value)
        env = _parse_pairs(args.environment_variables, "--environment-variables")
        if args.interactive:
            return await _interactive(rp, args, flow, given, init, env)
        inputs = resolve_test_inputs(flow, given, node=args.node)
        return await _test_once(rp, args, flow, inputs, init, env)


def _runner_kw(args: argparse.Namespace) -> dict[str, Any]:
    from flowengine.runner_client import Limits

    return {
        "env_mode": "inherit",
        "limits": Limits(memory_mb=getattr(args, "memory_limit_mb", None)),
        "line_timeout": getattr(args, "line_timeout", None),
        "use_zygote": _use_zygote(),
    }


def _use_zygote() -> bool:
    """Whether runners come from the local fork server (warm start); FLOWSTUDIO_NO_ZYGOTE=1 turns it off."""
    return os.environ.get("FLOWSTUDIO_NO_ZYGOTE", "").lower() not in ("1", "true", "yes")


def _on_log(verbose: bool) -> Any:
    def show(_rid: str | None, ev: Any) -> None:
        node = f"[{ev.node}] " if getattr(ev, "node", None) else ""
        _err(f"{node}{ev.text}")

    return show


async def _start(
    rp: Any, args: argparse.Namespace, flow: Any, init: dict[str, Any], env: dict[str, Any]
) -> None:
    from flowengine.runner_client import RunnerError

    try:
        await rp.start(flow.flow_file, _local_connections(), args.variant, init, environment_variables=env)
    except RunnerError as exc:
        raise CLIError(str(exc)) from None


async def _test_once(
    rp: Any,
    args: argparse.Namespace,
    flow: Any,
    inputs: dict[str, Any],
    init: dict[str, Any],
    env: dict[str, Any],
) -> int:
    from flowengine import events

    await _start(rp, args, flow, init, env)
    streamed = False
    completed = None
    async for ev in rp.run_line(inputs, line_number=0, stream=True, node=args.node):
        if isinstance(ev, events.OutputChunk):
            sys.stderr.write(ev.delta)
            sys.stderr.flush()
            streamed = streamed or bool(ev.delta)
        elif isinstance(ev, events.LogLine):
            _on_log(args.verbose)(None, ev)
        elif isinstance(ev, events.NodeFailed) and ev.error is not None and args.verbose:
            _err(f"node '{ev.node}' failed: {ev.error.message}")
        elif isinstance(ev, events.LineCompleted):
            completed = ev
    if streamed:
        sys.stderr.write("\n")
    if completed is None or completed.status != "Completed":
        error = completed.error if completed is not None else None
        message = error.message if error is not None else "the flow failed"
        if error is not None and error.traceback and args.verbose:
            _err(error.traceback)
        raise CLIError(message)
    _print_json(completed.outputs)
    return 0


async def _interactive(
    rp: Any,
    args: argparse.Namespace,
    flow: Any,
    given: dict[str, Any],
    init: dict[str, Any],
    env: dict[str, Any],
) -> int:
    import asyncio

    from flowengine import events

    chat_input = flow.chat_input_name
    chat_output = flow.chat_output_name
    history_name = flow.chat_history_name
    if not chat_input:
        raise CLIError(f"{flow.file}: --interactive needs a chat flow (an input with is_chat_input: true)")
    history: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    await _start(rp, args, flow, init, env)
    _err("Chat with the flow; an empty line or Ctrl-D ends the chat.")
    number = 0
    while True:
        sys.stderr.write("User: ")
        sys.stderr.flush()
        text = await loop.run_in_executor(None, sys.stdin.readline)
        if not text or not text.strip() or text.strip() in ("exit", "quit"):
            break
        line_given = dict(given)
        line_given[chat_input] = text.rstrip("\n")
        if history_name:
            line_given[history_name] = list(history)
        try:
            inputs = resolve_test_inputs(flow, line_given)
        except CLIError as exc:
            _err(str(exc))
            return 1
        sys.stdout.write("Bot: ")
        sys.stdout.flush()
        streamed = False
        completed = None
        async for ev in rp.run_line(inputs, line_number=number, stream=True):
            if isinstance(ev, events.OutputChunk) and (chat_output is None or ev.output == chat_output):
                sys.stdout.write(ev.delta)
                sys.stdout.flush()
                streamed = streamed or bool(ev.delta)
            elif isinstance(ev, events.LogLine):
                _on_log(args.verbose)(None, ev)
            elif isinstance(ev, events.LineCompleted):
                completed = ev
        number += 1
        if completed is None or completed.status != "Completed":
            sys.stdout.write("\n")
            _err(
                "error: " + (completed.error.message if completed and completed.error else "the flow failed")
            )
            continue
        if not streamed:
            answer = completed.outputs.get(chat_output) if chat_output else completed.outputs
            sys.stdout.write(answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False))
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"inputs": {chat_input: inputs[chat_input]}, "outputs": dict(completed.outputs)})
    return 0


# -- connection ---------------------------------------------------------------------------------------


def cmd_connection_create(args: argparse.Namespace) -> int:
    """Create (or replace) a local connection from a prompt flow connection YAML."""
    from flowengine.connections import LocalConnectionStore, connection_from_yaml

    overrides = _parse_pairs(args.set, "--set")
    if args.name:
        overrides["name"] = args.name
    try:
        conn = connection_from_yaml(args.file, overrides)
        stored = LocalConnectionStore().create(conn, replace=True)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    except Exception as exc:
        if type(exc).__name__.startswith("Connection"):
            raise CLIError(str(exc)) from None
        raise
    _print_json(stored.to_dict())
    return 0


def cmd_connection_list(args: argparse.Namespace) -> int:
    """List local connections with secrets masked."""
    from flowengine.connections import LocalConnectionStore

    _print_json([c.to_dict() for c in LocalConnectionStore().list()])
    return 0


def cmd_connection_show(args: argparse.Namespace) -> int:
    """Show one connection with secrets masked."""
    from flowengine.connections import LocalConnectionStore

    try:
        conn = LocalConnectionStore().get(args.name)
    except KeyError as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    _print_json(conn.to_dict())
    return 0


def cmd_connection_delete(args: argparse.Namespace) -> int:
    """Delete one connection."""
    from flowengine.connections import LocalConnectionStore

    try:
        LocalConnectionStore().delete(args.name)
    except KeyError as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    _err(f"Deleted connection '{args.name}'")
    return 0


# -- run ----------------------------------------------------------------------------------------------


def cmd_run_create(args: argparse.Namespace) -> int:
    """Create a local batch run (from flags and/or a run.yml); progress on stderr, summary on stdout."""
    from flowengine.batch import DataError, MappingError
    from flowengine.runs import RunError, RunRequest, load_run_yaml, run_create, summary

    fields: dict[str, Any] = {}
    if args.file:
        try:
            fields, warnings = load_run_yaml(args.file)
        except RunError as exc:
            raise CLIError(str(exc)) from None
        for warning in warnings:
            _err(f"warning: {warning}")
    if args.flow:
        fields["flow"] = args.flow
    if args.data:
        fields["data"] = args.data
    if args.run:
        fields["run"] = args.run
    if args.variant:
        fields["variant"] = args.variant
    if args.name:
        fields["name"] = args.name
    if args.column_mapping:
        mapping = dict(fields.get("column_mapping") or {})
        for pair in args.column_mapping:
            if "=" not in pair:
                raise CLIError(f"--column-mapping {pair!r} must have the form input='${{data.column}}'")
            key, value = pair.split("=", 1)
            mapping[key.strip()] = value
        fields["column_mapping"] = mapping
    if args.environment_variables:
        env = dict(fields.get("environment_variables") or {})
        env.update(
            {
                k: str(v)
                for k, v in _parse_pairs(args.environment_variables, "--environment-variables").items()
            }
        )
        fields["environment_variables"] = env
    if args.init:
        init = dict(fields.get("init") or {})
        init.update(_load_values(args.init, "init"))
        fields["init"] = init
    for pair in args.set or []:
        key, _, value = pair.partition("=")
        if key in ("display_name", "description"):
            fields[key] = value
        elif key.startswith("tags."):
            fields.setdefault("tags", {})[key[5:]] = value
        else:
            raise CLIError(f"--set {pair!r}: only display_name, description and tags.<key> can be set")
    if not fields.get("flow"):
        raise CLIError("run create needs --flow (or flow: in --file)")
    if not fields.get("data") and not fields.get("run"):
        raise CLIError("run create needs --data or --run (or data:/run: in --file)")
    request = RunRequest(**fields)
    from flowengine import FlowValidationError
    from flowengine.runner_client import Limits

    try:
        record = run_create(
            request,
            connections=_local_connections(),
            concurrency=args.concurrency,
            progress=sys.stderr,
            runner_kw={
                "env_mode": "inherit",
                "limits": Limits(),
                "line_timeout": args.line_timeout,
                "use_zygote": _use_zygote(),
            },
        )
    except (DataError, MappingError, RunError, FlowValidationError) as exc:
        raise CLIError(str(exc)) from None
    _print_json(summary(record))
    if record.status != "Completed":
        message = (record.error or {}).get("message", "the run failed")
        raise CLIError(f"run '{record.name}' failed: {message}")
    if record.error:
        _err(f"warning: the aggregation failed, its metrics may be incomplete: {record.error.get('message')}")
    if record.failed_lines:
        _err(
            f"warning: {record.failed_lines} of {record.total_lines} lines failed; see `flowstudio run show-details -n {record.name}`"
        )
    return 0


def _store() -> Any:
    from flowengine.runs import RunStore

    return RunStore()


def _run_call(fn: Any, *a: Any) -> Any:
    from flowengine.runs import RunError

    try:
        return fn(*a)
    except RunError as exc:
        raise CLIError(str(exc)) from None


def cmd_run_show(args: argparse.Namespace) -> int:
    """Show a run's record."""
    from flowengine.runs import summary

    _print_json(summary(_run_call(_store().get, args.name)))
    return 0


def cmd_run_list(args: argparse.Namespace) -> int:
    """List runs, newest first."""
    from flowengine.runs import summary

    limit = None if args.all_results else args.max_results
    records = _store().list(max_results=limit)
    if args.output == "table":
        from tabulate import tabulate

        rows = [
            (r.name, r.status, r.created_on[:19], f"{r.completed_lines}/{r.total_lines}", r.failed_lines)
            for r in records
        ]
        sys.stdout.write(tabulate(rows, headers=["name", "status", "created", "completed", "failed"]) + "\n")
    else:
        _print_json([summary(r) for r in records])
    return 0


def cmd_run_show_details(args: argparse.Namespace) -> int:
    """A table of every line's inputs, outputs and status (`--json` for a JSON list)."""
    details = _run_call(_store().details, args.name)
    if not args.all_results and args.max_results:
        details = details[: args.max_results]
    if args.json:
        _print_json(
            [
                {
                    "line_number": d.get("line_number"),
                    "inputs": d.get("inputs"),
                    "outputs": d.get("outputs"),
                    "status": d.get("status"),
                    "error": d.get("error"),
                }
                for d in details
            ]
        )
        return 0
    from tabulate import tabulate

    input_keys: list[str] = []
    output_keys: list[str] = []
    for d in details:
        input_keys += [k for k in d.get("inputs") or {} if k not in input_keys]
        output_keys += [k for k in d.get("outputs") or {} if k not in output_keys]

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    rows = []
    for d in details:
        ins = d.get("inputs") or {}
        outs = d.get("outputs") or {}
        failed = d.get("status") != "Completed"
        rows.append(
            [d.get("line_number")]
            + [cell(ins[k]) if k in ins else "" for k in input_keys]
            + [("(Failed)" if failed else cell(outs[k]) if k in outs else "") for k in output_keys]
            + [d.get("status")]
        )
    headers = (
        ["line_number"]
        + [f"inputs.{k}" for k in input_keys]
        + [f"outputs.{k}" for k in output_keys]
        + ["status"]
    )
    sys.stdout.write(tabulate(rows, headers=headers, tablefmt="simple") + "\n")
    return 0


def cmd_run_show_metrics(args: argparse.Namespace) -> int:
    """A run's metrics as one JSON object."""
    _print_json(_run_call(_store().metrics, args.name))
    return 0


# -- parser -------------------------------------------------------------------------------------------


# Commands that the serving and studio-client modules neither add nor change. Parsing one of them skips
# those modules, whose imports (an HTTP client among them) would otherwise weigh on every `flow test`.
_PLAIN_COMMANDS = {
    ("flow", "init"),
    ("flow", "validate"),
    ("flow", "test"),
    ("connection", "create"),
    ("connection", "list"),
    ("connection", "show"),
    ("connection", "delete"),
}
_SERVE_COMMAND = ("flow", "serve")


def _parser_parts(argv: Sequence[str]) -> dict[str, bool]:
    """Which optional command modules parsing `argv` needs (all of them for help or an unknown command)."""
    words = tuple(argv[:2])
    if len(words) < 2 or any(arg in ("-h", "--help") for arg in argv):
        return {"serving": True, "server": True}
    if words in _PLAIN_COMMANDS:
        return {"serving": False, "server": False}
    if words[:1] == ("run",):
        return {"serving": False, "server": True}
    return {"serving": words == _SERVE_COMMAND or words[:1] != ("flow",), "server": words != _SERVE_COMMAND}


def build_parser(*, serving: bool = True, server: bool = True) -> argparse.ArgumentParser:
    """The argparse tree of every command; `serving` adds `flow serve`, `server` the studio-client commands."""
    parser = argparse.ArgumentParser(
        prog="flowstudio",
        description="Author, test and run prompt-flow style flows.",
        epilog=(
            "Flows run in a separate runner process. Runners are forked from a local fork server that keeps the "
            "engine imported (it exits after 10 idle minutes); set FLOWSTUDIO_NO_ZYGOTE=1 to start each runner "
            "from scratch. FLOWSTUDIO_HOME (default ~/.flowstudio) holds connections and runs."
        ),
    )
    groups = parser.add_subparsers(dest="group", metavar="{flow,connection,run}")
    groups.required = True

    flow = groups.add_parser("flow", help="create, validate and test flows").add_subparsers(dest="command")
    flow.required = True
    p = flow.add_parser("init", help="create a flow folder from a template")
    p.add_argument("--flow", required=True, help="folder to create")
    p.add_argument("--type", choices=FLOW_TYPES, default="standard")
    p.add_argument("--yes", "-y", action="store_true", help="overwrite files of an existing flow")
    p.set_defaults(func=cmd_flow_init)

    p = flow.add_parser("validate", help="print every problem of a flow")
    p.add_argument("--flow", "--source", dest="flow", required=True)
    p.set_defaults(func=cmd_flow_validate)

    p = flow.add_parser("test", help="run one line of a flow")
    p.add_argument("--flow", required=True, help="flow folder or file")
    p.add_argument("--inputs", nargs="+", help="name=value ... (JSON values) or a .json/.jsonl file")
    p.add_argument("--init", nargs="+", help="flex init: name=value ... or a .json file")
    p.add_argument("--variant", help="'${node.variant_id}'")
    p.add_argument("--node", help="test only this node")
    p.add_argument("--interactive", action="store_true", help="chat with a chat flow")
    p.add_argument("--environment-variables", nargs="+", help="NAME=value ...")
    p.add_argument("--line-timeout", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--memory-limit-mb", type=int, default=None)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_flow_test)

    if serving:
        from flowengine.serving import add_serve_parser

        add_serve_parser(flow)

    conn = groups.add_parser("connection", help="manage local connections").add_subparsers(dest="command")
    conn.required = True
    p = conn.add_parser("create", help="create a connection from a YAML file")
    p.add_argument("--file", "-f", required=True)
    p.add_argument("--name", "-n")
    p.add_argument("--set", nargs="+", help="field=value overrides, e.g. api_key=...")
    p.set_defaults(func=cmd_connection_create)
    p = conn.add_parser("list", help="list connections")
    p.set_defaults(func=cmd_connection_list)
    p = conn.add_parser("show", help="show a connection (secrets masked)")
    p.add_argument("--name", "-n", required=True)
    p.set_defaults(func=cmd_connection_show)
    p = conn.add_parser("delete", help="delete a connection")
    p.add_argument("--name", "-n", required=True)
    p.add_argument("--yes", "-y", action="store_true")
    p.set_defaults(func=cmd_connection_delete)

    run = groups.add_parser("run", help="batch runs").add_subparsers(dest="command")
    run.required = True
    p = run.add_parser("create", help="run a flow over a data file")
    p.add_argument("--file", "-f", help="run.yml")
    p.add_argument("--flow")
    p.add_argument("--data")
    p.add_argument("--column-mapping", nargs="+", help="input='${data.column}' ...")
    p.add_argument("--run", help="base run for ${run.outputs.x}")
    p.add_argument("--variant")
    p.add_argument("--name", "-n")
    p.add_argument("--environment-variables", nargs="+")
    p.add_argument("--init", nargs="+")
    p.add_argument("--set", nargs="+", help="display_name=... description=... tags.key=...")
    p.add_argument("--concurrency", type=int, default=128, help="lines in flight (default 128)")
    p.add_argument("--line-timeout", type=float, default=600.0)
    p.set_defaults(func=cmd_run_create)
    p = run.add_parser("show", help="show a run")
    p.add_argument("--name", "-n", required=True)
    p.set_defaults(func=cmd_run_show)
    p = run.add_parser("list", help="list runs")
    p.add_argument("--max-results", "-r", type=int, default=50)
    p.add_argument("--all-results", action="store_true")
    p.add_argument("--output", "-o", choices=("json", "table"), default="json")
    p.set_defaults(func=cmd_run_list)
    p = run.add_parser("show-details", help="every line's inputs, outputs and status")
    p.add_argument("--name", "-n", required=True)
    p.add_argument("--max-results", "-r", type=int, default=100)
    p.add_argument("--all-results", action="store_true")
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    p.set_defaults(func=cmd_run_show_details)
    p = run.add_parser("show-metrics", help="a run's metrics")
    p.add_argument("--name", "-n", required=True)
    p.set_defaults(func=cmd_run_show_metrics)

    if server:
        from flowengine.cli_server import add_server_commands

        add_server_commands(groups, flow, run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowstudio` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(**_parser_parts(argv))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        _err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    # `python -m flowengine.cli`: run the importable module's main, so that the errors other modules raise
    # (they import flowengine.cli) are the classes main() catches, not copies in __main__.
    from flowengine.cli import main as _main

    sys.exit(_main())
