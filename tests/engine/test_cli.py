"""The `flowstudio` command line, run as a real process against real flows and the fake LLM server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_flow(folder: Path, dag: str, **sources: str) -> Path:
    """A flow folder: `dag` as its flow.dag.yaml and each source as `<name>.py`."""
    folder.mkdir()
    (folder / "flow.dag.yaml").write_text(dag)
    for name, text in sources.items():
        (folder / f"{name}.py").write_text(text)
    return folder


@pytest.fixture
def cli(tmp_path):
    """Run `flowstudio ...` in a fresh process with its own FLOWSTUDIO_HOME."""
    # Most tests start a fresh runner each time; the fork server has a test of its own.
    env = dict(
        os.environ, FLOWSTUDIO_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), FLOWSTUDIO_NO_ZYGOTE="1"
    )
    env.pop("FLOWSTUDIO_CONNECTION_KEY", None)

    def run(
        *args: str, stdin: str | None = None, check: bool = True, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "flowengine.cli", *args],
            cwd=tmp_path,
            env=dict(env, **(extra_env or {})),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return run


@pytest.fixture
def llm_connection(cli, tmp_path, fake_llm):
    """A local connection named open_ai_connection that points at the fake LLM server."""
    conn = tmp_path / "openai.yaml"
    conn.write_text("name: open_ai_connection\ntype: open_ai\napi_key: <user-input>\n")
    cli(
        "connection",
        "create",
        "--file",
        str(conn),
        "--set",
        "api_key=sk-test",
        f"base_url={fake_llm.base_url}",
    )
    return fake_llm


def test_flow_init_creates_flows_that_validate(cli, tmp_path):
    for kind in ("standard", "chat", "evaluation", "flex", "prompty"):
        cli("flow", "init", "--flow", f"f_{kind}", "--type", kind)
        target = tmp_path / f"f_{kind}" / ("basic.prompty" if kind == "prompty" else "")
        result = cli("flow", "validate", "--flow", str(target))
        assert result.stdout == ""
        assert "Flow is valid" in result.stderr


def test_flow_test_prints_the_outputs_as_one_json_object_on_stdout(cli):
    cli("flow", "init", "--flow", "hello", "--type", "standard")
    result = cli("flow", "test", "--flow", "hello", "--inputs", "text=Bonjour")
    assert json.loads(result.stdout) == {
        "output_prompt": "Prompt: Write a simple Bonjour program that displays the greeting message.\n"
    }


def test_flow_test_takes_inputs_and_init_from_files_and_the_sample(cli, tmp_path):
    cli("flow", "init", "--flow", "flex", "--type", "flex")
    assert json.loads(cli("flow", "test", "--flow", "flex").stdout) == {
        "message": "Hello, World!",
        "loud": "HELLO, WORLD!",
    }
    (tmp_path / "inputs.json").write_text('{"name": "Ada"}')
    result = cli("flow", "test", "--flow", "flex", "--inputs", "inputs.json", "--init", "greeting=Hi")
    assert json.loads(result.stdout)["message"] == "Hi, Ada!"


def test_flow_test_streams_llm_text_to_stderr_and_prints_the_answer(cli, llm_connection):
    cli("flow", "init", "--flow", "chat", "--type", "chat")
    result = cli("flow", "test", "--flow", "chat", "--inputs", "question=What is a flow?")
    answer = json.loads(result.stdout)["answer"]
    assert answer.startswith("ans-")
    assert answer in result.stderr
    body = llm_connection.last_body()
    assert body["messages"][-1] == {"role": "user", "content": "What is a flow?"}
    assert body["model"] == "gpt-4o-mini"


def test_prompty_flow_test_uses_its_sample(cli, llm_connection):
    cli("flow", "init", "--flow", "p", "--type", "prompty")
    result = cli("flow", "test", "--flow", "p/basic.prompty")
    assert json.loads(result.stdout)["output"].startswith("ans-")
    assert llm_connection.last_body()["messages"][-1]["content"] == "What is prompt flow?"


def test_interactive_chat_keeps_the_history(cli, llm_connection):
    cli("flow", "init", "--flow", "chat", "--type", "chat")
    result = cli("flow", "test", "--flow", "chat", "--interactive", stdin="Hi there\nAnd then?\n\n")
    replies = [line for line in result.stdout.splitlines() if line.startswith("Bot: ")]
    assert len(replies) == 2
    first_answer = replies[0][len("Bot: ") :]
    messages = llm_connection.last_body()["messages"]
    assert {"role": "user", "content": "Hi there"} in messages
    assert {"role": "assistant", "content": first_answer} in messages
    assert messages[-1] == {"role": "user", "content": "And then?"}


def test_flow_test_failure_exits_1_with_the_error_on_stderr(cli, tmp_path):
    write_flow(
        tmp_path / "bad",
        "inputs:\n  x: {type: string}\noutputs:\n  y: {type: string, reference: '${boom.output}'}\n"
        "nodes:\n- name: boom\n  type: python\n  source: {type: code, path: boom.py}\n  inputs: {x: '${inputs.x}'}\n",
        boom="def boom(x: str) -> str:\n    raise RuntimeError('exploded on ' + x)\n",
    )
    result = cli("flow", "test", "--flow", "bad", "--inputs", "x=now", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "exploded on now" in result.stderr
    missing = cli("flow", "test", "--flow", "bad", check=False)
    assert missing.returncode == 1
    assert "Required input(s) ['x'] are missing" in missing.stderr


def test_flow_validate_prints_every_problem_with_file_and_line(cli, tmp_path):
    write_flow(
        tmp_path / "invalid",
        "inputs:\n  q: {type: string}\noutputs:\n  a: {type: string, reference: '${nowhere.output}'}\n"
        "nodes:\n- name: n1\n  type: python\n  source: {type: code, path: missing.py}\n  inputs: {q: '${inputs.qq}'}\n",
    )
    result = cli("flow", "validate", "--flow", "invalid", check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2
    assert all(line.startswith("flow.dag.yaml:") for line in lines)


def test_connection_commands_keep_secrets_masked(cli, tmp_path):
    conn = tmp_path / "conn.yaml"
    conn.write_text("name: my_llm\ntype: open_ai\napi_key: sk-very-secret-value\n")
    created = json.loads(cli("connection", "create", "--file", str(conn)).stdout)
    assert created["secrets"]["api_key"] == "******"
    listed = cli("connection", "list").stdout
    shown = cli("connection", "show", "--name", "my_llm").stdout
    assert "sk-very-secret-value" not in listed + shown
    assert [c["name"] for c in json.loads(listed)] == ["my_llm"]
    cli("connection", "delete", "--name", "my_llm")
    assert json.loads(cli("connection", "list").stdout) == []
    gone = cli("connection", "show", "--name", "my_llm", check=False)
    assert gone.returncode == 1 and "my_llm" in gone.stderr


def test_run_create_then_details_and_metrics_of_an_evaluation_on_a_base_run(cli, tmp_path):
    cli("flow", "init", "--flow", "std", "--type", "standard")
    cli("flow", "init", "--flow", "ev", "--type", "evaluation")
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"text": "Hello", "expected": "Prompt: Write a simple Hello program that displays the greeting message.\\n"}\n'
        '{"text": "Bye", "expected": "something else"}\n'
    )
    base = cli(
        "run",
        "create",
        "--flow",
        "std",
        "--data",
        str(data),
        "--name",
        "base",
        "--column-mapping",
        "text=${data.text}",
    )
    summary = json.loads(base.stdout)
    assert summary["status"] == "Completed" and summary["completed_lines"] == 2
    assert "Finished 2 / 2 lines" in base.stderr

    (tmp_path / "run.yml").write_text(
        "flow: ev\ndata: data.jsonl\nrun: base\nname: eval\ndisplay_name: accuracy\ntags: {team: qa}\n"
        "column_mapping:\n  groundtruth: ${data.expected}\n  prediction: ${run.outputs.output_prompt}\n"
    )
    ev = json.loads(cli("run", "create", "--file", "run.yml").stdout)
    assert ev["run"] == "base" and ev["tags"] == {"team": "qa"} and ev["display_name"] == "accuracy"

    details = json.loads(cli("run", "show-details", "-n", "eval", "--json").stdout)
    assert [(d["line_number"], d["outputs"]["results"], d["status"]) for d in details] == [
        (0, "Correct", "Completed"),
        (1, "Incorrect", "Completed"),
    ]
    assert set(details[0]) == {"line_number", "inputs", "outputs", "status", "error"}
    assert json.loads(cli("run", "show-metrics", "-n", "eval").stdout) == {"accuracy": 0.5}
    table = cli("run", "show-details", "-n", "eval").stdout
    assert "outputs.results" in table and "Incorrect" in table
    shown = json.loads(cli("run", "show", "-n", "eval").stdout)
    assert shown["name"] == "eval" and shown["status"] == "Completed"
    names = [r["name"] for r in json.loads(cli("run", "list").stdout)]
    assert names == ["eval", "base"]


def test_run_create_refuses_broken_jsonl_naming_the_line(cli, tmp_path):
    cli("flow", "init", "--flow", "std", "--type", "standard")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    result = cli("run", "create", "--flow", "std", "--data", str(data), check=False)
    assert result.returncode == 1
    assert f"{data}:2: line 2 is not valid JSON" in result.stderr
    assert json.loads(cli("run", "list").stdout) == []


def test_run_create_reports_failed_lines_without_failing_the_run(cli, tmp_path):
    write_flow(
        tmp_path / "picky",
        "inputs:\n  x: {type: int}\noutputs:\n  y: {type: int, reference: '${half.output}'}\n"
        "nodes:\n- name: half\n  type: python\n  source: {type: code, path: half.py}\n  inputs: {x: '${inputs.x}'}\n",
        half="def half(x: int) -> int:\n    assert x % 2 == 0, 'odd input'\n    return x // 2\n",
    )
    data = tmp_path / "nums.csv"
    data.write_text("x\n2\n3\n8\n")
    result = cli("run", "create", "--flow", "picky", "--data", str(data), "--name", "nums")
    assert json.loads(result.stdout)["failed_lines"] == 1
    assert "1 of 3 lines failed" in result.stderr
    details = json.loads(cli("run", "show-details", "-n", "nums", "--json").stdout)
    assert [d["outputs"] for d in details] == [{"y": 1}, {}, {"y": 4}]
    assert "odd input" in details[1]["error"]["message"]


def test_flow_test_forks_warm_runners_from_a_local_fork_server(cli, tmp_path):
    write_flow(
        tmp_path / "whoami",
        "inputs: {}\noutputs:\n  parent: {type: string, reference: '${who.output}'}\n"
        "nodes:\n- name: who\n  type: python\n  source: {type: code, path: who.py}\n  inputs: {}\n",
        who="import os\n\ndef who() -> str:\n"
        "    print('x' * 20000)\n"
        "    with open(f'/proc/{os.getppid()}/cmdline', 'rb') as fh:\n"
        "        return str(os.getppid()) + ' ' + fh.read().replace(b'\\0', b' ').decode()\n",
    )
    sock = tmp_path / "z.sock"
    zygote_env = {"FLOWSTUDIO_NO_ZYGOTE": "0", "FLOWSTUDIO_RUNNER_SOCKET": str(sock)}
    first = json.loads(cli("flow", "test", "--flow", "whoami", extra_env=zygote_env).stdout)
    assert "--zygote" not in first["parent"]
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sock.exists()
    try:
        second = json.loads(cli("flow", "test", "--flow", "whoami", extra_env=zygote_env).stdout)
        assert f"--zygote {sock}" in second["parent"]
        third = json.loads(cli("flow", "test", "--flow", "whoami", extra_env=zygote_env).stdout)
        assert third["parent"] == second["parent"]
        # A batch through a forked runner writes far more than a socket buffer holds.
        data = tmp_path / "many.jsonl"
        data.write_text('{"n": 1}\n' * 300)
        run = cli(
            "run", "create", "--flow", "whoami", "--data", str(data), "--name", "many", extra_env=zygote_env
        )
        assert json.loads(run.stdout)["completed_lines"] == 300
    finally:
        parent = second["parent"] if "second" in locals() else ""
        if "--zygote" in parent:
            os.kill(int(parent.split()[0]), signal.SIGTERM)
        else:
            # The fork server also exits within seconds once its socket is gone.
            sock.unlink(missing_ok=True)
    deadline = time.monotonic() + 10
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sock.exists()


VARIANT_FLOW = """
inputs:
  text: {type: string}
outputs:
  out: {type: string, reference: "${style.output}"}
nodes:
- name: style
  use_variants: true
- name: tail
  type: python
  source: {type: code, path: tail.py}
  inputs: {text: "${style.output}"}
node_variants:
  style:
    default_variant_id: variant_0
    variants:
      variant_0:
        node:
          type: python
          source: {type: code, path: lower.py}
          inputs: {text: "${inputs.text}"}
      variant_1:
        node:
          type: python
          source: {type: code, path: upper.py}
          inputs: {text: "${inputs.text}"}
"""


def test_variants_and_single_node_tests(cli, tmp_path):
    write_flow(
        tmp_path / "styled",
        VARIANT_FLOW,
        lower="def lower(text: str) -> str:\n    return text.lower()\n",
        upper="def upper(text: str) -> str:\n    return text.upper()\n",
        tail="def tail(text: str) -> str:\n    return text[-2:]\n",
    )
    assert json.loads(cli("flow", "test", "--flow", "styled", "--inputs", "text=MiXed").stdout) == {
        "out": "mixed"
    }
    upper = cli(
        "flow", "test", "--flow", "styled", "--inputs", "text=MiXed", "--variant", "${style.variant_1}"
    )
    assert json.loads(upper.stdout) == {"out": "MIXED"}
    node = cli("flow", "test", "--flow", "styled", "--node", "tail", "--inputs", "text=abcdef")
    assert json.loads(node.stdout) == {"output": "ef"}
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "Ab"}\n')
    summary = json.loads(
        cli(
            "run", "create", "--flow", "styled", "--data", str(data), "--variant", "${style.variant_1}"
        ).stdout
    )
    assert summary["name"].startswith("styled_variant_1_")
    assert json.loads(cli("run", "show-details", "-n", summary["name"], "--json").stdout)[0]["outputs"] == {
        "out": "AB"
    }


def test_an_error_raised_outside_the_cli_module_is_a_one_line_message(cli):
    result = cli(
        "flow", "serve", "--flow", str(ROOT / "bench" / "flows" / "dag_llm"), "--workers", "0", check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --workers must be at least 1, not 0"


def test_run_create_warns_of_a_failed_aggregation_without_failing_the_run(cli, tmp_path):
    write_flow(
        tmp_path / "tally",
        "inputs:\n  x: {type: int}\noutputs:\n  y: {type: int, reference: '${same.output}'}\n"
        "nodes:\n- name: same\n  type: python\n  source: {type: code, path: same.py}\n  inputs: {x: '${inputs.x}'}\n"
        "- name: tally\n  type: python\n  source: {type: code, path: tally.py}\n"
        "  inputs: {x: '${same.output}'}\n  aggregation: true\n",
        same="def same(x: int) -> int:\n    return x\n",
        tally="from promptflow.core import log_metric\n\n\n"
        "def tally(x: list) -> None:\n    log_metric('lines', len(x))\n    raise ValueError('no tally today')\n",
    )
    data = tmp_path / "nums.csv"
    data.write_text("x\n1\n2\n")
    result = cli("run", "create", "--flow", "tally", "--data", str(data), "--name", "nums")
    summary = json.loads(result.stdout)
    assert summary["status"] == "Completed" and summary["completed_lines"] == 2
    assert "warning: the aggregation failed" in result.stderr and "no tally today" in result.stderr
    assert json.loads(cli("run", "show-metrics", "-n", "nums").stdout) == {"lines": 2}
