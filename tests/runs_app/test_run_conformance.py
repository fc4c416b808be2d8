"""Studio batch and evaluation runs give prompt flow's recorded results and the local CLI's, line for line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from runs_app import services
from runs_app.models import LineResult, Run, RunStatus
from tests.runs_app.conftest import CORPUS, corpus_case, corpus_files, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]

# (flow, batch) of the corpus: DAG with and without an LLM, aggregation, variants, a flex class with init,
# and an evaluation run over another flow's batch run (${run.outputs.x}).
CASES = [
    ("dag_basic", "main"),
    ("dag_aggregation", "main"),
    ("dag_llm_chat", "main"),
    ("dag_variants", "variant_1"),
    ("flex_class", "main"),
]
EVALUATION = ("dag_aggregation", "over_dag_basic")


def _connection_specs(fake_llm: Any) -> dict[str, dict[str, Any]]:
    text = (CORPUS.parent / "conformance_connections.yaml").read_text()
    text = text.replace("{fake_llm_base_url}", fake_llm.base_url).replace("{fake_llm_url}", fake_llm.url)
    return yaml.safe_load(text)


def _batch(flow_name: str, batch_name: str) -> dict[str, Any]:
    cases, _ = corpus_case(flow_name)
    return next(b for b in cases["batches"] if b["name"] == batch_name)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _studio_lines(run: Run) -> dict[int, tuple[str, Any]]:
    return {
        line.line_number: (line.status, _jsonable(line.outputs) if line.status == "Completed" else None)
        for line in LineResult.objects.filter(run=run)
    }


def _expected_lines(flow_name: str, batch_name: str) -> tuple[dict[int, tuple[str, Any]], dict[str, Any]]:
    _, expected = corpus_case(flow_name)
    recorded = expected["batches"][batch_name]
    lines = {}
    for line in recorded["lines"]:
        output = line["output"] if isinstance(line["output"], dict) else {"output": line["output"]}
        lines[line["line_number"]] = (line["status"], output if line["status"] == "Completed" else None)
    return lines, recorded["metrics"]


def _local_run(
    flow_name: str, batch_name: str, store: Any, connections: dict[str, Any], base: str | None
) -> Any:
    from flowengine.runs import RunRequest, run_create

    batch = _batch(flow_name, batch_name)
    request = RunRequest(
        flow=str(CORPUS / flow_name),
        data=str((CORPUS / flow_name / batch["data"]).resolve()),
        column_mapping=batch.get("column_mapping") or {},
        variant=batch.get("variant"),
        init=batch.get("init") or {},
        name=f"{flow_name}_{batch_name}",
        run=base,
    )
    record = run_create(request, store=store, connections=connections)
    details = store.details(record.name)
    lines = {
        d["line_number"]: (d["status"], _jsonable(d["outputs"]) if d["status"] == "Completed" else None)
        for d in details
    }
    return record, lines, store.metrics(record.name)


def test_studio_runs_match_promptflow_and_the_local_cli(owner, run_workers, fake_llm, tmp_path: Path):
    from flowengine.connections import Connection as EngineConnection
    from flowengine.runs import RunStore
    from flows_app.services import connection_create, flow_create

    specs = _connection_specs(fake_llm)
    for name, spec in specs.items():
        connection_create(
            owner=owner,
            name=name,
            type=spec["type"],
            configs=spec.get("configs", {}),
            secrets=spec["secrets"],
        )
    engine_connections = {
        name: EngineConnection(name=name, type=s["type"], configs=s.get("configs", {}), secrets=s["secrets"])
        for name, s in specs.items()
    }
    run_workers.start(concurrency=2)

    flows = {}
    runs: dict[tuple[str, str], Run] = {}
    for flow_name, _ in [*CASES, EVALUATION]:
        if flow_name not in flows:
            flows[flow_name] = flow_create(owner=owner, name=flow_name, files=corpus_files(flow_name))
    for flow_name, batch_name in CASES:
        batch = _batch(flow_name, batch_name)
        data = (CORPUS / flow_name / batch["data"]).resolve()
        dataset = services.dataset_create(
            owner=owner, name=flow_name, filename=data.name, data=data.read_bytes()
        )
        runs[(flow_name, batch_name)] = services.run_create(
            user=owner,
            flow_version=flows[flow_name].head,
            dataset=dataset,
            column_mapping=batch.get("column_mapping") or {},
            variant=batch.get("variant"),
            init=batch.get("init") or {},
        )

    def all_finished() -> bool:
        return all(
            Run.objects.get(pk=r.pk).status not in ("Queued", "Preparing", "Running") for r in runs.values()
        )

    wait_for(all_finished, timeout=120, what="the corpus runs", logs=run_workers.logs)
    base = Run.objects.get(pk=runs[("dag_basic", "main")].pk)
    eval_batch = _batch(*EVALUATION)
    eval_data = (CORPUS / EVALUATION[0] / eval_batch["data"]).resolve()
    evaluation = services.run_evaluate(
        user=owner,
        run=base,
        flow_version=flows[EVALUATION[0]].head,
        column_mapping=eval_batch["column_mapping"],
        dataset=services.dataset_create(
            owner=owner, name="eval", filename=eval_data.name, data=eval_data.read_bytes()
        ),
    )
    runs[EVALUATION] = evaluation
    wait_for(all_finished, timeout=60, what="the evaluation run", logs=run_workers.logs)

    store = RunStore(tmp_path / "local-runs")
    for (flow_name, batch_name), run in runs.items():
        run.refresh_from_db()
        assert run.status == RunStatus.COMPLETED, (flow_name, batch_name, run.error, run_workers.logs())
        base_name = "dag_basic_main" if (flow_name, batch_name) == EVALUATION else None
        _, local_lines, local_metrics = _local_run(
            flow_name, batch_name, store, engine_connections, base_name
        )
        expected_lines, expected_metrics = _expected_lines(flow_name, batch_name)
        studio = _studio_lines(run)
        assert studio == local_lines, (flow_name, batch_name)
        assert studio == expected_lines, (flow_name, batch_name)
        assert _jsonable(run.metrics) == _jsonable(local_metrics) == expected_metrics, (flow_name, batch_name)
    assert runs[EVALUATION].base_run_id == base.pk
