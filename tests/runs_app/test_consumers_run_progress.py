"""The run progress websocket, through the real ASGI stack: origin check, session auth, the run's group."""

from __future__ import annotations

from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from flows_app.services import files_from_folder, flow_create
from runs_app import streaming
from runs_app.consumers import CLOSE_NOT_FOUND, CLOSE_UNAUTHENTICATED
from runs_app.models import Run, RunStatus
from runs_app.services import dataset_create, run_create
from studio.asgi import application

# The consumer reads the database from another thread and the channel layer has its own database.
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "channels"])

FLOWS = Path(__file__).resolve().parents[1] / "data" / "flows"
# studio.asgi builds its origin check from ALLOWED_HOSTS when imported, before the test runner adds
# "testserver": a page served on localhost is what a browser would present.
ORIGIN = (b"origin", b"http://localhost")


@pytest.fixture
def run(owner) -> Run:
    """A queued run of the owner (never executed here: the test publishes its progress itself)."""
    flow = flow_create(owner=owner, name="basic", files=files_from_folder(root=FLOWS / "dag_basic"))
    data = b'{"text": "a", "times": 1}\n{"text": "b", "times": 2}\n'
    dataset = dataset_create(owner=owner, name="two", filename="two.jsonl", data=data)
    return run_create(
        user=owner, flow_version=flow.head, dataset=dataset, column_mapping={"text": "${data.text}"}
    )


def _cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (
        b"cookie",
        f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode(),
    )


def _socket(run: Run, *headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/runs/{run.pk}/", headers=[ORIGIN, *headers])


async def test_owner_gets_the_current_progress_then_each_published_event(run, owner):
    socket = _socket(run, await sync_to_async(_cookie)(owner))
    connected, _ = await socket.connect(timeout=5)
    assert connected
    first = await socket.receive_json_from(timeout=5)
    assert first["type"] == "progress"
    assert first["progress"]["status"] == "Queued" and first["progress"]["total"] == 2

    def advance() -> None:
        Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING, done_lines=1)
        streaming.publish_progress(Run.objects.get(pk=run.pk), force=True)

    await sync_to_async(advance, thread_sensitive=False)()
    event = await socket.receive_json_from(timeout=10)
    assert event == {"type": "progress", "progress": event["progress"]}
    assert event["progress"]["status"] == "Running" and event["progress"]["done"] == 1
    assert event["progress"]["percent"] == 50.0
    await socket.disconnect()


async def test_log_lines_of_the_run_are_forwarded(run, owner):
    socket = _socket(run, await sync_to_async(_cookie)(owner))
    assert (await socket.connect(timeout=5))[0]
    await socket.receive_json_from(timeout=5)
    line = {"seq": 1, "time": "2026-01-01T00:00:00Z", "line_number": 0, "stream": "stdout", "text": "hi"}
    await sync_to_async(streaming.publish, thread_sensitive=False)(
        run.pk, streaming.log_event(run.pk, [line])
    )
    assert await socket.receive_json_from(timeout=10) == {"type": "log", "lines": [line]}
    await socket.disconnect()


async def test_outsider_is_refused_and_joins_no_group(run, outsider):
    socket = _socket(run, await sync_to_async(_cookie)(outsider))
    connected, code = await socket.connect(timeout=5)
    assert not connected and code == CLOSE_NOT_FOUND

    await sync_to_async(streaming.publish_progress, thread_sensitive=False)(run, force=True)
    # Nothing reaches a refused socket.
    assert await socket.receive_nothing(timeout=0.5)


async def test_anonymous_is_refused(run):
    connected, code = await _socket(run).connect(timeout=5)
    assert not connected and code == CLOSE_UNAUTHENTICATED


async def test_a_foreign_origin_is_refused_before_the_consumer(run, owner):
    socket = WebsocketCommunicator(
        application,
        f"/ws/runs/{run.pk}/",
        headers=[(b"origin", b"http://evil.example"), await sync_to_async(_cookie)(owner)],
    )
    connected, _ = await socket.connect(timeout=5)
    assert not connected


async def test_an_unknown_run_is_refused(owner):
    fake = Run(pk="00000000-0000-0000-0000-000000000000")
    connected, code = await _socket(fake, await sync_to_async(_cookie)(owner)).connect(timeout=5)
    assert not connected and code == CLOSE_NOT_FOUND
