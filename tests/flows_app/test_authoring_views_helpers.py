"""The pure helpers behind the authoring pages: the graph JSON, its diff, YAML edits and the three-way merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flowengine import load_flow, validate
from flows_app.dag_edit import DagEditError, dag_add_input, dag_add_node, dag_add_output
from flows_app.diffing import merge3, rows_from_unified, unified_text
from flows_app.flow_graph import flow_graph, graph_diff

TEMPLATES = Path(__file__).resolve().parents[2] / "flowengine" / "templates_init"

DAG = """\
# Comments survive structured edits.
inputs:
  question:
    type: string
outputs:
  answer:
    type: string
    reference: ${answer.output}
nodes:
- name: classify
  type: python
  source:
    type: code
    path: classify.py
  inputs:
    q: ${inputs.question}
- name: answer
  type: llm
  source:
    type: code
    path: answer.jinja2
  inputs:
    question: ${inputs.question}
  connection: conn
  api: chat
  activate:
    when: ${classify.output}
    is: question
- name: score
  type: python
  source:
    type: code
    path: score.py
  inputs:
    answers: ${answer.output}
  aggregation: true
"""


@pytest.fixture
def dag_folder(tmp_path):
    """A DAG flow with an activate condition and an aggregation node."""
    (tmp_path / "flow.dag.yaml").write_text(DAG)
    tool = "from promptflow.core import tool\n\n\n@tool\ndef {name}({arg}: str) -> str:\n    return {arg}\n"
    (tmp_path / "classify.py").write_text(tool.format(name="classify", arg="q"))
    (tmp_path / "score.py").write_text(tool.format(name="score", arg="answers"))
    (tmp_path / "answer.jinja2").write_text("user:\n{{question}}\n")
    return tmp_path


def test_graph_has_reference_edges_activate_edges_and_marks_aggregation(dag_folder):
    graph = flow_graph(load_flow(dag_folder))
    edges = {(e["source"], e["target"], e["kind"]) for e in graph["edges"]}
    assert ("input:question", "node:classify", "data") in edges
    assert ("node:classify", "node:answer", "activate") in edges
    assert ("node:answer", "node:score", "data") in edges
    assert ("node:answer", "output:answer", "data") in edges
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["node:score"]["aggregation"] is True
    assert nodes["node:answer"]["activate"].startswith("when ${classify.output} is question")
    assert nodes["node:answer"]["file"] == "answer.jinja2"


def test_problems_are_attached_to_their_nodes(dag_folder):
    text = DAG.replace("q: ${inputs.question}", "q: ${inputs.nope}")
    (dag_folder / "flow.dag.yaml").write_text(text)
    flow = load_flow(dag_folder)
    graph = flow_graph(flow, validate(flow))
    classify = next(n for n in graph["nodes"] if n["id"] == "node:classify")
    assert any("nope" in message for message in classify["problems"])


@pytest.mark.parametrize(("template", "step"), [("flex", "entry"), ("prompty", "prompty")])
def test_flex_and_prompty_flows_are_drawn_as_one_step(template, step):
    graph = flow_graph(load_flow(TEMPLATES / template))
    assert graph["kind"] == template
    assert [n["id"] for n in graph["nodes"] if n["kind"] == step] == [step]
    assert any(e["target"] == step for e in graph["edges"])
    assert any(e["source"] == step for e in graph["edges"])


def test_graph_diff_marks_added_removed_and_changed_nodes(dag_folder):
    old = flow_graph(load_flow(dag_folder))
    changed = DAG.replace("connection: conn", "connection: other").replace("- name: score", "- name: grade")
    (dag_folder / "flow.dag.yaml").write_text(changed)
    new = flow_graph(load_flow(dag_folder))
    diff = graph_diff(old, new, changed_files=["classify.py"])
    status = {n["id"]: n["diff"] for n in diff["nodes"]}
    assert status["node:grade"] == "added"
    assert status["node:score"] == "removed"
    assert status["node:answer"] == "changed"
    assert status["node:classify"] == "changed"
    assert status["input:question"] == "same"
    assert diff["counts"] == {"added": 1, "removed": 1, "changed": 2}


def test_structured_edits_keep_comments_and_add_what_was_asked():
    text = dag_add_input(DAG, name="lang", type="string", default="en")
    text = dag_add_node(
        text, name="shout", type="python", source_path="shout.py", inputs={"x": "${answer.output}"}
    )
    text = dag_add_output(text, name="loud", reference="${shout.output}")
    assert text.startswith("# Comments survive structured edits.\n")
    data = yaml.safe_load(text)
    assert data["inputs"]["lang"] == {"type": "string", "default": "en"}
    assert data["nodes"][-1]["name"] == "shout"
    assert data["outputs"]["loud"]["reference"] == "${shout.output}"
    assert [n["name"] for n in data["nodes"]] == ["classify", "answer", "score", "shout"]


def test_structured_edits_refuse_duplicates_bad_names_and_llm_without_connection():
    with pytest.raises(DagEditError, match="already exists"):
        dag_add_input(DAG, name="question")
    with pytest.raises(DagEditError, match="letters, digits"):
        dag_add_node(DAG, name="1bad", type="python", source_path="x.py", inputs={})
    with pytest.raises(DagEditError, match="connection"):
        dag_add_node(DAG, name="ask", type="llm", source_path="ask.jinja2", inputs={})
    with pytest.raises(DagEditError, match="cannot be parsed"):
        dag_add_input("inputs: [\n", name="x")


def test_merge_keeps_both_changes_to_different_lines():
    base = "a\nb\nc\nd\ne\n"
    merged = merge3(base, "A\nb\nc\nd\ne\n", "a\nb\nc\nd\nE\n")
    assert merged.conflicts == 0
    assert merged.text == "A\nb\nc\nd\nE\n"


def test_merge_marks_a_region_both_sides_changed_differently():
    merged = merge3("a\nb\n", "mine\nb\n", "theirs\nb\n", theirs_label="v2 (editor)")
    assert merged.conflicts == 1
    assert merged.text == "<<<<<<< yours\nmine\n=======\ntheirs\n>>>>>>> v2 (editor)\nb\n"


def test_unified_text_parses_back_into_numbered_rows():
    rows = rows_from_unified(unified_text("a\nb\nc\n", "a\nB\nc\nd\n"))
    assert [(r.kind, r.text, r.old_no, r.new_no) for r in rows[1:]] == [
        ("ctx", "a", 1, 1),
        ("del", "b", 2, None),
        ("add", "B", None, 2),
        ("ctx", "c", 3, 3),
        ("add", "d", None, 4),
    ]
