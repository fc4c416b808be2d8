import time
import pytest
from tests.flows_app.test_consumer_single_test import _connected, chat_flow, pytestmark  # noqa

async def test_timing(chat_flow, owner, fake_llm):
    fake_llm.config(latency_ms=100, token_ms=60, tokens=24)
    socket = await _connected(chat_flow.pk, owner)
    t0 = time.monotonic()
    await socket.send_json_to({"action": "run", "inputs": {"question": "Hi", "chat_history": []}})
    stamps = []
    while True:
        m = await socket.receive_json_from(timeout=30)
        stamps.append((round(time.monotonic() - t0, 3), m["type"], m.get("status"), m.get("duration_ms")))
        if m["type"] == "done":
            break
    print(stamps)
