"""The single-test services, selectors and streaming helpers: requests, history, the form, the trace tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.http import Http404

from flowengine import events
from flows_app import streaming
from flows_app.models import FlowTest
from flows_app.selectors import flowtest_form_for, flowtest_list_for
from flows_app.services import (
    FLOWTEST_KEEP,
    FlowTestBusy,
    FlowTestRequestError,
    connection_create,
    files_from_folder,
    flow_create,
    flow_create_from_template,
    flow_share,
    flowtest_finish,
    flowtest_start,
)

pytestmark = pytest.mark.django_db
FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"


@pytest.fixture
def chat_flow(owner):
    """The chat template of the owner and the connection it names."""
    connection_create(
        owner=owner, name="open_ai_connection", type="open_ai", configs={}, secrets={"api_key": "sk-owner"}
    )
    return flow_create_from_template(owner=owner, name="chat", template="chat")


@pytest.fixture
def variants_flow(owner):
    """A DAG with node variants and nodes that read other nodes."""
    return flow_create(owner=owner, name="variants", files=files_from_folder(root=FLOWS / "dag_variants"))


def test_start_records_a_running_test_of_the_head_with_the_users_connections(chat_flow, owner):
    test, plan = flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={"question": "hi"})
    assert test.status == FlowTest.Status.RUNNING and test.version == chat_flow.head
    assert plan.snapshot_sha == chat_flow.head.snapshot_id and (plan.flow_dir / "flow.dag.yaml").is_file()
    assert plan.connections["open_ai_connection"].secrets == {"api_key": "sk-owner"}


def test_a_viewer_tests_with_their_own_connections_never_the_owners(chat_flow, owner, teammate):
    flow_share(flow=chat_flow, by=owner, user=teammate, role="viewer")
    _, plan = flowtest_start(user=teammate, flow_id=chat_flow.pk, inputs={})
    assert plan.connections == {}
    connection_create(
        owner=teammate, name="open_ai_connection", type="open_ai", configs={}, secrets={"api_key": "sk-mate"}
    )
    FlowTest.objects.update(status=FlowTest.Status.FAILED)
    _, plan = flowtest_start(user=teammate, flow_id=chat_flow.pk, inputs={})
    assert plan.connections["open_ai_connection"].secrets == {"api_key": "sk-mate"}


def test_an_outsider_cannot_start_a_test(chat_flow, outsider):
    with pytest.raises(Http404):
        flowtest_start(user=outsider, flow_id=chat_flow.pk, inputs={})
    assert not FlowTest.objects.exists()


def test_a_second_test_of_the_same_flow_by_the_same_user_is_refused_while_one_runs(chat_flow, owner):
    flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={})
    with pytest.raises(FlowTestBusy, match="'chat' is still running"):
        flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={})


def test_unknown_variants_and_nodes_and_non_object_inputs_are_refused_by_name(variants_flow, owner):
    with pytest.raises(FlowTestRequestError, match="Node 'greet' has no variant 'variant_9'"):
        flowtest_start(user=owner, flow_id=variants_flow.pk, inputs={}, variant="${greet.variant_9}")
    with pytest.raises(FlowTestRequestError, match="no node 'nope'"):
        flowtest_start(user=owner, flow_id=variants_flow.pk, inputs={}, node="nope")
    with pytest.raises(FlowTestRequestError, match="JSON object"):
        flowtest_start(user=owner, flow_id=variants_flow.pk, inputs=["a"])
    test, plan = flowtest_start(user=owner, flow_id=variants_flow.pk, inputs={}, variant="${greet.variant_1}")
    assert plan.variant == "${greet.variant_1}" and test.variant == "${greet.variant_1}"


def test_finish_changes_a_running_test_once(chat_flow, owner):
    test, _ = flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={})
    assert flowtest_finish(test_id=test.pk, status="Completed", outputs={"answer": "a"}, duration_ms=5.0)
    assert not flowtest_finish(test_id=test.pk, status="Failed", outputs={"answer": "b"})
    test.refresh_from_db()
    assert test.status == "Completed" and test.outputs == {"answer": "a"} and test.finished_at is not None
    with pytest.raises(ValueError, match="not a final test status"):
        flowtest_finish(test_id=test.pk, status="Running")


@pytest.mark.integration
def test_finish_keeps_what_the_database_cannot_store_as_replacement_characters(chat_flow, owner):
    """A flow's outputs, logs and error may hold a lone surrogate, or NUL that PostgreSQL refuses: the test
    still ends, those characters stored as U+FFFD."""
    from django.db import connection

    test, _ = flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={})
    odd = "a\u0000b\udc80"
    assert flowtest_finish(
        test_id=test.pk,
        status="Failed",
        outputs={"answer": odd},
        error={"code": "UserError", "message": odd, "node": "chat"},
        logs=[{"stream": "stdout", "text": odd}],
        trace=[{"name": "chat", "output": odd}],
    )
    test.refresh_from_db()
    kept = ("a\ufffdb" if connection.vendor == "postgresql" else "a\u0000b") + "\ufffd"
    assert test.status == "Failed"
    assert (test.outputs["answer"], test.error["message"]) == (kept, kept)
    assert (test.logs[0]["text"], test.trace[0]["output"]) == (kept, kept)


def test_only_the_newest_tests_of_a_flow_are_kept(chat_flow, owner):
    for i in range(FLOWTEST_KEEP + 3):
        test, _ = flowtest_start(user=owner, flow_id=chat_flow.pk, inputs={"question": str(i)})
        flowtest_finish(test_id=test.pk, status="Completed")
    kept = list(flowtest_list_for(owner, chat_flow.pk))
    assert len(kept) == FLOWTEST_KEEP == FlowTest.objects.count()
    assert kept[0].inputs == {"question": str(FLOWTEST_KEEP + 2)} and kept[-1].inputs == {"question": "3"}


def test_the_form_of_a_chat_flow_starts_from_the_first_row_of_its_data(chat_flow, owner):
    form = flowtest_form_for(owner, chat_flow.pk)
    assert form["chat"] == {"input": "question", "history": "chat_history", "output": "answer"}
    assert form["start_from"] == "the first row of data.jsonl"
    fields = {f["name"]: f for f in form["fields"]}
    assert fields["question"]["value"] == "What is prompt flow?" and fields["question"]["widget"] == "text"
    assert fields["chat_history"]["widget"] == "json" and fields["chat_history"]["value"] == "[]"
    html = streaming.render_form(form)
    assert "data-test-chat" in html and "What is prompt flow?</textarea>" in html


def test_the_form_offers_variants_and_per_node_inputs(variants_flow, owner):
    form = flowtest_form_for(owner, variants_flow.pk)
    assert form["chat"] is None
    assert {"value": "${greet.variant_1}", "label": "greet: variant_1"} in form["variants"]
    assert form["variants"][0]["label"] == "greet: variant_0 (default)"
    nodes = {n["name"]: n for n in form["nodes"]}
    assert [f["name"] for f in nodes["frame"]["fields"]] == ["greet.output"]
    assert [f["name"] for f in nodes["greet"]["fields"]] == ["name"]
    html = streaming.render_form(form)
    assert 'data-node-fields="frame"' in html and 'data-node-input="greet.output"' in html


def test_typed_inputs_get_their_own_editors(owner):
    flow = flow_create(owner=owner, name="types", files=files_from_folder(root=FLOWS / "dag_input_types"))
    widgets = {f["type"]: f["widget"] for f in flowtest_form_for(owner, flow.pk)["fields"]}
    assert widgets.get("int") == "number" and widgets.get("bool") == "bool"
    assert widgets.get("list") == "json" and widgets.get("object") == "json"


def test_a_flow_that_does_not_load_gets_a_form_naming_the_problem(owner):
    flow = flow_create(owner=owner, name="broken", files={"flow.dag.yaml": b"inputs: [unclosed\n"})
    form = flowtest_form_for(owner, flow.pk)
    assert form["problem"] and "flow.dag.yaml" in form["problem"]
    with pytest.raises(FlowTestRequestError, match="does not load"):
        flowtest_start(user=owner, flow_id=flow.pk, inputs={})


def test_the_trace_tree_nests_flow_nodes_and_llm_calls_with_durations_and_tokens():
    spans = [
        {"span_id": "f", "parent_id": None, "name": "chat", "kind": "flow", "start": 1.0, "end": 2.0},
        {"span_id": "n", "parent_id": "f", "name": "answer", "kind": "node", "start": 1.1, "end": 1.9},
        {
            "span_id": "l",
            "parent_id": "n",
            "name": "answer.chat",
            "kind": "llm",
            "start": 1.2,
            "end": 1.8,
            "inputs": {"question": "hi"},
            "output": "hello",
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        },
    ]
    (flow,) = streaming.trace_tree(spans, {"total_tokens": 10})
    (node,) = flow["children"]
    (llm,) = node["children"]
    assert flow["total_tokens"] == 10 and round(flow["duration_ms"]) == 1000
    assert llm["kind"] == "llm" and llm["prompt_tokens"] == 7 and '"question": "hi"' in llm["inputs"]
    html = streaming.render_trace(spans)
    assert html.count("trace-span ") == 3 and "10 tokens" in html and "600.0 ms" in html


def test_a_record_turns_events_into_messages_and_what_the_history_keeps():
    record = streaming.TestRecord(7)
    error = events.ErrorInfo(code="UserError", type="ValueError", message="bad", node="b", traceback="tb")
    sent = [
        record.add(events.NodeStarted(node="a")),
        record.add(events.NodeCompleted(node="a", duration_ms=3.0)),
        record.add(events.NodeBypassed(node="c")),
        record.add(events.StreamStarted(outputs={"n": 1}, streams=["text"])),
        record.add(events.OutputChunk(output="text", delta="he")),
        record.add(events.OutputChunk(output="text", delta="llo")),
        record.add(events.LogLine(stream="stderr", text="warn", node="a")),
        record.add(events.NodeFailed(node="b", error=error, duration_ms=1.0)),
    ]
    assert [m["type"] for m in sent] == ["node", "node", "node", "stream", "chunk", "chunk", "log", "node"]
    assert all(m["test"] == 7 for m in sent)
    assert sent[-1]["error"]["traceback"] == "tb"
    assert record.add(events.LineCompleted(status="Failed", error=error)) is None
    final = record.final(canceled=False)
    assert final["status"] == "Failed" and final["error"]["node"] == "b"
    assert final["outputs"] == {"n": 1, "text": "hello"}
    assert final["node_runs"]["c"] == {"status": "bypassed"} and final["logs"][0]["stream"] == "stderr"
    assert streaming.TestRecord(8).final(canceled=True)["status"] == "Canceled"


def test_the_authoring_page_includes_the_test_pane_and_its_socket(chat_flow, owner, client):
    client.force_login(owner)
    page = client.get(f"/flows/{chat_flow.pk}/").content.decode()
    assert f'data-ws-path="/ws/flows/{chat_flow.pk}/test/"' in page
    assert "js/test_pane.js" in page and "css/test_pane.css" in page
