"""The runs REST API: datasets, run submission (JSON and run.yml), reads, actions, and who may see what."""

from __future__ import annotations

import io
import zipfile

import pytest

from runs_app import services
from runs_app.models import Dataset, LineResult, Run, RunChunk, RunLog, RunStatus
from tests.runs_app.conftest import jsonl, square_files

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


def _auth(user) -> dict[str, str]:
    from accounts_app.services import token_create

    return {"HTTP_AUTHORIZATION": f"Bearer {token_create(user=user, name='cli').plaintext}"}


@pytest.fixture
def flow(owner):
    from flows_app.services import flow_create

    return flow_create(owner=owner, name="square", files=square_files() | {"data.jsonl": jsonl([{"x": 1}])})


@pytest.fixture
def dataset(owner):
    return services.dataset_create(
        owner=owner, name="numbers", filename="numbers.jsonl", data=jsonl([{"x": i} for i in range(10)])
    )


@pytest.fixture
def run(owner, flow, dataset):
    run = services.run_create(user=owner, flow_version=flow.head, dataset=dataset, tags={"team": "qa"})
    LineResult.objects.bulk_create(
        LineResult(run=run, line_number=i, status="Completed", inputs={"x": i}, outputs={"y": i * i})
        for i in range(10)
    )
    return run


def test_dataset_upload_reports_row_count_columns_and_preview(client, owner):
    upload = io.BytesIO(b"question,answer\nwho,me\nwhat,that\n")
    upload.name = "qa.csv"

    response = client.post("/api/v1/datasets", {"file": upload, "name": "qa"}, **_auth(owner))

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["row_count"], body["columns"]) == ("csv", 2, ["question", "answer"])
    detail = client.get(f"/api/v1/datasets/{body['id']}", **_auth(owner)).json()
    assert detail["preview"] == [{"question": "who", "answer": "me"}, {"question": "what", "answer": "that"}]


def test_dataset_with_a_broken_line_is_refused_naming_the_line_and_nothing_is_stored(client, owner):
    from flows_app.models import Blob

    blobs = Blob.objects.count()
    upload = io.BytesIO(b'{"x": 1}\n{"x": 2}\n{"x": 3,\n{"x": 4}\n')
    upload.name = "numbers.jsonl"

    response = client.post("/api/v1/datasets", {"file": upload}, **_auth(owner))

    assert response.status_code == 422
    problems = response.json()["errors"]["data"]
    assert len(problems) == 1 and problems[0].startswith("numbers.jsonl:3: line 3 is not valid JSON")
    assert Dataset.objects.count() == 0 and Blob.objects.count() == blobs


def test_create_run_by_flow_name_makes_chunks_and_a_snapshot_reference(client, owner, flow, dataset):
    response = client.post(
        "/api/v1/runs",
        {"flow": "square@1", "dataset": dataset.pk, "column_mapping": {"x": "${data.x}"}, "tags": {"a": "b"}},
        content_type="application/json",
        **_auth(owner),
    )

    assert response.status_code == 201, response.content
    body = response.json()
    run = Run.objects.get(pk=body["id"])
    assert body["status"] == RunStatus.QUEUED and body["total_lines"] == 10
    assert run.snapshot_id == flow.head.snapshot_id and body["flow_version"] == 1
    assert body["name"].startswith("square_variant_0_")
    chunks = list(RunChunk.objects.filter(run=run).values_list("start", "stop"))
    assert chunks[0][0] == 0 and chunks[-1][1] == 10


def test_a_mapping_to_a_missing_column_is_refused_naming_the_column(client, owner, flow, dataset):
    response = client.post(
        "/api/v1/runs",
        {"flow": "square", "dataset": dataset.pk, "column_mapping": {"x": "${data.nope}"}},
        content_type="application/json",
        **_auth(owner),
    )

    assert response.status_code == 422
    body = response.json()
    assert "no column 'nope'" in body["errors"]["column_mapping"][0]
    assert Run.objects.count() == 0


def test_run_yml_with_an_uploaded_folder_creates_a_run(client, owner):
    folder = io.BytesIO()
    with zipfile.ZipFile(folder, "w") as archive:
        for path, data in square_files().items():
            archive.writestr(f"flow/{path}", data)
        archive.writestr("data.jsonl", jsonl([{"n": i} for i in range(5)]))
    folder.seek(0)
    folder.name = "folder.zip"
    run_yml = io.BytesIO(
        b"$schema: https://azuremlschemas.azureedge.net/promptflow/latest/Run.schema.json\n"
        b"flow: ./flow\ndata: ./data.jsonl\ncolumn_mapping:\n  x: ${data.n}\n"
        b"display_name: from yaml\ntags: {k: v}\nenvironment_variables: {PF_WORKER_COUNT: '3'}\n"
    )
    run_yml.name = "run.yml"

    response = client.post("/api/v1/runs/yaml", {"run_yml": run_yml, "folder": folder}, **_auth(owner))

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["display_name"] == "from yaml" and body["tags"] == {"k": "v"}
    assert body["total_lines"] == 5 and body["concurrency"] == 3 and body["flow"] is None


def test_data_file_inside_the_flow_can_be_the_dataset(client, owner, flow):
    response = client.post(
        "/api/v1/runs",
        {"flow": "square", "data": "data.jsonl"},
        content_type="application/json",
        **_auth(owner),
    )

    assert response.status_code == 201, response.content
    assert response.json()["total_lines"] == 1


def test_details_are_paginated_and_downloadable_as_csv(client, owner, run):
    page = client.get(f"/api/v1/runs/{run.name}/details", {"page": 2, "per_page": 4}, **_auth(owner)).json()

    assert (page["total"], page["pages"], page["page"]) == (10, 3, 2)
    assert [line["line_number"] for line in page["lines"]] == [4, 5, 6, 7]
    assert page["lines"][0]["outputs"] == {"y": 16}
    csv_text = client.get(
        f"/api/v1/runs/{run.pk}/details", {"format": "csv"}, **_auth(owner)
    ).content.decode()
    assert csv_text.splitlines()[:2] == ["line_number,status,inputs.x,outputs.y,error", "0,Completed,0,0,"]


def test_logs_tail_after_a_sequence_number(client, owner, run):
    for i in range(3):
        services.run_log_write(run=run, text=f"message {i}")
    first = client.get(f"/api/v1/runs/{run.name}/logs", {"limit": 2}, **_auth(owner)).json()
    rest = client.get(f"/api/v1/runs/{run.name}/logs", {"after": first["next_after"]}, **_auth(owner)).json()

    texts = [line["text"] for line in first["lines"] + rest["lines"]]
    assert texts[-3:] == ["message 0", "message 1", "message 2"]
    assert len(texts) == RunLog.objects.filter(run=run).count()


def test_cancel_of_a_queued_run_cancels_it_at_once(client, owner, run):
    response = client.post(f"/api/v1/runs/{run.name}/cancel", **_auth(owner))

    assert response.json()["status"] == RunStatus.CANCELED
    assert set(RunChunk.objects.filter(run=run).values_list("status", flat=True)) == {"Canceled"}


def test_archive_hides_the_run_from_the_default_list_and_restore_brings_it_back(client, owner, run):
    client.post(f"/api/v1/runs/{run.name}/archive", **_auth(owner))
    listed = [r["name"] for r in client.get("/api/v1/runs", **_auth(owner)).json()]
    archived = [r["name"] for r in client.get("/api/v1/runs", {"archived": "only"}, **_auth(owner)).json()]
    client.post(f"/api/v1/runs/{run.name}/restore", **_auth(owner))
    again = [r["name"] for r in client.get("/api/v1/runs", {"tag": "team=qa"}, **_auth(owner)).json()]

    assert run.name not in listed and archived == [run.name] and again == [run.name]


def test_outsider_gets_404_for_every_run_and_dataset_route(client, outsider, run, dataset):
    auth = _auth(outsider)
    for url in (
        f"/api/v1/runs/{run.name}",
        f"/api/v1/runs/{run.pk}/details",
        f"/api/v1/runs/{run.pk}/metrics",
        f"/api/v1/runs/{run.pk}/logs",
        f"/api/v1/runs/{run.pk}/lines/0",
        f"/api/v1/datasets/{dataset.pk}",
    ):
        assert client.get(url, **auth).status_code == 404, url
    for action in ("cancel", "resume", "archive"):
        assert client.post(f"/api/v1/runs/{run.pk}/{action}", **auth).status_code == 404, action
    assert client.delete(f"/api/v1/runs/{run.pk}", **auth).status_code == 404
    assert client.get("/api/v1/runs", **auth).json() == []
    assert client.get("/api/v1/datasets", **auth).json() == []
    assert Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).exists()


def test_anonymous_gets_401(client, run):
    assert client.get(f"/api/v1/runs/{run.name}").status_code == 401
    assert client.get("/api/v1/datasets").status_code == 401


def test_viewer_of_a_shared_flow_sees_its_runs_but_cannot_cancel_them(client, owner, teammate, flow, run):
    from flows_app.services import flow_share

    flow_share(flow=flow, by=owner, user=teammate, role="viewer")

    assert client.get(f"/api/v1/runs/{run.name}", **_auth(teammate)).status_code == 200
    assert client.post(f"/api/v1/runs/{run.name}/cancel", **_auth(teammate)).status_code == 403
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED


def test_evaluation_needs_a_completed_base_run(client, owner, flow, run):
    response = client.post(
        f"/api/v1/runs/{run.name}/evaluations",
        {"flow": "square", "column_mapping": {"x": "${run.outputs.y}"}},
        content_type="application/json",
        **_auth(owner),
    )

    assert response.status_code == 422
    assert "only a Completed run can be evaluated" in response.json()["detail"]


def test_reaper_requeues_a_chunk_whose_worker_stopped_heartbeating(owner, run):
    import datetime as dt

    from django.utils import timezone

    chunk = RunChunk.objects.filter(run=run).first()
    old = timezone.now() - dt.timedelta(minutes=5)
    RunChunk.objects.filter(pk=chunk.pk).update(
        status="Running", heartbeat_at=old, claimed_at=old, claim_token="dead", worker="gone:1"
    )

    acted = services.run_reap_stale(stale_after=30, requeue_after=3600)
    again = services.run_reap_stale(stale_after=30, requeue_after=3600)

    chunk.refresh_from_db()
    assert acted == 1 and again == 0
    assert chunk.status == "Queued" and chunk.claim_token == "" and chunk.task_id
    assert "stopped heartbeating" in RunLog.objects.filter(run=run).last().text


def test_reaper_sends_again_a_queued_chunk_whose_message_nobody_took(owner, run):
    import datetime as dt

    from django.utils import timezone

    queued = RunChunk.objects.filter(run=run, status="Queued")
    long_ago = timezone.now() - dt.timedelta(hours=2)
    queued.update(enqueued_at=long_ago)
    before = dict(queued.values_list("pk", "task_id"))

    acted = services.run_reap_stale(stale_after=30, requeue_after=3600)
    again = services.run_reap_stale(stale_after=30, requeue_after=3600)

    after = dict(queued.values_list("pk", "task_id"))
    assert acted == len(before) > 0 and again == 0
    assert all(after[pk] != task_id for pk, task_id in before.items())
    assert queued.filter(enqueued_at__lte=long_ago).count() == 0
    assert "sent again" in RunLog.objects.filter(run=run).last().text


def test_a_chunk_is_claimed_once(owner, run):
    from runs_app.services import _claim

    chunk = RunChunk.objects.filter(run=run).first()

    first = _claim(chunk.pk, "message-1")
    second = _claim(chunk.pk, "message-2")
    redelivered = _claim(chunk.pk, "message-1")

    assert first is not None and second is None
    assert redelivered is not None and redelivered[1] != first[1]
    assert RunChunk.objects.get(pk=chunk.pk).attempts == 2


@pytest.mark.django_db(databases="__all__")
async def test_progress_is_pushed_to_the_run_group(owner, run):
    from asgiref.sync import sync_to_async
    from channels.layers import get_channel_layer

    from runs_app import streaming

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(streaming.run_group(run.pk), channel)

    sent = await sync_to_async(streaming.publish_progress)(run, force=True)
    message = await layer.receive(channel)

    assert sent is True
    assert message["type"] == "run.progress"
    assert message["progress"]["status"] == "Queued" and message["progress"]["total"] == 10
    assert await sync_to_async(streaming.publish_progress)(run) is False  # throttled


def test_reap_command_reports_what_it_did(owner, run):
    from django.core.management import call_command

    out = io.StringIO()
    call_command("runs_reap", stdout=out)

    assert "requeued or finished 0" in out.getvalue()
