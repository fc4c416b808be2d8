"""Batch inputs follow prompt flow's column mapping; a local run executes every line in one runner."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from flowengine.batch import (
    BaseRunLines,
    DataError,
    MappingError,
    load_data,
    parse_assignments,
    resolve_lines,
)
from flowengine.runs import RunRequest, RunStore, run_create


def inputs_of(**defaults):
    return {name: SimpleNamespace(default=default) for name, default in defaults.items()}


def test_broken_jsonl_lines_are_refused_naming_each_line_number(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"q": "ok"}\n{"q": broken}\n\n[1, 2]\n{"q": "fine"}\n')
    with pytest.raises(DataError) as info:
        load_data(data)
    assert len(info.value.problems) == 2
    assert f"{data}:2: line 2 is not valid JSON" in info.value.problems[0]
    assert f"{data}:4: line 4 must be a JSON object" in info.value.problems[1]


def test_csv_values_stay_strings(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text('question,n\nhello,3\n"a, b",4\n')
    assert load_data(data) == [{"question": "hello", "n": "3"}, {"question": "a, b", "n": "4"}]


def test_inputs_without_default_take_the_same_named_column_by_default():
    rows = [{"question": "q0", "extra": 1}, {"question": "q1", "extra": 2}]
    lines = resolve_lines(flow_inputs=inputs_of(question=None), data=rows, mapping=None)
    assert lines == [(0, {"question": "q0"}), (1, {"question": "q1"})]


def test_an_input_with_a_default_is_read_from_the_data_only_when_mapped():
    rows = [{"question": "q0", "style": "loud"}]
    unmapped = resolve_lines(flow_inputs=inputs_of(question=None, style="calm"), data=rows, mapping=None)
    assert unmapped == [(0, {"question": "q0"})]
    mapped = resolve_lines(
        flow_inputs=inputs_of(question=None, style="calm"), data=rows, mapping={"style": "${data.style}"}
    )
    assert mapped == [(0, {"question": "q0", "style": "loud"})]


def test_literal_values_and_renamed_columns_are_mapped():
    rows = [{"text": "hello"}]
    lines = resolve_lines(
        flow_inputs=inputs_of(question=None, model=None),
        data=rows,
        mapping={"question": "${data.text}", "model": "gpt-4o-mini"},
    )
    assert lines == [(0, {"question": "hello", "model": "gpt-4o-mini"})]


def test_a_column_no_line_has_refuses_the_run_naming_the_mapping():
    with pytest.raises(MappingError) as info:
        resolve_lines(flow_inputs=inputs_of(question=None), data=[{"text": "x"}], mapping=None)
    assert "question: ${data.question}: no column 'question' in data (columns: text)" in str(info.value)


def test_a_line_missing_a_column_other_lines_have_leaves_the_input_out():
    rows = [{"question": "q0"}, {"other": 1}]
    lines = resolve_lines(flow_inputs=inputs_of(question=None), data=rows, mapping=None)
    assert lines == [(0, {"question": "q0"}), (1, {})]


def test_a_mapping_of_only_literals_is_refused():
    with pytest.raises(MappingError, match="at least one"):
        resolve_lines(flow_inputs=inputs_of(question=None), data=[{"q": 1}], mapping={"question": "fixed"})


def test_base_run_outputs_join_by_line_number_and_failed_lines_are_skipped():
    base = BaseRunLines(
        name="base",
        outputs={0: {"answer": "a0"}, 2: {"answer": "a2"}},
        inputs={0: {"question": "q0"}, 2: {"question": "q2"}},
    )
    rows = [{"truth": "t0"}, {"truth": "t1"}, {"truth": "t2"}]
    lines = resolve_lines(
        flow_inputs=inputs_of(prediction=None, groundtruth=None, question=None),
        data=rows,
        mapping={
            "prediction": "${run.outputs.answer}",
            "groundtruth": "${data.truth}",
            "question": "${run.inputs.question}",
        },
        base=base,
    )
    assert lines == [
        (0, {"prediction": "a0", "groundtruth": "t0", "question": "q0"}),
        (2, {"prediction": "a2", "groundtruth": "t2", "question": "q2"}),
    ]


def test_assignments_parse_json_values_and_keep_other_text():
    assert parse_assignments(["n=3", "flag=true", "items=[1,2]", "text=hello world", "eq=a=b"]) == {
        "n": 3,
        "flag": True,
        "items": [1, 2],
        "text": "hello world",
        "eq": "a=b",
    }


ANSWER_FLOW = """
inputs:
  question: {type: string}
outputs:
  answer: {type: string, reference: "${answer.output}"}
nodes:
- name: answer
  type: python
  source: {type: code, path: answer.py}
  inputs: {question: "${inputs.question}"}
additional_includes:
- ../shared/helpers.py
"""

ANSWER_PY = """
from helpers import reply


def answer(question: str) -> str:
    if question == "boom":
        raise ValueError("cannot answer boom")
    print("answering", question)
    return reply(question)
"""

EVAL_FLOW = """
inputs:
  prediction: {type: string}
  groundtruth: {type: string}
outputs:
  grade: {type: string, reference: "${grade.output}"}
nodes:
- name: grade
  type: python
  source: {type: code, path: grade.py}
  inputs: {prediction: "${inputs.prediction}", groundtruth: "${inputs.groundtruth}"}
- name: accuracy
  type: python
  source: {type: code, path: accuracy.py}
  inputs: {grades: "${grade.output}"}
  aggregation: true
"""

GRADE_PY = """
def grade(prediction: str, groundtruth: str) -> str:
    return "Correct" if prediction == groundtruth else "Incorrect"
"""

ACCURACY_PY = """
from promptflow.core import log_metric


def accuracy(grades: list) -> float:
    value = grades.count("Correct") / len(grades)
    log_metric("accuracy", value)
    log_metric("lines", len(grades))
    return value
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_a_run_writes_its_folder_and_an_evaluation_run_reads_the_base_runs_outputs(tmp_path):
    write(tmp_path / "shared", {"helpers.py": "def reply(q):\n    return 'A:' + q\n"})
    flow = write(tmp_path / "qa", {"flow.dag.yaml": ANSWER_FLOW, "answer.py": ANSWER_PY})
    (flow / "__pycache__").mkdir()
    (flow / ".promptflow").mkdir()
    evaluation = write(
        tmp_path / "eval", {"flow.dag.yaml": EVAL_FLOW, "grade.py": GRADE_PY, "accuracy.py": ACCURACY_PY}
    )
    data = tmp_path / "data.jsonl"
    rows = [
        {"question": "x", "truth": "A:x"},
        {"question": "boom", "truth": "?"},
        {"question": "y", "truth": "no"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = RunStore(tmp_path / "home")

    base = run_create(RunRequest(flow=str(flow), data=str(data), name="base"), store=store)
    assert base.status == "Completed"
    assert (base.total_lines, base.completed_lines, base.failed_lines) == (3, 2, 1)
    folder = store.path("base")
    assert sorted(p.name for p in (folder / "snapshot").iterdir()) == [
        "answer.py",
        "flow.dag.yaml",
        "helpers.py",
    ]
    assert "additional_includes" not in (folder / "snapshot" / "flow.dag.yaml").read_text()
    outputs = [json.loads(line) for line in (folder / "outputs.jsonl").read_text().splitlines()]
    assert outputs == [
        {"answer": "A:x", "line_number": 0},
        {"line_number": 1},
        {"answer": "A:y", "line_number": 2},
    ]
    inputs = [json.loads(line) for line in (folder / "inputs.jsonl").read_text().splitlines()]
    assert inputs[1] == {"question": "boom", "line_number": 1}
    details = store.details("base")
    assert details[1]["status"] == "Failed"
    assert "cannot answer boom" in details[1]["error"]["message"]
    assert "answering x" in (folder / "logs.txt").read_text()
    saved = json.loads((folder / "run.json").read_text())
    assert saved["status"] == "Completed" and saved["flow"] == str(flow)

    ev = run_create(
        RunRequest(
            flow=str(evaluation),
            data=str(data),
            run="base",
            name="eval",
            column_mapping={"prediction": "${run.outputs.answer}", "groundtruth": "${data.truth}"},
        ),
        store=store,
    )
    assert ev.status == "Completed"
    assert ev.run == "base"
    assert [d["line_number"] for d in store.details("eval")] == [0, 2]
    assert [d["outputs"]["grade"] for d in store.details("eval")] == ["Correct", "Incorrect"]
    assert store.metrics("eval") == {"accuracy": 0.5, "lines": 2}


def test_a_run_name_cannot_be_reused(tmp_path):
    flow = write(
        tmp_path / "flow", {"flow.dag.yaml": EVAL_FLOW, "grade.py": GRADE_PY, "accuracy.py": ACCURACY_PY}
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"prediction": "a", "groundtruth": "a"}\n')
    store = RunStore(tmp_path / "home")
    run_create(RunRequest(flow=str(flow), data=str(data), name="once"), store=store)
    from flowengine.runs import RunError

    with pytest.raises(RunError, match="already exists"):
        run_create(RunRequest(flow=str(flow), data=str(data), name="once"), store=store)


def test_a_failing_aggregation_node_leaves_the_run_completed_with_its_error_and_earlier_metrics(tmp_path):
    failing = ACCURACY_PY + "    raise RuntimeError('no report today')\n"
    failing = failing.replace("    return value\n", "")
    evaluation = write(
        tmp_path / "eval", {"flow.dag.yaml": EVAL_FLOW, "grade.py": GRADE_PY, "accuracy.py": failing}
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prediction": p, "groundtruth": "a"}) + "\n" for p in "aab"))
    store = RunStore(tmp_path / "home")

    record = run_create(RunRequest(flow=str(evaluation), data=str(data), name="eval"), store=store)

    assert record.status == "Completed"
    assert record.error["node"] == "accuracy"
    assert "no report today" in record.error["message"]
    assert store.metrics("eval") == {"accuracy": 2 / 3, "lines": 3}
    assert "aggregation failed" in (store.path("eval") / "logs.txt").read_text()
