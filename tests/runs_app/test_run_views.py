"""Run pages, the run list, datasets and the submit wizard: allowed, outsider, anonymous and htmx paths."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from flows_app.services import files_from_folder, flow_create, flow_share
from runs_app.models import LineResult, Run, RunLog, RunStatus
from runs_app.services import dataset_create, run_create

pytestmark = pytest.mark.django_db

FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"
HTMX = {"HTTP_HX_REQUEST": "true"}
DATA = (
    b'{"text": "hello world", "times": 2}\n{"text": "bye", "times": 1}\n{"text": "third line", "times": 1}\n'
)


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture
def flow(owner):
    """The owner's copy of the golden `dag_basic` flow (inputs `text` and `times`)."""
    return flow_create(owner=owner, name="basic", files=files_from_folder(root=FLOWS / "dag_basic"))


@pytest.fixture
def dataset(owner):
    """Three lines with the columns `text` and `times`."""
    return dataset_create(owner=owner, name="three", filename="three.jsonl", data=DATA)


@pytest.fixture
def run(owner, flow, dataset) -> Run:
    """A queued run of the flow over the dataset (its chunks are never executed in these tests)."""
    return run_create(
        user=owner,
        flow_version=flow.head,
        dataset=dataset,
        column_mapping={"text": "${data.text}", "times": "${data.times}"},
        tags={"team": "qa"},
    )


@pytest.fixture
def finished(run) -> Run:
    """The run as if every line had been executed: two completed lines, one failed, a trace and a log."""
    span = {"span_id": "a", "parent_id": None, "name": "flow", "kind": "flow", "start": 1.0, "end": 1.5}
    child = {"span_id": "b", "parent_id": "a", "name": "upper", "kind": "node", "start": 1.1, "end": 1.3}
    LineResult.objects.create(
        run=run,
        line_number=0,
        status="Completed",
        inputs={"text": "hello world", "times": 2},
        outputs={"shout": "HELLO WORLD | HELLO WORLD"},
        duration_ms=12.0,
        usage={"total_tokens": 7},
        trace=[span, child],
    )
    LineResult.objects.create(
        run=run, line_number=1, status="Completed", inputs={"text": "bye"}, outputs={"shout": "BYE"}
    )
    LineResult.objects.create(
        run=run,
        line_number=2,
        status="Failed",
        inputs={"text": "third line"},
        error={"type": "ValueError", "message": "boom in upper", "node": "upper"},
    )
    RunLog.objects.create(run=run, time=run.created_at, text="hello from the flow", line_number=0)
    Run.objects.filter(pk=run.pk).update(
        status=RunStatus.COMPLETED, done_lines=3, failed_lines=1, metrics={"accuracy": 0.75}
    )
    run.refresh_from_db()
    return run


RUN_PAGES = [
    "runs:detail",
    "runs:status",
    "runs:outputs",
    "runs:metrics",
    "runs:logs",
    "runs:logs_download",
    "runs:trace",
    "runs:snapshot",
    "runs:snapshot_zip",
    "runs:delete",
]
RUN_ACTIONS = ["runs:cancel", "runs:resume", "runs:rerun", "runs:clone", "runs:archive", "runs:delete"]


# --- anonymous and outsider -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUN_PAGES)
def test_anonymous_is_sent_to_login_from_run_pages(run, name):
    response = _client().get(reverse(name, args=[run.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize("name", ["runs:list", "runs:new", "runs:datasets"])
def test_anonymous_is_sent_to_login_from_list_pages(name):
    response = _client().get(reverse(name))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize("name", RUN_PAGES)
def test_outsider_gets_404_for_run_pages(run, outsider, name):
    assert _client(outsider).get(reverse(name, args=[run.pk])).status_code == 404


@pytest.mark.parametrize("name", RUN_ACTIONS)
def test_outsider_gets_404_for_run_actions_and_nothing_changes(finished, outsider, name):
    response = _client(outsider).post(reverse(name, args=[finished.pk]), {"lines": ["0"]})
    assert response.status_code == 404
    assert Run.objects.count() == 1
    finished.refresh_from_db()
    assert finished.status == RunStatus.COMPLETED and not finished.archived


def test_outsider_does_not_see_the_run_in_the_list_nor_the_dataset(run, dataset, outsider):
    client = _client(outsider)
    assert run.name not in client.get(reverse("runs:list")).content.decode()
    assert client.get(reverse("runs:dataset", args=[dataset.pk])).status_code == 404


def test_teammate_sees_a_run_of_a_shared_flow_without_the_owner_actions(run, flow, owner, teammate):
    flow_share(flow=flow, by=owner, user=teammate, role="viewer")
    page = _client(teammate).get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert run.name in page
    assert "Cancel run" not in page
    assert _client(teammate).post(reverse("runs:cancel", args=[run.pk])).status_code == 403


# --- list -------------------------------------------------------------------------------------------------


def test_run_list_shows_name_flow_status_progress_and_author(run, owner):
    page = _client(owner).get(reverse("runs:list")).content.decode()
    assert run.name in page and "basic" in page and "Queued" in page and "0/3" in page and "owner" in page


def test_run_list_filters_live_in_the_url_and_htmx_gets_only_the_rows(run, owner):
    client = _client(owner)
    hit = client.get(reverse("runs:list"), {"status": "Queued", "tag": "team=qa"}, **HTMX)
    assert hit.status_code == 200
    body = hit.content.decode()
    assert run.name in body and "<html" not in body and 'id="run-rows"' in body
    miss = client.get(reverse("runs:list"), {"status": "Completed"}).content.decode()
    assert run.name not in miss and "No run matches these filters" in miss


# --- run pages --------------------------------------------------------------------------------------------


def test_overview_shows_status_progress_author_snapshot_tags_and_mapping(finished, owner):
    page = _client(owner).get(reverse("runs:detail", args=[finished.pk])).content.decode()
    assert 'role="progressbar"' in page and 'aria-valuenow="100"' in page
    assert finished.snapshot_id[:12] in page
    assert "team=qa" in page and "${data.text}" in page
    assert "Resume" in page and "New evaluation" in page and "Delete" in page
    assert f'data-ws-path="/ws/runs/{finished.pk}/"' in page


def test_status_fragment_polls_while_active_and_stops_when_finished(run, owner):
    client = _client(owner)
    active = client.get(reverse("runs:status", args=[run.pk]), **HTMX).content.decode()
    assert "<html" not in active and 'hx-trigger="every 1s [!window.flowStudioRunLive]"' in active
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING, done_lines=2)
    moving = client.get(reverse("runs:status", args=[run.pk]), **HTMX).content.decode()
    assert 'aria-valuenow="67"' in moving and "Cancel run" in moving
    Run.objects.filter(pk=run.pk).update(status=RunStatus.COMPLETED, done_lines=3)
    done = client.get(reverse("runs:status", args=[run.pk]), **HTMX).content.decode()
    assert "hx-trigger" not in done and "Completed" in done


def test_outputs_lists_lines_with_errors_and_search_returns_the_table_fragment(finished, owner):
    client = _client(owner)
    page = client.get(reverse("runs:outputs", args=[finished.pk])).content.decode()
    assert "HELLO WORLD | HELLO WORLD" in page and "boom in upper" in page and "Rerun selected lines" in page
    fragment = client.get(
        reverse("runs:outputs", args=[finished.pk]), {"q": "bye"}, HTTP_HX_TARGET="lines", **HTMX
    ).content.decode()
    assert "<html" not in fragment and "BYE" in fragment and "HELLO WORLD" not in fragment


def test_trace_shows_the_span_tree_and_a_fragment_for_the_outputs_row(finished, owner):
    client = _client(owner)
    page = client.get(reverse("runs:trace", args=[finished.pk]), {"line": 0}).content.decode()
    assert 'role="tree"' in page and "upper" in page and "200.0 ms" in page
    fragment = client.get(
        reverse("runs:trace", args=[finished.pk]), {"line": 0}, HTTP_HX_TARGET="line-trace-0", **HTMX
    ).content.decode()
    assert "<html" not in fragment and "upper" in fragment
    assert (
        "has no result" in client.get(reverse("runs:trace", args=[finished.pk]), {"line": 9}).content.decode()
    )


def test_metrics_and_logs_tabs_and_the_log_download(finished, owner):
    client = _client(owner)
    assert "accuracy" in client.get(reverse("runs:metrics", args=[finished.pk])).content.decode()
    assert "hello from the flow" in client.get(reverse("runs:logs", args=[finished.pk])).content.decode()
    download = client.get(reverse("runs:logs_download", args=[finished.pk]))
    assert "hello from the flow" in b"".join(download.streaming_content).decode()
    assert download["Content-Disposition"].startswith("attachment")


def test_log_tail_fragment_returns_only_newer_lines(finished, owner):
    last = RunLog.objects.filter(run=finished).order_by("-pk").first()
    RunLog.objects.create(run=finished, time=finished.created_at, text="a later line")
    fragment = _client(owner).get(reverse("runs:logs", args=[finished.pk]), {"after": last.pk}, **HTMX)
    body = fragment.content.decode()
    assert "a later line" in body and "hello from the flow" not in body and "<html" not in body


def test_snapshot_tab_lists_files_shows_one_and_downloads_the_zip(finished, owner):
    client = _client(owner)
    page = client.get(reverse("runs:snapshot", args=[finished.pk])).content.decode()
    assert "flow.dag.yaml" in page and "upper.py" in page
    file = client.get(
        reverse("runs:snapshot", args=[finished.pk]), {"path": "upper.py"}, HTTP_HX_TARGET="file-view", **HTMX
    ).content.decode()
    assert "<html" not in file and "def " in file
    archive = client.get(reverse("runs:snapshot_zip", args=[finished.pk]))
    assert "flow.dag.yaml" in zipfile.ZipFile(io.BytesIO(archive.content)).namelist()


# --- actions ----------------------------------------------------------------------------------------------


def test_owner_cancels_a_queued_run(run, owner):
    response = _client(owner).post(reverse("runs:cancel", args=[run.pk]))
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status in {RunStatus.CANCELING, RunStatus.CANCELED}


def test_htmx_action_redirects_the_whole_page(run, owner):
    response = _client(owner).post(reverse("runs:archive", args=[run.pk]), {"archived": "1"}, **HTMX)
    assert response.status_code == 200 and response["HX-Redirect"] == reverse("runs:detail", args=[run.pk])
    run.refresh_from_db()
    assert run.archived


def test_archive_then_restore(finished, owner):
    client = _client(owner)
    client.post(reverse("runs:archive", args=[finished.pk]), {"archived": "1"})
    assert Run.objects.get(pk=finished.pk).archived
    assert finished.name not in client.get(reverse("runs:list"), **HTMX).content.decode()
    assert finished.name in client.get(reverse("runs:list"), {"archived": "on"}, **HTMX).content.decode()
    client.post(reverse("runs:archive", args=[finished.pk]), {"archived": "0"})
    assert not Run.objects.get(pk=finished.pk).archived


def test_resume_and_rerun_make_linked_runs(finished, owner):
    client = _client(owner)
    resumed = client.post(reverse("runs:resume", args=[finished.pk]))
    new = Run.objects.exclude(pk=finished.pk).get()
    assert resumed["Location"] == reverse("runs:detail", args=[new.pk]) and new.resumed_from_id == finished.pk
    rerun = client.post(reverse("runs:rerun", args=[finished.pk]), {"lines": ["0"]})
    assert rerun.status_code == 302 and Run.objects.filter(resumed_from=finished).count() == 2


def test_rerun_without_lines_is_refused_with_a_message(finished, owner):
    response = _client(owner).post(reverse("runs:rerun", args=[finished.pk]), follow=True)
    assert "Select at least one line" in response.content.decode()
    assert Run.objects.count() == 1


def test_clone_makes_a_new_run_with_the_same_settings(finished, owner):
    _client(owner).post(reverse("runs:clone", args=[finished.pk]))
    clone = Run.objects.exclude(pk=finished.pk).get()
    assert clone.snapshot_id == finished.snapshot_id and clone.column_mapping == finished.column_mapping


def test_delete_asks_first_then_deletes(finished, owner):
    client = _client(owner)
    assert "Delete “" in client.get(reverse("runs:delete", args=[finished.pk])).content.decode()
    response = client.post(reverse("runs:delete", args=[finished.pk]))
    assert response["Location"] == reverse("runs:list") and not Run.objects.exists()


def test_deleting_an_active_run_is_refused_with_the_reason(run, owner):
    response = _client(owner).post(reverse("runs:delete", args=[run.pk]), follow=True)
    assert "cancel it before deleting" in response.content.decode()
    assert Run.objects.filter(pk=run.pk).exists()


# --- datasets ---------------------------------------------------------------------------------------------


def test_dataset_upload_then_preview_of_rows_and_columns(owner):
    client = _client(owner)
    upload = io.BytesIO(DATA)
    upload.name = "questions.jsonl"
    response = client.post(reverse("runs:datasets"), {"file": upload, "name": ""})
    assert response.status_code == 302
    page = client.get(response["Location"]).content.decode()
    assert "questions" in page and "hello world" in page and "times" in page and ">3<" in page


def test_broken_dataset_lines_are_named_and_nothing_is_stored(owner):
    from runs_app.models import Dataset

    upload = io.BytesIO(b'{"text": "fine"}\n{"text": broken\n')
    upload.name = "bad.jsonl"
    response = _client(owner).post(reverse("runs:datasets"), {"file": upload}, **HTMX)
    body = response.content.decode()
    assert response.status_code == 422 and "<html" not in body
    assert "Nothing was stored" in body and ":2" in body
    assert not Dataset.objects.exists()


# --- the submit wizard ------------------------------------------------------------------------------------


def test_wizard_suggests_the_mapping_from_column_names(flow, dataset, owner):
    response = _client(owner).get(
        reverse("runs:new"), {"flow": flow.pk, "dataset": dataset.pk, "part": "flow-steps"}, **HTMX
    )
    body = response.content.decode()
    assert "<html" not in body
    assert 'name="map__text"' in body and 'value="${data.text}"' in body and 'value="${data.times}"' in body


def test_wizard_page_renders_every_step(flow, dataset, owner):
    page = _client(owner).get(reverse("runs:new"), {"flow": flow.pk}).content.decode()
    for step in ("Flow", "Data &amp; input mapping", "Settings", "Evaluation", "Review + submit", "run.yml"):
        assert step in page


def test_wizard_adds_an_evaluation_step_with_its_own_mapping(flow, dataset, owner):
    client = _client(owner)
    added = client.get(reverse("runs:new"), {"part": "evaluation", "add": "1", "flow": flow.pk}, **HTMX)
    assert 'id="evaluation-0"' in added.content.decode() and 'hx-swap-oob="true"' in added.content.decode()
    picked = client.get(
        reverse("runs:new"),
        {"part": "evaluation", "index": "0", "evaluations": "0", "flow": flow.pk, "ev0-flow": flow.pk},
        **HTMX,
    ).content.decode()
    assert 'name="ev0-map__text"' in picked and "${run.outputs" not in picked.split("ev0-map__text")[1][:80]


def test_wizard_refuses_a_mapping_that_misses_an_input_without_default(owner, dataset):
    files = {
        "flow.dag.yaml": b"inputs:\n  q:\n    type: string\noutputs:\n  a:\n    type: string\n    reference: ${echo.output}\n"
        b"nodes:\n- name: echo\n  type: python\n  source:\n    type: code\n    path: echo.py\n  inputs:\n    q: ${inputs.q}\n",
        "echo.py": b"from promptflow.core import tool\n\n@tool\ndef echo(q: str) -> str:\n    return q\n",
    }
    flow = flow_create(owner=owner, name="echo", files=files)
    response = _client(owner).post(
        reverse("runs:new"), {"flow": flow.pk, "dataset": dataset.pk, "map__q": ""}
    )
    assert response.status_code == 422
    assert "has no default" in response.content.decode()
    assert not Run.objects.exists()


def test_wizard_submits_a_run_and_goes_to_its_page(flow, dataset, owner):
    response = _client(owner).post(
        reverse("runs:new"),
        {
            "flow": flow.pk,
            "dataset": dataset.pk,
            "map__text": "${data.text}",
            "map__times": "${data.times}",
            "name": "wizard_run",
            "tags": "team=qa, nightly",
            "concurrency": "4",
            "line_timeout": "30",
        },
    )
    run = Run.objects.get(name="wizard_run")
    assert response.status_code == 302 and response["Location"] == reverse("runs:detail", args=[run.pk])
    assert run.column_mapping == {"text": "${data.text}", "times": "${data.times}"}
    assert run.tags == {"team": "qa", "nightly": ""} and run.concurrency == 4 and run.line_timeout == 30


def test_outsider_cannot_submit_with_the_owners_flow(flow, dataset, outsider):
    response = _client(outsider).post(
        reverse("runs:new"), {"flow": flow.pk, "dataset": dataset.pk, "map__text": "${data.text}"}
    )
    assert response.status_code == 422 and not Run.objects.exists()


EVAL_FILES = {
    "flow.dag.yaml": b"inputs:\n  shout:\n    type: string\n  text:\n    type: string\noutputs:\n  same:\n    type: bool\n"
    b"    reference: ${check.output}\nnodes:\n- name: check\n  type: python\n  source:\n    type: code\n    path: check.py\n"
    b"  inputs:\n    shout: ${inputs.shout}\n    text: ${inputs.text}\n",
    "check.py": b"from promptflow.core import tool\n\n@tool\ndef check(shout: str, text: str) -> bool:\n    return shout.startswith(text.upper())\n",
}


def test_new_evaluation_maps_base_outputs_and_data_columns(finished, owner):
    evaluator = flow_create(owner=owner, name="checker", files=EVAL_FILES)
    page = (
        _client(owner).get(reverse("runs:new"), {"base": finished.pk, "flow": evaluator.pk}).content.decode()
    )
    assert f"Evaluate “{finished.name}”" in page
    assert 'value="${run.outputs.shout}"' in page and 'value="${data.text}"' in page
    assert "${run.inputs.text}" in page  # offered as a completion
    assert 'id="step-evaluate"' not in page


def test_clone_with_changes_fills_the_wizard_from_the_run(finished, owner):
    page = _client(owner).get(reverse("runs:new"), {"clone": finished.pk}).content.decode()
    assert 'name="map__text"' in page and "team=qa" in page and 'value="32"' in page


def test_outsider_cannot_open_the_wizard_on_someone_elses_run(finished, outsider):
    assert _client(outsider).get(reverse("runs:new"), {"base": finished.pk}).status_code == 404
    assert _client(outsider).get(reverse("runs:new"), {"clone": finished.pk}).status_code == 404


def test_trace_names_the_flow_span_after_the_flow(finished, owner):
    LineResult.objects.filter(run=finished, line_number=0).update(
        trace=[
            {
                "span_id": "a",
                "parent_id": None,
                "name": finished.snapshot_id,
                "kind": "flow",
                "start": 1,
                "end": 2,
            }
        ]
    )
    page = _client(owner).get(reverse("runs:trace", args=[finished.pk]), {"line": 0}).content.decode()
    assert '<span class="span-kind">flow</span> basic' in page


def _upload(name: str, data: bytes) -> io.BytesIO:
    upload = io.BytesIO(data)
    upload.name = name
    return upload


def test_run_yml_with_its_data_file_submits_a_run(flow, owner):
    run_yml = b"flow: basic\ndata: lines.jsonl\ncolumn_mapping:\n  text: ${data.text}\nname: from_yaml\ntags:\n  source: yml\n"
    response = _client(owner).post(
        reverse("runs:new_yaml"),
        {"run_yml": _upload("run.yml", run_yml), "data": _upload("lines.jsonl", DATA)},
    )
    run = Run.objects.get(name="from_yaml")
    assert response["Location"] == reverse("runs:detail", args=[run.pk])
    assert run.total_lines == 3 and run.tags == {"source": "yml"}


def test_broken_run_yml_is_refused_with_its_line_as_a_fragment(owner):
    response = _client(owner).post(
        reverse("runs:new_yaml"), {"run_yml": _upload("run.yml", b"flow: basic\ndata: [unclosed\n")}, **HTMX
    )
    body = response.content.decode()
    assert response.status_code == 422 and "<html" not in body and "run.yml:" in body
    assert not Run.objects.exists()


def test_wizard_offers_one_checkbox_per_variant(owner, dataset):
    variants = flow_create(owner=owner, name="variants", files=files_from_folder(root=FLOWS / "dag_variants"))
    body = _client(owner).get(reverse("runs:new"), {"flow": variants.pk}).content.decode()
    assert 'value="${greet.variant_1}"' in body and 'type="checkbox" name="variants"' in body


def test_run_list_rows_refresh_only_while_a_run_is_active(run, owner):
    client = _client(owner)
    assert 'hx-trigger="every 2s"' in client.get(reverse("runs:list"), **HTMX).content.decode()
    Run.objects.filter(pk=run.pk).update(status=RunStatus.COMPLETED)
    assert 'hx-trigger="every 2s"' not in client.get(reverse("runs:list"), **HTMX).content.decode()
