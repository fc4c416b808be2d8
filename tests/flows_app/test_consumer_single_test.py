"""The single-test websocket through the real ASGI stack: origin check, session auth, a real runner process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from flows_app.consumers import CLOSE_NOT_FOUND, CLOSE_UNAUTHENTICATED
from flows_app.models import FlowTest
from flows_app.services import connection_create, flow_create_from_template, flow_share
from studio.asgi import application
from tests.fakellm import expected_chat_answer

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "channels"])

# studio.asgi builds its origin check from ALLOWED_HOSTS at import: a page on localhost is what a browser sends.
ORIGIN = (b"origin", b"http://localhost")
CHAT_SYSTEM = "You are a helpful assistant."


@pytest.fixture
def chat_flow(owner, fake_llm):
    """The chat template of the owner, with the connection it names pointing at the fake LLM."""
    connection_create(
        owner=owner,
        name="open_ai_connection",
        type="open_ai",
        configs={"base_url": fake_llm.base_url},
        secrets={"api_key": "sk-test"},
    )
    return flow_create_from_template(owner=owner, name="chat", template="chat")


def _cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    value = client.cookies[settings.SESSION_COOKIE_NAME].value
    return (b"cookie", f"{settings.SESSION_COOKIE_NAME}={value}".encode())


OPEN: list[WebsocketCommunicator] = []


@pytest.fixture(autouse=True)
async def _close_sockets():
    """Disconnect every socket a test opened, even when it failed: that kills their runners."""
    yield
    while OPEN:
        with contextlib.suppress(Exception):
            await OPEN.pop().disconnect(timeout=5)


async def _socket(flow_id: int, user=None, origin=ORIGIN) -> WebsocketCommunicator:
    headers = [origin]
    if user is not None:
        headers.append(await sync_to_async(_cookie)(user))
    socket = WebsocketCommunicator(application, f"/ws/flows/{flow_id}/test/", headers=headers)
    OPEN.append(socket)
    return socket


async def _until(socket: WebsocketCommunicator, kind: str, timeout: float = 30) -> tuple[dict, list[dict]]:
    """Messages up to and including the first of this type."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        message = await socket.receive_json_from(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(message)
        if message["type"] == kind:
            return message, seen


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (psutil-free: /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_owner_runs_the_chat_template_and_sees_badges_tokens_and_the_answer(chat_flow, owner, fake_llm):
    socket = await _socket(chat_flow.pk, owner)
    connected, _ = await socket.connect(timeout=10)
    assert connected
    ready = await socket.receive_json_from(timeout=10)
    assert ready["type"] == "ready"
    assert ready["chat"] == {"input": "question", "history": "chat_history", "output": "answer"}
    assert "data-test-message" in ready["form"] and 'data-node-input="question"' in ready["form"]
    await socket.send_json_to({"action": "run", "inputs": {"question": "Hi there", "chat_history": []}})
    done, seen = await _until(socket, "done")
    kinds = [m["type"] for m in seen]
    assert kinds[0] == "started"
    print(kinds)
    chunks = [m["delta"] for m in seen if m["type"] == "chunk"]
    expected = expected_chat_answer(
        [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": "Hi there"}]
    )
    assert done["status"] == "Completed", done
    assert done["outputs"] == {"answer": expected}
    assert "".join(chunks) == expected and len(chunks) == 5
    badges = [(m["node"], m["status"]) for m in seen if m["type"] == "node"]
    assert badges == [("chat", "running"), ("chat", "completed")]
    assert done["usage"]["total_tokens"] > 0
    assert "trace-kind-llm" in done["trace"] and f"{done['usage']['total_tokens']} tokens" in done["trace"]
    await socket.disconnect()
    test = await sync_to_async(FlowTest.objects.get)(pk=done["test"])
    assert test.status == "Completed" and test.outputs == {"answer": expected}


SLOW_FLOW = {
    "flow.dag.yaml": b"""\
inputs:
  seconds:
    type: double
    default: 30
outputs:
  slept:
    type: double
    reference: ${nap.output}
nodes:
- name: nap
  type: python
  source:
    type: code
    path: nap.py
  inputs:
    seconds: ${inputs.seconds}
""",
    "nap.py": b"""\
import os
import sys
import time

from promptflow.core import tool


@tool
def nap(seconds: float) -> float:
    print(f"pid={os.getpid()}", flush=True)
    print("about to sleep", file=sys.stderr, flush=True)
    time.sleep(seconds)
    return seconds
""",
}


@pytest.fixture
def slow_flow(owner):
    """A flow whose only node prints its runner's pid, then sleeps."""
    from flows_app.services import flow_create

    return flow_create(owner=owner, name="slow", files=SLOW_FLOW)


async def _connected(flow_id: int, user) -> WebsocketCommunicator:
    socket = await _socket(flow_id, user)
    connected, _ = await socket.connect(timeout=10)
    assert connected
    assert (await socket.receive_json_from(timeout=10))["type"] == "ready"
    return socket


async def _runner_pid(socket: WebsocketCommunicator) -> int:
    message, _ = await _until(socket, "log")
    while not message["text"].startswith("pid="):
        message, _ = await _until(socket, "log")
    return int(message["text"].strip().split("=", 1)[1])


async def _gone_within(pid: int, seconds: float) -> float:
    started = time.monotonic()
    while _alive(pid):
        if time.monotonic() - started > seconds:
            raise AssertionError(f"runner {pid} still alive after {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_anonymous_socket_is_refused(chat_flow):
    socket = await _socket(chat_flow.pk)
    connected, code = await socket.connect(timeout=10)
    assert not connected and code == CLOSE_UNAUTHENTICATED


async def test_outsider_is_refused_as_if_the_flow_did_not_exist(chat_flow, outsider):
    socket = await _socket(chat_flow.pk, outsider)
    connected, code = await socket.connect(timeout=10)
    assert not connected and code == CLOSE_NOT_FOUND
    missing = await _socket(chat_flow.pk + 1000, outsider)
    assert (await missing.connect(timeout=10)) == (False, CLOSE_NOT_FOUND)


async def test_a_foreign_origin_is_refused_even_with_the_owners_session(chat_flow, owner):
    socket = await _socket(chat_flow.pk, owner, origin=(b"origin", b"https://evil.example"))
    connected, _ = await socket.connect(timeout=10)
    assert not connected
    no_origin = WebsocketCommunicator(
        application, f"/ws/flows/{chat_flow.pk}/test/", headers=[await sync_to_async(_cookie)(owner)]
    )
    assert not (await no_origin.connect(timeout=10))[0]


async def test_a_viewer_can_test_a_flow_shared_with_them(slow_flow, owner, teammate):
    await sync_to_async(flow_share)(flow=slow_flow, by=owner, user=teammate, role="viewer")
    socket = await _connected(slow_flow.pk, teammate)
    await socket.send_json_to({"action": "run", "inputs": {"seconds": 0}})
    done, seen = await _until(socket, "done")
    assert done["status"] == "Completed" and done["outputs"] == {"slept": 0.0}
    logs = [(m["stream"], m["text"].strip(), m["node"]) for m in seen if m["type"] == "log"]
    assert ("stderr", "about to sleep", "nap") in logs
    assert any(stream == "stdout" and text.startswith("pid=") for stream, text, _ in logs)
    await socket.disconnect()
    test = await sync_to_async(FlowTest.objects.select_related("user").get)(pk=done["test"])
    assert test.user == teammate and any(line["text"].strip() == "about to sleep" for line in test.logs)


async def test_cancel_stops_the_runner_within_a_second(slow_flow, owner):
    socket = await _connected(slow_flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {}})
    pid = await _runner_pid(socket)
    asked = time.monotonic()
    await socket.send_json_to({"action": "cancel"})
    done, _ = await _until(socket, "done", timeout=5)
    assert time.monotonic() - asked < 1.0
    assert done["status"] == "Canceled" and done["error"]["type"] == "Canceled"
    assert done["node_runs"]["nap"]["status"] == "canceled"
    await _gone_within(pid, 2.0)
    test = await sync_to_async(FlowTest.objects.get)(pk=done["test"])
    assert test.status == "Canceled"
    # The socket carries on: the next test gets a fresh runner.
    await socket.send_json_to({"action": "run", "inputs": {"seconds": 0}})
    again, _ = await _until(socket, "done")
    assert again["status"] == "Completed"
    await socket.disconnect()


async def test_closing_the_socket_stops_the_runner_and_records_the_test_as_canceled(slow_flow, owner):
    socket = await _connected(slow_flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {}})
    started, _ = await _until(socket, "started")
    pid = await _runner_pid(socket)
    await socket.disconnect()
    await _gone_within(pid, 2.0)
    test = await sync_to_async(FlowTest.objects.get)(pk=started["test"])
    assert test.status == "Canceled"


async def test_a_second_test_while_one_runs_is_refused_with_a_reason(slow_flow, owner):
    socket = await _connected(slow_flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {}})
    await _runner_pid(socket)
    await socket.send_json_to({"action": "run", "inputs": {}})
    refused, _ = await _until(socket, "refused")
    assert "already running" in refused["message"]
    other_tab = await _connected(slow_flow.pk, owner)
    await other_tab.send_json_to({"action": "run", "inputs": {}})
    refused, _ = await _until(other_tab, "refused")
    assert "'slow' is still running" in refused["message"]
    await other_tab.disconnect()
    await socket.send_json_to({"action": "cancel"})
    await _until(socket, "done")
    await socket.disconnect()


async def test_a_failing_node_names_the_node_and_shows_the_users_traceback(owner):
    from pathlib import Path

    from flows_app.services import files_from_folder, flow_create

    folder = Path(__file__).resolve().parents[1] / "data" / "flows" / "error_python_raises"
    flow = await sync_to_async(flow_create)(owner=owner, name="raises", files=files_from_folder(root=folder))
    socket = await _connected(flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {"divisor": -1}})
    done, seen = await _until(socket, "done")
    failed = next(m for m in seen if m["type"] == "node" and m["status"] == "failed")
    assert failed["node"] == "divide"
    assert "divisor must not be negative" in failed["error"]["message"]
    assert "divide.py" in failed["error"]["traceback"] and "_checked" in failed["error"]["traceback"]
    assert done["status"] == "Failed" and done["error"]["node"] == "divide"
    await socket.disconnect()


async def test_history_keeps_tests_and_reopens_one_with_its_trace(slow_flow, owner):
    socket = await _connected(slow_flow.pk, owner)
    for seconds in (0, 0.01):
        await socket.send_json_to({"action": "run", "inputs": {"seconds": seconds}})
        done, _ = await _until(socket, "done")
    assert done["history"].count("data-test-open=") == 2
    await socket.send_json_to({"action": "open", "id": done["test"]})
    record, _ = await _until(socket, "record")
    assert record["test"]["inputs"] == {"seconds": 0.01}
    assert record["test"]["outputs"] == {"slept": 0.01}
    assert record["test"]["node_runs"]["nap"]["status"] == "completed"
    assert "trace-kind-flow" in record["trace"] and "trace-kind-node" in record["trace"]
    await socket.send_json_to({"action": "open", "id": done["test"] + 999})
    refused, _ = await _until(socket, "refused")
    assert "No such test" in refused["message"]
    await socket.disconnect()


async def test_an_outsider_cannot_open_someone_elses_test(slow_flow, owner, outsider):
    socket = await _connected(slow_flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {"seconds": 0}})
    done, _ = await _until(socket, "done")
    await socket.disconnect()
    from django.http import Http404

    from flows_app.selectors import flowtest_get_for

    with pytest.raises(Http404):
        await sync_to_async(flowtest_get_for)(outsider, slow_flow.pk, done["test"])


async def test_a_variant_and_a_single_node_run_with_inputs_of_their_own(owner, fake_llm):
    from pathlib import Path

    from flows_app.services import files_from_folder, flow_create

    await sync_to_async(connection_create)(
        owner=owner,
        name="fake_openai",
        type="open_ai",
        configs={"base_url": fake_llm.base_url},
        secrets={"api_key": "sk-test"},
    )
    folder = Path(__file__).resolve().parents[1] / "data" / "flows" / "dag_variants"
    flow = await sync_to_async(flow_create)(
        owner=owner, name="variants", files=files_from_folder(root=folder)
    )
    socket = await _connected(flow.pk, owner)
    await socket.send_json_to({"action": "run", "inputs": {"name": "Ada"}, "variant": "${greet.variant_1}"})
    done, _ = await _until(socket, "done")
    assert done["status"] == "Completed", done["error"]
    assert done["outputs"]["greeting"] == "hi Ada" and done["outputs"]["framed"] == "[hi Ada]"
    await socket.send_json_to({"action": "run", "inputs": {"greet.output": "Hello, Bo"}, "node": "frame"})
    done, seen = await _until(socket, "done")
    assert done["status"] == "Completed", done["error"]
    assert [m["node"] for m in seen if m["type"] == "node" and m["status"] == "running"] == ["frame"]
    assert done["outputs"] == {"output": "[Hello, Bo]"}
    await socket.send_json_to({"action": "run", "inputs": {}, "variant": "${greet.variant_9}"})
    refused, _ = await _until(socket, "refused")
    assert "no variant 'variant_9'" in refused["message"]
