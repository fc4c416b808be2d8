"""Loading the three flow formats, safely, with line numbers."""

from __future__ import annotations

import pytest

from flowengine import FlowValidationError, load_flow
from flowengine.model import parse_reference, parse_variant, resolve_property

from .conftest import GOLDEN

DAG = """
inputs:
  question: {type: string, default: hi}
  history: {type: list, is_chat_history: true, default: []}
outputs:
  answer: {type: string, reference: "${shout.output}", is_chat_output: true}
nodes:
- name: shout
  type: python
  source: {type: code, path: shout.py}
  inputs:
    text: ${inputs.question}
  activate: {when: "${inputs.question}", is: hi}
"""


def test_dag_flow_loads_inputs_outputs_nodes_and_locations(write_flow):
    folder = write_flow({"flow.dag.yaml": DAG, "shout.py": "def shout(text):\n    return text.upper()\n"})
    flow = load_flow(folder)
    assert flow.kind == "dag"
    assert flow.file == "flow.dag.yaml"
    assert list(flow.inputs) == ["question", "history"]
    assert flow.inputs["question"].default == "hi"
    assert flow.chat_history_name == "history"
    assert flow.chat_output_name == "answer"
    node = flow.nodes[0]
    assert node.source.path == "shout.py"
    assert node.inputs["text"] == "${inputs.question}"
    assert node.activate is not None and node.activate.is_value == "hi"
    assert flow.locate("nodes", "shout", "inputs", "text") == (11, 5)
    assert node.line == 7


def test_loading_a_file_path_uses_its_folder(write_flow):
    folder = write_flow({"flow.dag.yaml": DAG, "shout.py": "def shout(text):\n    return text\n"})
    flow = load_flow(folder / "flow.dag.yaml")
    assert flow.path == folder.resolve()


def test_flex_flow_loads_entry_init_and_sample_file(write_flow):
    folder = write_flow(
        {
            "flow.flex.yaml": """
                entry: app:Grader
                init:
                  threshold: {type: double, default: 0.5}
                inputs:
                  answer: {type: string}
                sample: ${file:sample.json}
            """,
            "app.py": "class Grader:\n    def __call__(self, answer):\n        return answer\n",
            "sample.json": '{"inputs": {"answer": "x"}}',
        }
    )
    flow = load_flow(folder)
    assert flow.kind == "flex"
    assert flow.entry == "app:Grader"
    assert flow.init["threshold"].default == 0.5
    assert flow.sample == {"inputs": {"answer": "x"}}


def test_invalid_yaml_is_reported_with_line_and_column(write_flow):
    folder = write_flow({"flow.dag.yaml": "inputs:\n  a: {type: string\nnodes: []\n"})
    with pytest.raises(FlowValidationError) as caught:
        load_flow(folder)
    problem = caught.value.problems[0]
    assert problem.file == "flow.dag.yaml"
    assert problem.line is not None and problem.line >= 2
    assert "invalid YAML" in problem.message


def test_python_tags_are_refused_not_constructed(write_flow):
    folder = write_flow({"flow.dag.yaml": "inputs: !!python/object/apply:os.system ['echo pwned']\n"})
    with pytest.raises(FlowValidationError) as caught:
        load_flow(folder)
    assert caught.value.problems[0].line == 1


def test_duplicate_keys_are_refused_with_the_line_of_the_second(write_flow):
    folder = write_flow({"flow.dag.yaml": "inputs: {}\noutputs: {}\ninputs: {}\n"})
    with pytest.raises(FlowValidationError) as caught:
        load_flow(folder)
    assert "duplicate key 'inputs'" in str(caught.value)
    assert caught.value.problems[0].line == 3


def test_alias_bombs_are_refused(write_flow):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    folder = write_flow({"flow.dag.yaml": "\n".join(lines) + "\n"})
    with pytest.raises(FlowValidationError) as caught:
        load_flow(folder)
    assert "aliases" in str(caught.value)


def test_deep_nesting_gives_a_clean_error(write_flow):
    folder = write_flow({"flow.dag.yaml": "a: " + "[" * 1000 + "]" * 1000 + "\n"})
    with pytest.raises(FlowValidationError) as caught:
        load_flow(folder)
    assert "nested deeper" in str(caught.value)


def test_folder_without_a_flow_file_names_what_it_looked_for(tmp_path):
    with pytest.raises(FlowValidationError) as caught:
        load_flow(tmp_path)
    assert "flow.dag.yaml" in str(caught.value)


def test_structural_problems_are_kept_for_validate_instead_of_raising(write_flow):
    folder = write_flow({"flow.dag.yaml": "inputs: [1, 2]\nnodes: {}\n"})
    flow = load_flow(folder)
    messages = [p.message for p in flow.load_problems]
    assert "'inputs' must be a mapping" in messages
    assert "'nodes' must be a list" in messages


def test_variants_replace_the_node_body_and_unknown_variants_are_named():
    flow = load_flow(GOLDEN / "dag_variants")
    default = flow.with_variant(None)
    chosen = flow.with_variant("${greet.variant_1}")
    assert default.node("greet") != chosen.node("greet")
    assert not chosen.node("greet").use_variants
    with pytest.raises(FlowValidationError, match="variant_9"):
        flow.with_variant("${greet.variant_9}")


def test_references_parse_like_prompt_flow():
    assert parse_reference("${inputs.q}").name == "q"
    assert parse_reference("${flow.q}").kind == "input"
    ref = parse_reference("${grade.output.items[0]}")
    assert (ref.kind, ref.name, ref.section, ref.property) == ("node", "grade", "output", "items[0]")
    assert parse_reference("plain ${inputs.q} text") is None
    assert parse_reference(3) is None
    assert ref.serialize() == "${grade.output.items[0]}"


def test_property_paths_walk_dicts_lists_and_attributes():
    value = {"a": [{"b": "x"}], "c d": 1}
    assert resolve_property(value, "a[0].b") == "x"
    assert resolve_property(value, "['c d']") == 1


def test_variant_text_must_name_node_and_variant():
    assert parse_variant("${node.variant_1}") == ("node", "variant_1")
    with pytest.raises(ValueError, match="node_name.variant_id"):
        parse_variant("variant_1")
