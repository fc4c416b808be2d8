"""Crash safety of the broker: a run survives a restart of its Redis broker that loses every queued message.

The test starts a Redis server of its own (never the shared one): persistence off, so SIGKILL and a restart on
the same port leave an empty broker, as a crashed broker without persistence would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count

from runs_app import services
from runs_app.models import LineResult, Run, RunChunk, RunLog, RunStatus
from tests.runs_app.conftest import (
    CORPUS,
    WorkerPool,
    _reset_producers,
    chat_flow_on,
    corpus_case,
    jsonl,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]

LINES = 300
# The corpus chat flow: one LLM node (the fake LLM) and a python node measuring its answer.
MAPPING = {"question": "${data.question}", "style": "${data.style}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A private `redis-server` on one port, without persistence; `kill` and `start` again keep the port."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        import redis

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install redis-server)"
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: self._pings(client), timeout=10, what=f"redis-server on port {self.port}")
        client.close()

    def _pings(self, client: Any) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log()
        try:
            return bool(client.ping())
        except Exception:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies with every message it held."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log(self) -> str:
        """The tail of the server's output."""
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def redis_broker(
    run_workers: WorkerPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RedisServer]:
    """A private Redis server as the broker of this process's producer and of the workers started after it."""
    from studio.celery import app

    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(port=_free_port(), folder=folder)
    server.start()
    saved_url, saved_options = app.conf.broker_url, dict(app.conf.broker_transport_options or {})
    saved_transport = app.conf.broker_transport
    # Celery prefers these variables to its settings: the shared broker of an integration session must not
    # get this test's messages.
    for name in ("CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL"):
        monkeypatch.delenv(name, raising=False)
        run_workers.env.pop(name, None)
    monkeypatch.setenv("CELERY_BROKER_URL", server.url)
    run_workers.env["CELERY_BROKER_URL"] = server.url
    app.conf.broker_url = server.url
    app.conf.broker_transport = None  # the embedded default names its filesystem transport
    app.conf.broker_transport_options = {}
    _reset_producers(app)
    with app.connection_for_write() as producer_connection:
        assert f":{server.port}/" in producer_connection.as_uri(), producer_connection.as_uri()
        assert producer_connection.transport.driver_type == "redis"
    try:
        yield server
    finally:
        run_workers.stop_all()
        app.conf.broker_url = saved_url
        app.conf.broker_transport = saved_transport
        app.conf.broker_transport_options = saved_options
        _reset_producers(app)
        if server.process is not None and server.process.poll() is None:
            server.kill()


def _finished(run: Run) -> Run | None:
    run.refresh_from_db()
    return run if run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED) else None


def _recorded_outputs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The corpus chat flow's data rows and prompt flow's recorded outputs of them (same fake LLM)."""
    rows = [json.loads(line) for line in (CORPUS / "dag_llm_chat" / "data.jsonl").read_text().splitlines()]
    _, expected = corpus_case("dag_llm_chat")
    lines = sorted(expected["batches"]["main"]["lines"], key=lambda line: line["line_number"])
    return rows, [line["output"] for line in lines]


def test_a_broker_restart_that_loses_the_queued_messages_does_not_lose_the_run(
    owner, run_workers, redis_broker, fake_llm
):
    logs = run_workers.logs
    run_workers.start(concurrency=1)
    run_workers.start(concurrency=1)
    flow = chat_flow_on(owner, fake_llm)
    rows, recorded = _recorded_outputs()
    data = [rows[i % len(rows)] for i in range(LINES)]
    dataset = services.dataset_create(owner=owner, name="qs", filename="qs.jsonl", data=jsonl(data))
    # Slow answers: the run takes seconds, so the broker dies while chunks still wait in its queue.
    fake_llm.config(latency_ms=120)

    # Run A holds both pool processes (an execution takes on its run's queued chunks itself); run B's chunks
    # wait behind it as messages in the broker only, and the broker loses them.
    first = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, column_mapping=MAPPING, concurrency=4
    )
    wait_for(
        lambda: LineResult.objects.filter(run=first).count() >= 40, timeout=45, what="first lines", logs=logs
    )
    run = services.run_create(
        user=owner, flow_version=flow.head, dataset=dataset, column_mapping=MAPPING, concurrency=4
    )
    queued_at_kill = RunChunk.objects.filter(run=run, status="Queued").count()
    redis_broker.kill()
    killed = time.monotonic()
    time.sleep(1.0)
    redis_broker.start()
    wait_for(lambda: _finished(run), timeout=40, what="the run to finish after the broker restart", logs=logs)
    recovered_in = time.monotonic() - killed

    assert queued_at_kill >= 2, "the broker must die while chunks wait in its queue"
    for done in (_finished(first), run):
        assert done is not None and done.status == RunStatus.COMPLETED, (done and done.error, logs())
        lines = LineResult.objects.filter(run=done)
        assert lines.count() == LINES
        assert not lines.values("line_number").annotate(n=Count("id")).filter(n__gt=1).exists()
        outputs = dict(lines.values_list("line_number", "outputs"))
        assert outputs == {n: recorded[n % len(rows)] for n in range(LINES)}
        assert done.done_lines == LINES and done.failed_lines == 0
    assert recovered_in < 30, recovered_in
    resent = [
        int(index)
        for text in RunLog.objects.filter(
            run=run, text__contains="the broker connection came back"
        ).values_list("text", flat=True)
        for index in text.removeprefix("chunks ").split(" sent again")[0].split(", ")
    ]
    # Both workers reconnected; each of run B's chunks was sent again by one of them only.
    assert sorted(resent) == sorted(RunChunk.objects.filter(run=run).values_list("index", flat=True)), (
        resent,
        logs(),
    )
