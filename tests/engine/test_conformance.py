"""Conformance with prompt flow 1.18.5: every flow of tests/data/flows run by our engine, compared field for
field with what prompt flow itself produced for the same flow, inputs and fake LLM (expected.json, recorded by
bench/record_promptflow.py). Where we deliberately differ, DELIBERATE_DIFFERENCES says so and why."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowengine import FlowExecutor, FlowValidationError, Problem, events, load_flow, validate
from flowengine.batch import BaseRunLines, MappingError, execute_batch, load_data, resolve_lines
from flowengine.connections import Connection

DATA = Path(__file__).resolve().parent.parent / "data"
CORPUS = DATA / "flows"
CONNECTIONS_FILE = DATA / "conformance_connections.yaml"


def _corpus() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every corpus flow: name -> (cases.json, expected.json)."""
    found = {}
    for folder in sorted(CORPUS.iterdir()):
        if (folder / "cases.json").exists():
            cases = json.loads((folder / "cases.json").read_text())
            expected = json.loads((folder / "expected.json").read_text())
            found[folder.name] = (cases, expected)
    return found


CORPUS_CASES = _corpus()


def _params(kind: str) -> list[Any]:
    params = []
    for name, (cases, _) in CORPUS_CASES.items():
        if kind == "invalid" and cases["kind"] == "invalid":
            params.append(pytest.param(name, id=name))
        elif kind == "test" and cases["kind"] == "run":
            params += [
                pytest.param(name, t["name"], id=f"{name}:{t['name']}") for t in cases.get("tests", [])
            ]
        elif kind == "batch" and cases["kind"] == "run":
            params += [
                pytest.param(name, b["name"], id=f"{name}:{b['name']}") for b in cases.get("batches", [])
            ]
    return params


# -- deliberate differences from prompt flow ----------------------------------------------------------------


def _missing_column_fails_the_line(
    line_number: int, outputs: dict[str, Any], status: str, error: Any
) -> None:
    assert status == "Failed", (line_number, outputs)
    assert "required_text" in _message(error)


# (flow, "test"|"batch", case name, line number or None) -> (why, check replacing the comparison)
DELIBERATE_DIFFERENCES: dict[tuple[str, str, str, int | None], tuple[str, Callable[..., None]]] = {
    ("error_missing_input", "batch", "main", 1): (
        # Prompt flow reads jsonl through pandas: a row without the column becomes NaN, str(NaN) is "nan",
        # and the line "succeeds" with "nan+fallback". A required input that is missing fails the line.
        "missing required input fails the line instead of becoming the string 'nan'",
        _missing_column_fails_the_line,
    ),
}


# -- helpers ---------------------------------------------------------------------------------------------------


def _substitute(value: Any, fake_llm: Any) -> Any:
    if isinstance(value, str):
        return value.replace("{fake_llm_base_url}", fake_llm.base_url).replace("{fake_llm_url}", fake_llm.url)
    if isinstance(value, list):
        return [_substitute(v, fake_llm) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, fake_llm) for k, v in value.items()}
    return value


def _connections(fake_llm: Any) -> dict[str, Connection]:
    specs = _substitute(yaml.safe_load(CONNECTIONS_FILE.read_text()), fake_llm)
    return {
        name: Connection(
            name=name, type=spec["type"], configs=spec.get("configs", {}), secrets=spec.get("secrets", {})
        )
        for name, spec in specs.items()
    }


def _jsonable(value: Any) -> Any:
    """Values as they would travel as JSON (as prompt flow's recording does)."""
    return json.loads(json.dumps(value, default=str))


def _message(error: Any) -> str:
    if error is None:
        return ""
    if isinstance(error, Mapping):
        return " ".join(str(error.get(k) or "") for k in ("type", "message", "node"))
    return " ".join(str(getattr(error, k, "") or "") for k in ("type", "message", "node"))


def _expected_outputs(output: Any) -> dict[str, Any]:
    # `pf flow test` returns a flex function's or a prompty's non-dict result bare; a line's outputs hold it
    # as "output", which is how prompt flow's own batch runs record it.
    return output if isinstance(output, dict) else {"output": output}


def _flow_dir(name: str) -> Path:
    return CORPUS / name


def _inputs_for(flow: Any, case: Mapping[str, Any]) -> dict[str, Any]:
    inputs = case.get("inputs")
    if inputs is not None:
        return dict(inputs)
    # No inputs given: `pf flow test` takes them from the flow's sample.
    sample = dict(flow.sample or {})
    if flow.kind == "flex":
        sample = dict(sample.get("inputs") or {})
    return sample


@pytest.fixture
def corpus_env(
    monkeypatch: pytest.MonkeyPatch, fake_llm: Any
) -> Callable[[Mapping[str, str]], dict[str, str]]:
    """Sets a case's process environment variables for one test."""

    def apply(env: Mapping[str, str]) -> dict[str, str]:
        resolved = {k: str(_substitute(v, fake_llm)) for k, v in env.items()}
        for key, value in resolved.items():
            monkeypatch.setenv(key, value)
        return resolved

    return apply


def _check_failure(name: str, recorded: Mapping[str, Any], result: Any) -> None:
    """Our failed line against prompt flow's failed test: same error code, same node, same user exception."""
    assert result.status == "Failed", f"{name}: prompt flow failed this line but we got {result.outputs!r}"
    error = result.error
    assert error is not None
    pf_error = recorded["error"]
    assert error.code == pf_error["code"]
    user = pf_error.get("user_error")
    if user:
        # Prompt flow: "Execution failure in 'divide': (ZeroDivisionError) division by zero".
        node = re.search(r"'([^']+)'", pf_error["message"]).group(1)
        text = _message(error)
        assert node == error.node or node in text
        assert user["type"] in text and user["message"] in text
        # The traceback is the user's: their file and function, none of the engine's frames.
        assert (
            error.traceback
            and Path(re.findall(r'File "([^"]+)"', user["traceback"])[-1]).name in error.traceback
        )
        assert "flowengine" not in error.traceback
    else:
        # Input errors (e.g. "The value for flow input 'b' ... does not match the expected type 'bool'").
        for quoted in re.findall(r"'([^']+)'", pf_error["message"]):
            if not quoted.startswith("flow input"):
                assert quoted in error.message or quoted in _message(error), (quoted, error)


def _check_raised(name: str, recorded: Mapping[str, Any], raised: BaseException | None, result: Any) -> None:
    """Prompt flow refused the call outright; we refuse it too, naming what prompt flow names."""
    quoted = re.findall(r"'([^']+)'", recorded["exception"]["message"])
    if raised is not None:
        text = str(raised)
    else:
        assert result.status == "Failed", (
            f"{name}: prompt flow raised but we completed with {result.outputs!r}"
        )
        text = _message(result.error)
    for q in quoted:
        assert q in text, f"{name}: {q!r} not named in {text!r}"


# -- flow tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flow_name", "test_name"), _params("test"))
async def test_flow_test_matches_promptflow(
    flow_name: str, test_name: str, fake_llm: Any, corpus_env: Callable[..., Any]
) -> None:
    """`flow test` of a corpus flow gives prompt flow's outputs (or its failure) field for field."""
    cases, expected = CORPUS_CASES[flow_name]
    case = next(t for t in cases["tests"] if t["name"] == test_name)
    recorded = expected["tests"][test_name]
    corpus_env(cases.get("env") or {})
    flow = load_flow(_flow_dir(flow_name))
    stream = bool(case.get("stream"))
    raised: BaseException | None = None
    result = None
    try:
        executor = FlowExecutor(
            flow, connections=_connections(fake_llm), variant=case.get("variant"), init=case.get("init")
        )
        try:
            result = await executor.run_line_result(
                _inputs_for(flow, case), node=case.get("node"), stream=stream
            )
            node_events = list(result.events)
            if flow.kind == "dag" and result.status == "Completed" and any(n.aggregation for n in flow.nodes):
                # `pf flow test` also runs the aggregation nodes over the single line.
                node_events += (await executor.aggregate([result])).events
        finally:
            executor.close()
    except (FlowValidationError, ValueError, TypeError, KeyError) as exc:
        raised = exc

    if recorded["status"] == "Raised":
        _check_raised(f"{flow_name}:{test_name}", recorded, raised, result)
        return
    assert raised is None, f"prompt flow ran this case ({recorded['status']}) but we raised {raised!r}"
    assert _node_statuses(node_events) == recorded["node_status"]
    if recorded["status"] == "Failed":
        _check_failure(f"{flow_name}:{test_name}", recorded, result)
        return
    assert result.status == "Completed", f"{result.error!r}"
    assert _jsonable(result.outputs) == _expected_outputs(recorded["output"])
    if stream:
        _check_stream_chunks(result)
    assert _llm_requests(fake_llm.requests(), stream) == _llm_requests(recorded["llm_requests"], stream)


# Request fields left out of the comparison of LLM calls, and why:
# - stream_options: we ask for usage at the end of a stream (prompt flow does not) to report token counts.
IGNORED_REQUEST_FIELDS = {"stream_options"}


def _llm_requests(requests: list[dict[str, Any]], streamed_case: bool) -> list[dict[str, Any]]:
    """The LLM calls a line made (path and body), comparable across engines and call orders.

    Bodies compare as values, so prompt flow's `"temperature": 0.0` (it casts to the tool's float parameter)
    equals our `0` taken as written in the YAML: the same request to any OpenAI-compatible server.
    """
    calls = []
    for request in requests:
        body = {k: v for k, v in (request["body"] or {}).items() if k not in IGNORED_REQUEST_FIELDS}
        if streamed_case:
            # The case is run with stream=True, where prompt flow's `flow test` never streams a DAG's llm node.
            body.pop("stream", None)
        calls.append({"path": request["path"], "body": body})
    return sorted(calls, key=lambda c: c["path"] + json.dumps(c["body"], sort_keys=True))


def _node_statuses(node_events: list[Any]) -> dict[str, str]:
    """Each node's final status, named as prompt flow's node runs name them."""
    names = {events.NodeCompleted: "Completed", events.NodeBypassed: "Bypassed", events.NodeFailed: "Failed"}
    return {e.node: names[type(e)] for e in node_events if type(e) in names}


def _check_stream_chunks(result: Any) -> None:
    """Streamed outputs arrive as chunks that join to the final output."""
    chunks: dict[str, str] = {}
    for event in result.events:
        if isinstance(event, events.OutputChunk):
            chunks[event.output] = chunks.get(event.output, "") + event.delta
    assert chunks, "a streamed case produced no OutputChunk events"
    for output, text in chunks.items():
        assert result.outputs[output] == text


# -- batch runs ------------------------------------------------------------------------------------------------


async def _run_batch(
    flow_name: str, batch_name: str, fake_llm: Any, corpus_env: Callable[..., Any]
) -> tuple[Any, BaseRunLines]:
    """Run one corpus batch with our local batch API (runner process, column mapping, aggregation)."""
    cases, _ = CORPUS_CASES[flow_name]
    batch = next(b for b in cases["batches"] if b["name"] == batch_name)
    env = corpus_env(cases.get("env") or {})
    flow_dir = _flow_dir(flow_name)
    base = None
    if batch.get("base"):
        _, base = await _run_batch(batch["base"]["flow"], batch["base"]["batch"], fake_llm, corpus_env)
    flow = load_flow(flow_dir)
    lines = resolve_lines(
        flow_inputs=flow.inputs,
        data=load_data(flow_dir / batch["data"]),
        mapping=batch.get("column_mapping") or None,
        base=base,
    )
    outcome = await execute_batch(
        flow_path=flow_dir,
        lines=lines,
        connections=_connections(fake_llm),
        variant=batch.get("variant"),
        init=batch.get("init"),
        environment_variables=env,
    )
    completed = [r for r in outcome.lines if r.status == "Completed"]
    as_base = BaseRunLines(
        name=f"{flow_name}_{batch_name}",
        outputs={r.line_number: r.outputs for r in completed},
        inputs={r.line_number: r.inputs for r in completed},
    )
    return outcome, as_base


@pytest.mark.parametrize(("flow_name", "batch_name"), _params("batch"))
async def test_batch_run_matches_promptflow(
    flow_name: str, batch_name: str, fake_llm: Any, corpus_env: Callable[..., Any]
) -> None:
    """A batch run gives prompt flow's line statuses, outputs and metrics field for field."""
    _, expected = CORPUS_CASES[flow_name]
    recorded = expected["batches"][batch_name]
    try:
        outcome, _ = await _run_batch(flow_name, batch_name, fake_llm, corpus_env)
    except (MappingError, FlowValidationError) as exc:
        assert recorded["status"] in ("Failed", "Raised"), (
            f"prompt flow completed this run; we refused: {exc}"
        )
        return
    if recorded["status"] != "Completed":
        # Prompt flow fails a run whose every line failed; ours completes with every line failed.
        assert outcome.completed == 0, f"prompt flow failed this run: {recorded.get('error')}"
        return
    ours = {r.line_number: r for r in outcome.lines}
    assert sorted(ours) == [line["line_number"] for line in recorded["lines"]]
    for line in recorded["lines"]:
        n = line["line_number"]
        mine = ours[n]
        difference = DELIBERATE_DIFFERENCES.get((flow_name, "batch", batch_name, n))
        if difference is not None:
            difference[1](n, mine.outputs, mine.status, mine.error)
            continue
        assert mine.status == line["status"], f"line {n}: {mine.error}"
        if line["status"] == "Completed":
            assert _jsonable(mine.outputs) == _expected_outputs(line["output"]), f"line {n}"
        else:
            assert mine.error is not None and mine.error["code"] == line["error"]["code"], f"line {n}"
    assert _jsonable(outcome.metrics) == recorded["metrics"]


# -- invalid flows ---------------------------------------------------------------------------------------------


def _problems(flow_dir: Path) -> list[Problem]:
    try:
        return list(validate(load_flow(flow_dir)))
    except FlowValidationError as exc:
        return list(exc.problems)


@pytest.mark.parametrize("flow_name", _params("invalid"))
def test_invalid_flow_is_reported_with_its_location(flow_name: str) -> None:
    """Every invalid corpus flow is refused by validation, naming the file, node and field.

    Prompt flow 1.18.5's `pf flow validate` passes most of these flows (expected.json: validate.passed) and
    only fails when the flow runs; we deliberately report them all at validation, with a location.
    """
    cases, expected = CORPUS_CASES[flow_name]
    expect = cases["expect"]
    problems = _problems(_flow_dir(flow_name))
    assert problems, (
        f"{flow_name}: prompt flow refused this flow ({_pf_refusal(expected)}) but we found nothing"
    )

    def fits(p: Problem) -> bool:
        return (
            (expect.get("file") is None or p.file == expect["file"])
            and (expect.get("node") is None or p.node == expect["node"])
            and (expect.get("field") is None or p.field == expect["field"])
            and (not expect.get("line") or p.line is not None)
            and all(m in str(p) for m in expect.get("mentions", []))
        )

    assert any(fits(p) for p in problems), f"no problem fits {expect}: {[str(p) for p in problems]}"


def _pf_refusal(expected: Mapping[str, Any]) -> str:
    for test in expected.get("tests", {}).values():
        if test.get("exception"):
            return test["exception"]["message"]
    return json.dumps(expected.get("validate"))


def test_corpus_has_at_least_twenty_flows_with_recordings() -> None:
    """The corpus is big enough and every flow has prompt flow's recording next to it."""
    assert len(CORPUS_CASES) >= 20
    for name, (cases, expected) in CORPUS_CASES.items():
        assert expected["promptflow_version"] == "1.18.5", name
        assert expected["kind"] == cases["kind"], name
