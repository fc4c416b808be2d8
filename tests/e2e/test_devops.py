"""Continuous integration with the CLI alone: `flowstudio` against a real studio (`manage.py runstudio`).

The pipeline a CI job runs: push a flow, run it over a dataset and evaluate the run (run.yml with a `run:`
base), gate on a metric (passing and failing), deploy the run and call the endpoint with its key. Every step is
a `flowstudio` process configured only by FLOWSTUDIO_SERVER and FLOWSTUDIO_TOKEN. No browser is needed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, SCALE_OUT_VARIABLES, RunningStudio

CORPUS = REPO / "tests" / "data" / "flows"
USER = "ci-bot"
CLI_TIMEOUT = 180

Cli = Callable[..., subprocess.CompletedProcess[str]]

EVAL_YML = """\
flow: ./eval
data: ./flow/data.jsonl
column_mapping:
  answer: ${run.outputs.shout}
  truth: ${data.expected}
"""
BATCH_YML = """\
flow: ./flow
data: ./flow/data.jsonl
column_mapping:
  text: ${data.text}
  times: ${data.times}
"""
SLOW_FLOW = {
    "flow.dag.yaml": (
        "inputs:\n  x:\n    type: int\noutputs:\n  y:\n    type: int\n    reference: ${wait.output}\n"
        "nodes:\n- name: wait\n  type: python\n  source:\n    type: code\n    path: wait.py\n"
        "  inputs:\n    x: ${inputs.x}\n"
    ),
    "wait.py": (
        "import time\n\nfrom promptflow.core import tool\n\n\n@tool\ndef wait(x: int) -> int:\n"
        "    time.sleep(2)\n    return x\n"
    ),
    "data.jsonl": "".join(json.dumps({"x": i}) + "\n" for i in range(30)),
}


def _manage(studio: RunningStudio, *args: str) -> str:
    """`manage.py ...` on the studio's data directory; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in SCALE_OUT_VARIABLES}
    env["STUDIO_DATA_DIR"] = str(studio.data_dir)
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def token(studio: RunningStudio) -> str:
    """A personal access token of a fresh user, printed by the `create_token` command (one Django start)."""
    printed = _manage(
        studio,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model\n"
        "from django.core.management import call_command\n"
        f"get_user_model().objects.create_user(username='{USER}', password='ci-bot-pass-123!')\n"
        f"call_command('create_token', user='{USER}', name='ci')\n",
    )
    # The shell may announce its automatic imports first: the token is the last line.
    return printed.splitlines()[-1].strip()


def _flowstudio() -> list[str]:
    """The installed console script, or the module when the package is not installed."""
    script = Path(sys.executable).parent / "flowstudio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flowengine.cli"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A checkout as a CI job sees it: the flow, its evaluation flow and the run files."""
    for name, source in (("flow", "dag_basic"), ("eval", "dag_aggregation")):
        shutil.copytree(
            CORPUS / source, tmp_path / name, ignore=shutil.ignore_patterns("expected.json", "cases.json")
        )
    (tmp_path / "batch.yml").write_text(BATCH_YML)
    (tmp_path / "eval.yml").write_text(EVAL_YML)
    return tmp_path


def _cli_for(studio: RunningStudio, token: str, cwd: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if k not in SCALE_OUT_VARIABLES}
    env.update(
        FLOWSTUDIO_SERVER=studio.url,
        FLOWSTUDIO_TOKEN=token,
        FLOWSTUDIO_HOME=str(cwd / ".flowstudio-home"),
        PYTHONPATH=str(REPO),
    )

    def run(*args: str, token: str | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
        call_env = dict(env, FLOWSTUDIO_TOKEN=token) if token else env
        result = subprocess.run(
            [*_flowstudio(), *args],
            cwd=cwd,
            env=call_env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        assert result.returncode == expect, (
            f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
        return result

    return run


@pytest.fixture
def cli(studio: RunningStudio, token: str, workdir: Path) -> Cli:
    """Run `flowstudio ...` in the checkout with FLOWSTUDIO_SERVER / FLOWSTUDIO_TOKEN set; checks the exit code."""
    return _cli_for(studio, token, workdir)


def test_ci_pipeline_pushes_runs_evaluates_gates_and_deploys_with_the_cli_alone(
    cli: Cli, studio: RunningStudio, workdir: Path
) -> None:
    pushed = cli("flow", "push", "flow", "--name", "shouter", "-m", "from CI")
    assert pushed.stdout.strip().startswith(f"{studio.url}/flows/")
    assert "as version 1" in pushed.stderr
    again = cli("flow", "push", "flow", "--name", "shouter", "-m", "second commit")
    assert "as version 2" in again.stderr and again.stdout.strip().endswith("?version=2")

    # The batch runs the version just pushed; its data file is uploaded from the checkout.
    batch = cli(
        "run", "create", "--file", "batch.yml", "--flow", "shouter@2", "--name", "ci-batch", "--stream"
    )
    assert "[Completed] 3/3 lines" in batch.stderr
    # The run's log is streamed as it runs, then the final record.
    assert "run completed" in batch.stdout
    # The evaluation flow is a local folder, sent as a snapshot with the run.
    evaluation = cli(
        "run", "create", "--file", "eval.yml", "--run", "ci-batch", "--name", "ci-eval", "--stream"
    )
    assert "Run 'ci-eval' Completed" in evaluation.stderr

    metrics = json.loads(cli("run", "show-metrics", "-n", "ci-eval", "--fail-if", "accuracy<0.6").stdout)
    assert metrics["accuracy"] == pytest.approx(0.6667)
    gated = cli(
        "run",
        "show-metrics",
        "-n",
        "ci-eval",
        "--fail-if",
        "accuracy<0.6",
        "--fail-if",
        "accuracy<0.8",
        expect=1,
    )
    assert "gate failed: accuracy<0.8: accuracy = 0.6667" in gated.stderr
    missing = cli("run", "show-metrics", "-n", "ci-eval", "--fail-if", "f1<0.5", expect=1)
    assert "the run has no metric 'f1'" in missing.stderr

    table = cli("run", "show-details", "-n", "ci-eval").stdout
    assert "outputs.grade" in table and "Incorrect" in table
    rows = list(csv.DictReader(io.StringIO(cli("run", "show-details", "-n", "ci-eval", "--csv").stdout)))
    assert [row["outputs.grade"] for row in rows] == ["Correct", "Incorrect", "Correct"]
    batch_run = json.loads(cli("run", "show", "-n", "ci-batch").stdout)
    assert (batch_run["flow"], batch_run["flow_version"]) == ("shouter", 2)
    lines = json.loads(cli("run", "show-details", "-n", "ci-batch", "--json").stdout)
    assert lines[1]["outputs"]["shout"] == "HELLO | HELLO | HELLO"
    shown = json.loads(cli("run", "show", "-n", "ci-eval").stdout)
    assert shown["run"] == "ci-batch" and shown["status"] == "Completed"
    listed = cli("run", "list", "-o", "table").stdout
    assert "ci-eval" in listed and "ci-batch" in listed
    page = Path(cli("run", "visualize", "-n", "ci-batch,ci-eval").stdout.strip())
    assert "ci-eval" in page.read_text(encoding="utf-8")

    deployed = cli("deploy", "--run", "ci-batch", "--endpoint", "shouter-ep", "--keys-file", "keys.json")
    answer = json.loads(deployed.stdout)
    assert answer["keys"] == "written to keys.json"  # the keys never reach the CI log
    assert (workdir / "keys.json").stat().st_mode & 0o777 == 0o600
    key = json.loads((workdir / "keys.json").read_text())["primary"]
    scored = httpx.post(
        answer["endpoint"]["scoring_uri"],
        json={"text": "ship it", "times": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert scored.status_code == 200, scored.text
    assert scored.json()["shout"] == "SHIP IT | SHIP IT"

    pulled = cli("flow", "pull", "shouter@1", "pulled")
    assert "version 1" in pulled.stderr
    assert (workdir / "pulled" / "flow.dag.yaml").read_bytes() == (
        workdir / "flow" / "flow.dag.yaml"
    ).read_bytes()


def test_stream_of_a_canceled_run_exits_non_zero(cli: Cli, workdir: Path) -> None:
    slow = workdir / "slow"
    slow.mkdir()
    for name, text in SLOW_FLOW.items():
        (slow / name).write_text(text)
    created = cli(
        "run",
        "create",
        "--flow",
        "slow",
        "--data",
        "slow/data.jsonl",
        "--column-mapping",
        "x=${data.x}",
        "--name",
        "ci-slow",
    )
    assert json.loads(created.stdout)["name"] == "ci-slow"
    canceled = cli("run", "cancel", "-n", "ci-slow")
    assert json.loads(canceled.stdout)["status"] in ("Canceling", "Canceled")
    streamed = cli("run", "stream", "-n", "ci-slow", "--timeout", "120", expect=1)
    assert "Run 'ci-slow' Canceled" in streamed.stderr


def test_revoked_token_is_refused_on_the_next_call_with_a_message_saying_so(
    studio: RunningStudio, token: str, workdir: Path
) -> None:
    with httpx.Client(base_url=f"{studio.url}/api/v1", headers={"Authorization": f"Bearer {token}"}) as api:
        created = api.post("/tokens", json={"name": "doomed"}).json()
        doomed = created["token"]
        cli = _cli_for(studio, doomed, workdir)
        cli("run", "list")
        assert api.delete(f"/tokens/{created['id']}").status_code == 200

    refused = cli("run", "list", expect=1)
    assert "the token was revoked in the studio; create a new one under Settings" in refused.stderr
    assert doomed[:12] in refused.stderr  # the studio's message names the token's prefix
    # The token the revocation was made with still works.
    cli("run", "list", token=token)


def test_unknown_token_and_unreachable_studio_are_told_apart(cli: Cli) -> None:
    unknown = cli("run", "list", token="fst_not-a-real-token", expect=1)
    assert "does not accept this token" in unknown.stderr
    down = cli("run", "show", "-n", "x", "--server", "http://127.0.0.1:9", expect=1)
    assert "cannot reach the studio at http://127.0.0.1:9: connection refused" in down.stderr
