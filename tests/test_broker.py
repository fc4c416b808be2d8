"""The embedded broker: a message enters its queue folder only once it is written whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kombu import Connection

from studio import broker


@pytest.fixture
def channel(tmp_path: Path):
    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    conn = Connection(
        "filesystem://",
        transport="studio.broker:FilesystemTransport",
        transport_options={
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
        },
    )
    yield conn.channel(), folders["queue"]
    conn.release()


def test_a_worker_polling_while_a_message_is_written_finds_nothing_to_take(channel, monkeypatch):
    # A worker that took a message file before it was written read it empty and stopped with an unrecoverable
    # error. While the message is written, the queue folder must show no message file.
    chan, queue_folder = channel
    seen_while_writing: list[list[str]] = []
    real_open = open

    class Watched:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            seen_while_writing.append(sorted(n for n in os.listdir(queue_folder) if n.endswith(".msg")))
            return self.file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(broker, "open", lambda *a, **kw: Watched(real_open(*a, **kw)), raising=False)
    chan._put("celery", {"body": "chunk 7", "headers": {}})

    assert seen_while_writing == [[]]
    assert [name.endswith(".msg") for name in os.listdir(queue_folder)] == [True]
    assert chan._get("celery") == {"body": "chunk 7", "headers": {}}


def test_the_embedded_default_sends_its_messages_through_this_transport():
    from studio.celery import app

    transports = {type(app.connection_for_write().transport), type(app.connection_for_read().transport)}
    if str(app.conf.broker_url).startswith("filesystem://"):
        assert transports == {broker.FilesystemTransport}
    else:  # scale-out: the broker's own transport
        assert not any(issubclass(t, broker.FilesystemTransport) for t in transports)


def test_messages_come_out_in_the_order_they_were_sent(channel):
    # A run's chunks are sent one after the other, often in the same millisecond: they must come out in order.
    chan, _queue_folder = channel
    for number in range(200):
        chan._put("celery", {"body": f"chunk {number}", "headers": {}})

    assert [chan._get("celery")["body"] for _ in range(200)] == [f"chunk {n}" for n in range(200)]
