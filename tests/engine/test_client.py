"""The studio client and the server-mode CLI pieces that need no studio: configuration, errors, zips,
run.yml rewriting, and the metric gate (also on local runs, through the real `flowstudio` process)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from flowengine.cli import CLIError
from flowengine.cli_server import Gate, apply_gates, details_csv, run_request
from flowengine.client import (
    REVOKED_MESSAGE,
    StudioClient,
    StudioConfig,
    StudioError,
    unzip_into,
    zip_folder,
)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "flows"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _create_args(**given: object) -> argparse.Namespace:
    fields = dict(
        file=None,
        flow=None,
        data=None,
        run=None,
        variant=None,
        name=None,
        column_mapping=None,
        environment_variables=None,
        init=None,
        set=None,
    )
    fields.update(given)
    return argparse.Namespace(**fields)


def test_client_module_never_imports_django() -> None:
    code = "import sys, flowengine.client, flowengine.cli_server; print('django' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "False"


def test_no_server_means_local_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWSTUDIO_SERVER", raising=False)
    assert StudioConfig.resolve() is None


def test_server_without_token_names_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWSTUDIO_TOKEN", raising=False)
    with pytest.raises(StudioError, match="FLOWSTUDIO_TOKEN is not set"):
        StudioConfig.resolve("http://studio.example:8000")


def test_server_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWSTUDIO_SERVER", "http://from-env:1")
    monkeypatch.setenv("FLOWSTUDIO_TOKEN", "fst_x")
    assert StudioConfig.resolve("http://from-flag:2/").server == "http://from-flag:2"


def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with StudioClient(StudioConfig(server=url, token="fst_x")) as client:
        with pytest.raises(StudioError) as caught:
            client.me()
    assert f"cannot reach the studio at {url}: connection refused" in str(caught.value)


def test_revoked_message_tells_what_to_do() -> None:
    assert REVOKED_MESSAGE == "the token was revoked in the studio; create a new one under Settings"


def test_flow_zip_is_deterministic_and_leaves_caches_out(tmp_path: Path) -> None:
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "flow.dag.yaml").write_text("inputs: {}\n")
    (flow / "sub").mkdir()
    (flow / "sub" / "tool.py").write_text("x = 1\n")
    (flow / "__pycache__").mkdir()
    (flow / "__pycache__" / "tool.cpython-311.pyc").write_bytes(b"\0")
    (flow / ".promptflow").mkdir()
    (flow / ".promptflow" / "flow.tools.json").write_text("{}")
    first = zip_folder(flow)
    assert first == zip_folder(flow)
    assert zipfile.ZipFile(io.BytesIO(first)).namelist() == ["flow.dag.yaml", "sub/tool.py"]


def test_unzip_refuses_an_entry_outside_the_target(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ok.txt", "fine")
        archive.writestr("../evil.py", "bad")
    with pytest.raises(StudioError, match="'../evil.py'"):
        unzip_into(buffer.getvalue(), tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()


def test_run_yml_with_a_local_flow_and_data_is_sent_with_those_files(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    run_yml = tmp_path / "ci" / "run.yml"
    run_yml.write_text(
        "flow: ../flows/dag_basic\ndata: ../flows/dag_basic/data.jsonl\n"
        "column_mapping:\n  text: ${data.text}\nenvironment_variables: .env\n"
    )
    (tmp_path / "ci" / ".env").write_text("MODE=ci\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "dag_basic").symlink_to(CORPUS / "dag_basic", target_is_directory=True)

    sent, folder = run_request(_create_args(file=str(run_yml), name="nightly"))

    spec = yaml.safe_load(sent)
    assert spec == {
        "flow": "flow",
        "data": "data/data.jsonl",
        "column_mapping": {"text": "${data.text}"},
        "environment_variables": "extra/environment_variables/.env",
        "name": "nightly",
    }
    names = set(zipfile.ZipFile(io.BytesIO(folder)).namelist())
    assert {"run.yml", "flow/flow.dag.yaml", "flow/upper.py", "data/data.jsonl"} <= names
    assert "extra/environment_variables/.env" in names


def test_studio_flow_reference_is_sent_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sent, folder = run_request(
        _create_args(flow="shouter@3", run="base", column_mapping=["answer=${run.outputs.shout}"])
    )
    assert folder is None
    assert yaml.safe_load(sent) == {
        "flow": "shouter@3",
        "run": "base",
        "column_mapping": {"answer": "${run.outputs.shout}"},
    }


def test_missing_local_flow_folder_is_reported_not_sent_as_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError, match="flow folder not found: ./flw"):
        run_request(_create_args(flow="./flw", data="data.jsonl"))


@pytest.mark.parametrize(
    ("text", "metrics", "fails"),
    [
        ("accuracy<0.8", {"accuracy": 0.75}, True),
        ("accuracy<0.8", {"accuracy": 0.8}, False),
        ("accuracy <= 0.8", {"accuracy": 0.8}, True),
        ("latency>2.5", {"latency": 3}, True),
        ("latency >= 2.5", {"latency": 2.4}, False),
        ("failed==0", {"failed": 0}, True),
        ("failed!=0", {"failed": 0}, False),
        ("__pf__.lines.failed>0", {"__pf__.lines.failed": 1}, True),
        ("grade==bad", {"grade": "bad"}, True),
        ("accuracy<0.8", {"accuracy": "0.9"}, False),
    ],
)
def test_gate_fails_exactly_when_its_comparison_holds(text: str, metrics: dict, fails: bool) -> None:
    assert (Gate.parse(text).check(metrics) is not None) is fails


def test_gate_on_a_missing_metric_fails_and_lists_the_metrics_there_are() -> None:
    reason = Gate.parse("f1<0.5").check({"accuracy": 1.0, "lines": 3})
    assert reason == "f1<0.5: the run has no metric 'f1' (its metrics: accuracy, lines)"


def test_gate_on_a_metric_that_is_not_a_number_fails() -> None:
    assert "is 'n/a', not a number" in Gate.parse("accuracy<0.8").check({"accuracy": "n/a"})


@pytest.mark.parametrize("text", ["accuracy", "accuracy<", "<0.8", "accuracy<high", "accuracy=>0.8"])
def test_malformed_gate_is_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(CLIError, match="--fail-if"):
        Gate.parse(text)


def test_apply_gates_exits_one_when_any_gate_fails(capsys: pytest.CaptureFixture[str]) -> None:
    gates = [Gate.parse("accuracy<0.5"), Gate.parse("accuracy<0.9")]
    assert apply_gates(gates, {"accuracy": 0.75}) == 1
    err = capsys.readouterr().err
    assert "gate passed: accuracy = 0.75 (fails if accuracy<0.5)" in err
    assert "gate failed: accuracy<0.9: accuracy = 0.75" in err
    assert apply_gates(gates[:1], {"accuracy": 0.75}) == 0


def test_details_csv_has_a_column_per_input_and_output() -> None:
    lines = [
        {
            "line_number": 0,
            "status": "Completed",
            "inputs": {"q": "a"},
            "outputs": {"y": {"n": 1}},
            "error": None,
        },
        {
            "line_number": 1,
            "status": "Failed",
            "inputs": {"q": "b"},
            "outputs": {},
            "error": {"message": "boom"},
        },
    ]
    rows = list(csv.reader(io.StringIO(details_csv(lines))))
    assert rows == [
        ["line_number", "status", "inputs.q", "outputs.y", "error"],
        ["0", "Completed", "a", '{"n": 1}', ""],
        ["1", "Failed", "b", "", "boom"],
    ]


@pytest.fixture
def local_cli(tmp_path: Path):
    """`flowstudio ...` as a real process in local mode (no server in its environment)."""
    env = dict(
        os.environ, FLOWSTUDIO_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), FLOWSTUDIO_NO_ZYGOTE="1"
    )
    env.pop("FLOWSTUDIO_SERVER", None)

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "flowengine.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == expect, result.stderr
        return result

    return run


def test_metric_gate_and_csv_work_on_local_runs_too(local_cli, tmp_path: Path) -> None:
    flow = CORPUS / "dag_aggregation"
    local_cli(
        "run",
        "create",
        "--flow",
        str(flow),
        "--data",
        str(flow / "data.jsonl"),
        "--column-mapping",
        "answer=${data.answer}",
        "truth=${data.truth}",
        "--name",
        "local_eval",
    )
    passed = local_cli("run", "show-metrics", "-n", "local_eval", "--fail-if", "accuracy<0.3")
    assert json.loads(passed.stdout)["accuracy"] == 0.4
    failed = local_cli("run", "show-metrics", "-n", "local_eval", "--fail-if", "accuracy<0.5", expect=1)
    assert "gate failed: accuracy<0.5: accuracy = 0.4" in failed.stderr
    rows = list(
        csv.DictReader(io.StringIO(local_cli("run", "show-details", "-n", "local_eval", "--csv").stdout))
    )
    assert [row["outputs.grade"] for row in rows] == [
        "Correct",
        "Incorrect",
        "Correct",
        "Incorrect",
        "Incorrect",
    ]
    page = Path(local_cli("run", "visualize", "-n", "local_eval").stdout.strip())
    assert page.name == "visualize.html" and "local_eval" in page.read_text(encoding="utf-8")


def test_studio_only_commands_say_they_need_a_server(local_cli) -> None:
    refused = local_cli("run", "stream", "-n", "x", expect=1)
    assert (
        "`flowstudio run stream` needs a studio: pass --server URL or set FLOWSTUDIO_SERVER" in refused.stderr
    )
