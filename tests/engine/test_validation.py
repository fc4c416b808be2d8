"""Validation reports every problem at once, each with file, line, node and field."""

from __future__ import annotations

from flowengine import load_flow, validate
from flowengine.model import Problem

from .conftest import GOLDEN

TOOL = "def run(text: str, times: int = 1) -> str:\n    return text * times\n"


def test_a_valid_flow_has_no_problems(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                inputs:
                  text: {type: string}
                outputs:
                  out: {type: string, reference: "${a.output}"}
                nodes:
                - name: a
                  type: python
                  source: {type: code, path: tool.py}
                  inputs: {text: "${inputs.text}"}
            """,
            "tool.py": TOOL,
        }
    )
    assert validate(folder) == []


def test_every_problem_is_reported_at_once_with_locations(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                inputs:
                  text: {type: text}
                outputs:
                  out: {type: string, reference: "${ghost.output}"}
                nodes:
                - name: a
                  type: python
                  source: {type: code, path: tool.py}
                  inputs:
                    text: ${inputs.txt}
                    colour: red
                - name: b
                  type: llm
                  source: {type: code, path: missing.jinja2}
                  inputs: {x: "${a.output}"}
            """,
            "tool.py": TOOL,
        }
    )
    problems = validate(folder)
    rendered = [str(p) for p in problems]
    assert "flow.dag.yaml:2:10: field 'inputs.text': input 'text' has unknown type 'text'" in rendered[0]
    assert any("field 'outputs.out'" in r and "unknown node 'ghost'" in r for r in rendered)
    assert any(p.node == "a" and p.field == "inputs.text" and "'txt'" in p.message for p in problems)
    assert any(
        p.node == "a" and p.field == "inputs.colour" and "no parameter 'colour'" in p.message
        for p in problems
    )
    assert any(p.node == "b" and p.field == "source.path" and "missing.jinja2" in p.message for p in problems)
    assert any(p.node == "b" and p.field == "connection" for p in problems)
    assert any(p.node == "b" and p.field == "api" for p in problems)
    unknown_input = next(p for p in problems if p.field == "inputs.text" and p.node == "a")
    assert unknown_input.line == 10


def test_a_cycle_is_reported_with_node_names_in_flow_order():
    problems = validate(GOLDEN / "invalid_cycle")
    cycle = [p for p in problems if "circular dependency" in p.message]
    assert len(cycle) == 1
    for name in ("a", "b", "c"):
        assert f"{name} ->" in cycle[0].message or f"-> {name}" in cycle[0].message
    assert cycle[0].file == "flow.dag.yaml" and cycle[0].line is not None


def test_self_reference_and_duplicate_names_are_problems(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                outputs: {}
                nodes:
                - name: a
                  type: python
                  source: {type: code, path: tool.py}
                  inputs: {text: "${a.output}"}
                - name: a
                  type: python
                  source: {type: code, path: tool.py}
                  inputs: {text: x}
            """,
            "tool.py": TOOL,
        }
    )
    messages = [p.message for p in validate(folder)]
    assert "a node cannot reference its own output" in messages
    assert "duplicate node name 'a'" in messages


def test_python_syntax_errors_point_into_the_source_file(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                nodes:
                - name: a
                  type: python
                  source: {type: code, path: tool.py}
            """,
            "tool.py": "def run(:\n    pass\n",
        }
    )
    (problem,) = validate(folder)
    assert problem.file == "tool.py" and problem.line == 1 and problem.node == "a"


def test_template_syntax_errors_point_into_the_template(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                nodes:
                - name: p
                  type: prompt
                  source: {type: code, path: p.jinja2}
            """,
            "p.jinja2": "hello\n{% if x %}\nno end\n",
        }
    )
    (problem,) = validate(folder)
    assert problem.file == "p.jinja2" and problem.node == "p" and "template syntax error" in problem.message


def test_source_paths_may_not_leave_the_flow_folder(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                nodes:
                - name: a
                  type: python
                  source: {type: code, path: ../../etc/passwd}
            """
        }
    )
    (problem,) = validate(folder)
    assert "outside the flow folder" in problem.message and problem.field == "source.path"


def test_aggregation_nodes_may_only_be_read_by_aggregation_nodes(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                nodes:
                - name: total
                  type: python
                  source: {type: code, path: tool.py}
                  inputs: {text: x}
                  aggregation: true
                - name: after
                  type: python
                  source: {type: code, path: tool.py}
                  inputs: {text: "${total.output}"}
            """,
            "tool.py": TOOL,
        }
    )
    (problem,) = validate(folder)
    assert problem.node == "after" and "aggregation node" in problem.message


def test_variant_problems_name_the_node(write_flow):
    folder = write_flow(
        {
            "flow.dag.yaml": """
                nodes:
                - name: a
                  use_variants: true
                - name: b
                  use_variants: true
                node_variants:
                  b:
                    default_variant_id: v9
                    variants:
                      v0:
                        node: {type: python, source: {type: code, path: tool.py}, inputs: {text: x}}
            """,
            "tool.py": TOOL,
        }
    )
    problems = validate(folder)
    assert any(p.node == "a" and p.field == "use_variants" for p in problems)
    assert any(p.node == "b" and p.field == "default_variant_id" and "v9" in p.message for p in problems)


def test_uninstalled_package_tool_is_named():
    (problem,) = validate(GOLDEN / "invalid_package_tool")
    assert problem.field == "source.tool" and "corpus_missing_package.tools.lookup" in problem.message


def test_flex_entry_is_checked_without_running_the_code(write_flow):
    folder = write_flow(
        {
            "flow.flex.yaml": "entry: app:missing\n",
            "app.py": "raise SystemExit('validation must not import me')\ndef present():\n    pass\n",
        }
    )
    (problem,) = validate(folder)
    assert problem.field == "entry" and "'missing'" in problem.message


def test_flex_init_names_must_match_the_class(write_flow):
    folder = write_flow(
        {
            "flow.flex.yaml": "entry: app:Grader\ninit:\n  treshold: {type: double}\n",
            "app.py": "class Grader:\n    def __init__(self, threshold):\n        pass\n    def __call__(self):\n        pass\n",
        }
    )
    (problem,) = validate(folder)
    assert problem.field == "init.treshold" and problem.line == 3


def test_golden_invalid_flows_match_their_expectations():
    import json

    for folder in sorted(GOLDEN.glob("invalid_*")):
        expect = json.loads((folder / "cases.json").read_text())["expect"]
        problems = validate(folder)
        assert problems, folder.name
        matching = [
            p
            for p in problems
            if p.file == expect["file"]
            and (expect.get("node") is None or p.node == expect["node"])
            and (expect.get("field") is None or p.field == expect["field"])
            and (not expect.get("line") or p.line is not None)
            and all(word in str(p) for word in expect.get("mentions", []))
        ]
        assert matching, (folder.name, [str(p) for p in problems])


def test_problem_text_and_dict_round_trip():
    problem = Problem(message="bad", file="flow.dag.yaml", line=3, column=5, node="n", field="inputs.q")
    assert str(problem) == "flow.dag.yaml:3:5: node 'n', field 'inputs.q': bad"
    assert Problem.from_dict(problem.to_dict()) == problem


def test_validate_accepts_a_loaded_flow_or_a_path():
    flow = load_flow(GOLDEN / "dag_basic")
    assert validate(flow) == validate(GOLDEN / "dag_basic") == []
