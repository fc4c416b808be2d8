"""Online endpoints through the real studio ASGI app, served by daphne in a subprocess on a free port.

The studio process shares this test database (a SQLite file or the PostgreSQL test database); deployments are
made through the REST API with a personal access token, the chat flow's LLM is the fake OpenAI server over
real HTTP, and requests go to `/endpoints/<name>/score` exactly as a client would send them. The answers are
checked against what prompt flow's own `pf flow serve` gave for the same requests (tests/data/serving/),
save the deliberate 424 wrapping of an unacceptable `Accept`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from accounts_app.services import token_create
from flows_app.services import files_from_folder, flow_create
from runs_app.models import EndpointRequest
from tests.runs_app.conftest import (
    REPO,
    SESSION_DIR,
    database_url_for_children,
    fake_openai_connection,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDED = json.loads((DATA / "serving" / "dag_chat.json").read_text(encoding="utf-8"))
SSE = "text/event-stream"
FIRST = {"question": "What is prompt flow?"}


@dataclass
class Served:
    """A daphne process serving studio.asgi:application."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """The tail of what the server printed."""
        return self.log.read_text(errors="replace")[-5000:] if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def studio(django_db_setup: None, django_db_blocker: Any) -> Iterator[Served]:
    """The studio's ASGI app under daphne, on the test database, for the tests of this module."""
    with django_db_blocker.unblock():
        database_url = database_url_for_children()
    folder = SESSION_DIR / f"endpoints-{os.getpid()}-{_free_port()}"
    folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STUDIO_DATA_DIR")}
    env.update(
        DATABASE_URL=database_url,
        STUDIO_DATA_DIR=str(folder),
        STUDIO_SECRET_KEY=settings.SECRET_KEY,
        STUDIO_ENCRYPTION_KEYS=",".join(settings.STUDIO_ENCRYPTION_KEYS),
        PYTHONUNBUFFERED="1",
    )
    port = _free_port()
    log = folder / "daphne.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "studio.asgi:application"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(url=f"http://127.0.0.1:{port}", process=process, log=log)

    def up() -> bool:
        assert process.poll() is None, served.output()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(served.url + "/endpoints/none/health", timeout=2).status_code == 401
        return False

    try:
        wait_for(up, timeout=60, what="daphne to answer", logs=served.output)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Deployed:
    """An owner's chat flow deployed as endpoint `chat-ep`, deployment `blue`."""

    endpoint: str
    keys: dict[str, str]
    token: str
    snapshot: str
    body: dict[str, Any]


def _api(studio: Served, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=studio.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


@pytest.fixture
def deployed(studio: Served, owner: Any, fake_llm: Any) -> Deployed:
    """The corpus chat flow (an llm node on `fake_openai`, a python node counting turns), deployed by API."""
    fake_openai_connection(owner, fake_llm)
    files = files_from_folder(root=DATA / "flows" / "dag_chat")
    files = {p: d for p, d in files.items() if p not in ("cases.json", "expected.json")}
    flow = flow_create(owner=owner, name="dag_chat", files=files)
    token = token_create(user=owner, name="deploy tests").plaintext
    with _api(studio, token) as api:
        resp = api.post(
            "/deployments", json={"flow": "dag_chat", "endpoint": "chat-ep", "deployment": "blue"}
        )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return Deployed("chat-ep", body["keys"], token, flow.head.snapshot_id, body)


def _score(
    studio: Served, key: str | None, body: bytes | dict[str, Any], accept: str | None, **headers: str
) -> httpx.Response:
    sent = {"Content-Type": "application/json", **headers}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if accept is not None:
        sent["Accept"] = accept
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(timeout=30) as client:
        client.headers.pop("accept", None)  # a request without Accept must go without one
        return client.post(studio.url + "/endpoints/chat-ep/score", content=content, headers=sent)


def _events(text: str) -> list[Any]:
    chunks = [c for c in text.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks), text
    return [json.loads(c.removeprefix("data: ")) for c in chunks]


def _tagged(resp: httpx.Response, deployed: Deployed, deployment: str = "blue") -> None:
    assert resp.headers["x-flowstudio-deployment"] == deployment
    assert resp.headers["x-flowstudio-snapshot"] == deployed.snapshot
    assert resp.headers["x-flowstudio-endpoint"] == deployed.endpoint


def test_deployment_answers_every_recorded_request_as_prompt_flow_did(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    key = deployed.keys["primary"]
    assert deployed.body["deployment"]["traffic"] == 100
    assert deployed.body["endpoint"]["scoring_uri"] == studio.url + "/endpoints/chat-ep/score"
    for case in RECORDED["cases"]:
        fake_llm.reset()
        expected = case["response"]
        resp = _score(studio, key, case["request"]["body"].encode(), case["request"]["accept"])
        _tagged(resp, deployed)
        calls = fake_llm.stats()["requests"]
        if expected["status"] == 406:
            # Deliberate: refused before the flow runs, with 424 naming 406 (Azure's form).
            assert resp.status_code == 424, case["name"]
            assert resp.headers["ms-azureml-model-error-statuscode"] == "406"
            body = resp.json()
            assert body["error"]["code"] == "UserError"
            assert body["error"]["message"].startswith(expected["json"]["error"]["message"])
            assert "406" in body["error"]["message"]
            assert calls == 0
            continue
        assert resp.status_code == expected["status"], (case["name"], resp.text)
        assert resp.headers["content-type"] == expected["content_type"], case["name"]
        assert calls == expected["llm_calls"], case["name"]
        if "sse" in expected:
            assert resp.text == expected["sse"], case["name"]
            continue
        want = expected["json"]
        if "error" not in want:
            assert resp.json() == want, case["name"]
            continue
        message, recorded = resp.json()["error"]["message"], want["error"]["message"]
        assert resp.json()["error"]["code"] == want["error"]["code"]
        if recorded.startswith("Required input fields"):
            # Deliberate: prompt flow echoes the request body into the message; we name the fields only.
            assert message == recorded.split(" in request data")[0] + " in request data."
        else:
            assert message == recorded


def test_chat_conversation_replays_with_the_first_turn_in_chat_history(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    key = deployed.keys["secondary"]
    first = _score(studio, key, FIRST, "application/json")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json() == {"answer": fake_llm.expected_chat(fake_llm.last_body()["messages"]), "turns": 0}
    _tagged(first, deployed)

    history = [{"inputs": FIRST, "outputs": first.json()}]
    second = _score(studio, key, {"question": "Tell me more.", "chat_history": history}, SSE)
    assert second.status_code == 200
    assert second.headers["content-type"] == "text/event-stream; charset=utf-8"
    _tagged(second, deployed)
    events = _events(second.text)
    messages = fake_llm.last_body()["messages"]
    assert first.json()["answer"] in json.dumps(messages)
    answer = fake_llm.expected_chat(messages)
    # The non-stream output first, then one event per chunk of the streamed output (the OpenAI stream's
    # closing chunk included, empty, as prompt flow sends it), nothing else.
    assert events[0] == {"turns": 1}
    words = answer.split(" ")
    assert events[1:] == [{"answer": words[0]}, *({"answer": f" {w}"} for w in words[1:]), {"answer": ""}]

    wait_for(
        lambda: EndpointRequest.objects.filter(endpoint__name="chat-ep").count() == 2,
        timeout=10,
        what="the two request rows",
        logs=studio.output,
    )
    rows = list(EndpointRequest.objects.filter(endpoint__name="chat-ep").order_by("time"))
    assert [(r.status, r.streamed, r.deployment.name) for r in rows] == [
        (200, False, "blue"),
        (200, True, "blue"),
    ]
    assert all(r.total_tokens > 0 and r.latency_ms > 0 for r in rows)


def test_swagger_and_health_need_a_key_and_match_prompt_flows(studio: Served, deployed: Deployed) -> None:
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {deployed.keys['primary']}"}) as client:
        swagger = client.get(studio.url + "/endpoints/chat-ep/swagger.json")
        health = client.get(studio.url + "/endpoints/chat-ep/health")
    expected = dict(RECORDED["swagger"])
    expected["paths"] = {k: v for k, v in expected["paths"].items() if k != "/feedback"}
    assert swagger.status_code == 200
    assert swagger.json() == expected
    assert health.status_code == 200 and health.json()["status"] == "Healthy"
    _tagged(swagger, deployed)
    _tagged(health, deployed)
    assert httpx.get(studio.url + "/endpoints/chat-ep/health").status_code == 401


def test_missing_wrong_and_foreign_keys_get_401_with_the_error_body(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    missing = _score(studio, None, FIRST, "application/json")
    wrong = _score(studio, deployed.keys["primary"][:-2] + "xx", FIRST, "application/json")
    # A key of this endpoint does not open another one, nor an endpoint that does not exist.
    with httpx.Client(timeout=30) as client:
        elsewhere = client.post(
            studio.url + "/endpoints/other-ep/score",
            json=FIRST,
            headers={"Authorization": f"Bearer {deployed.keys['primary']}"},
        )
    session = _score(studio, None, FIRST, "application/json", Cookie="sessionid=anything")
    for resp in (missing, wrong, elsewhere, session):
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["code"] == "UserError"
    assert missing.json()["error"]["message"] == "Missing key: send 'Authorization: Bearer <endpoint key>'."
    assert wrong.json() == {"error": {"code": "UserError", "message": "Invalid key for endpoint 'chat-ep'."}}
    assert fake_llm.stats()["requests"] == 0
    # An endpoint key is no studio API token.
    with _api(studio, deployed.keys["primary"]) as api:
        assert api.get("/endpoints").status_code == 401


def test_regenerated_key_is_rejected_on_the_very_next_request(studio: Served, deployed: Deployed) -> None:
    old = deployed.keys["primary"]
    assert _score(studio, old, FIRST, "application/json").status_code == 200  # cached as good now
    with _api(studio, deployed.token) as api:
        resp = api.post("/endpoints/chat-ep/keys/regenerate", json={"key_type": "primary"})
    assert resp.status_code == 200
    new = resp.json()["key"]
    assert new != old and resp.json()["key_type"] == "primary"

    rejected = _score(studio, old, FIRST, "application/json")
    assert rejected.status_code == 401
    assert rejected.json()["error"]["code"] == "UserError"
    assert _score(studio, new, FIRST, "application/json").status_code == 200
    assert _score(studio, deployed.keys["secondary"], FIRST, "application/json").status_code == 200


def test_disabled_endpoint_answers_403_until_enabled_again(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    key = deployed.keys["primary"]
    assert _score(studio, key, FIRST, "application/json").status_code == 200
    with _api(studio, deployed.token) as api:
        assert api.patch("/endpoints/chat-ep", json={"disabled": True}).json()["disabled"] is True
        fake_llm.reset()
        resp = _score(studio, key, FIRST, "application/json")
        assert resp.status_code == 403
        assert resp.json() == {"error": {"code": "UserError", "message": "endpoint 'chat-ep' is disabled"}}
        assert fake_llm.stats()["requests"] == 0
        assert api.patch("/endpoints/chat-ep", json={"disabled": False}).status_code == 200
    assert _score(studio, key, FIRST, "application/json").status_code == 200


def test_traffic_moves_to_a_green_deployment_that_returns_only_the_chosen_output(
    studio: Served, deployed: Deployed
) -> None:
    key = deployed.keys["primary"]
    with _api(studio, deployed.token) as api:
        green = api.post(
            "/deployments",
            json={"flow": "dag_chat", "endpoint": "chat-ep", "deployment": "green", "outputs": ["answer"]},
        )
        assert green.status_code == 201, green.text
        assert green.json()["keys"] is None  # an existing endpoint keeps its keys
        assert green.json()["endpoint"]["traffic"] == {"blue": 100, "green": 0}
        bad = api.patch("/endpoints/chat-ep", json={"traffic": {"blue": 50, "green": 20}})
        assert bad.status_code == 422
        assert "add up to 70%" in bad.json()["detail"]
        moved = api.patch("/endpoints/chat-ep", json={"traffic": {"green": 100}})
        assert moved.json()["traffic"] == {"blue": 0, "green": 100}

    resp = _score(studio, key, FIRST, "application/json")
    _tagged(resp, deployed, "green")
    assert set(resp.json()) == {"answer"}
    pinned = _score(studio, key, FIRST, "application/json", **{"azureml-model-deployment": "blue"})
    _tagged(pinned, deployed, "blue")
    assert set(pinned.json()) == {"answer", "turns"}


def test_outsider_gets_404_for_every_endpoint_route(
    studio: Served, deployed: Deployed, outsider: Any
) -> None:
    token = token_create(user=outsider, name="outsider").plaintext
    with _api(studio, token) as api:
        assert api.get("/endpoints").json() == []
        assert api.get("/endpoints/chat-ep").status_code == 404
        assert api.patch("/endpoints/chat-ep", json={"disabled": True}).status_code == 404
        assert api.post("/endpoints/chat-ep/keys/regenerate", json={"key_type": "primary"}).status_code == 404
        assert api.delete("/endpoints/chat-ep").status_code == 404
        taken = api.post("/deployments", json={"flow": "dag_chat", "endpoint": "chat-ep"})
        # The outsider cannot see the owner's flow, so nothing is deployed either way.
        assert taken.status_code in (404, 422)
    assert _score(studio, deployed.keys["primary"], FIRST, "application/json").status_code == 200


def test_a_client_that_leaves_mid_stream_stops_the_llm_call(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    fake_llm.config(latency_ms=0, token_ms=100, tokens=200)  # a 20 s answer
    headers = {"Authorization": f"Bearer {deployed.keys['primary']}", "Accept": SSE}
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST", studio.url + "/endpoints/chat-ep/score", json=FIRST, headers=headers
        ) as resp:
            lines = resp.iter_lines()
            seen = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: ") for line in seen)
            assert fake_llm.stats()["inflight"] == 1
    started = time.monotonic()
    wait_for(
        lambda: fake_llm.stats()["inflight"] == 0, timeout=2, what="the LLM call to stop", logs=studio.output
    )
    assert time.monotonic() - started < 2
    row = wait_for(
        lambda: EndpointRequest.objects.filter(endpoint__name="chat-ep").first(),
        timeout=10,
        what="the request row",
        logs=studio.output,
    )
    assert (row.status, row.streamed) == (200, True)


def test_concurrent_requests_reach_the_llm_together(
    studio: Served, deployed: Deployed, fake_llm: Any
) -> None:
    import asyncio

    fake_llm.config(latency_ms=1000)
    headers = {"Authorization": f"Bearer {deployed.keys['primary']}", "Accept": "application/json"}

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            url = studio.url + "/endpoints/chat-ep/score"
            return await asyncio.gather(
                *(client.post(url, json={"question": f"q{i}"}, headers=headers) for i in range(32))
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 32
    assert fake_llm.stats()["max_inflight"] == 32
    assert {r.headers["x-flowstudio-deployment"] for r in responses} == {"blue"}
