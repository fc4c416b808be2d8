"""/healthz: database, broker, channel layer and a real worker's answer."""

from __future__ import annotations

import time

import httpx
import pytest
from django.urls import reverse

pytestmark = pytest.mark.integration


def test_healthz_reports_the_worker_that_answered(live_worker_studio):
    deadline = time.monotonic() + 45
    while True:
        response = httpx.get(live_worker_studio.url + "/healthz?wait=3", timeout=30)
        report = response.json()
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 200, (report, live_worker_studio.log.read_text()[-3000:])
    assert report["status"] == "ok"
    assert set(report["checks"]) == {"database", "broker", "channel_layer", "workers"}
    assert all(check["ok"] for check in report["checks"].values())
    assert report["checks"]["workers"]["hostname"].startswith("celery@")


@pytest.mark.django_db(databases="__all__")
def test_healthz_is_503_and_names_the_missing_worker(client):
    response = client.get(reverse("healthz"), {"wait": "0.3"})

    assert response.status_code == 503
    report = response.json()
    assert report["status"] == "error"
    assert report["checks"]["database"]["ok"] is True
    assert report["checks"]["channel_layer"]["ok"] is True
    assert report["checks"]["workers"] == {
        "ok": False,
        "error": "no worker answered within 0.3 s",
        "ms": report["checks"]["workers"]["ms"],
    }


@pytest.mark.django_db(databases="__all__")
def test_healthz_needs_no_login_and_shows_no_secrets(client, settings):
    response = client.get(reverse("healthz"), {"wait": "0.1"})

    body = response.content.decode()
    assert response["Content-Type"] == "application/json"
    for secret in (settings.SECRET_KEY, *settings.STUDIO_ENCRYPTION_KEYS, str(settings.DATA_DIR)):
        assert secret not in body


def test_healthz_refuses_a_wait_that_is_not_a_number(client):
    for wait in ("soon", "nan", "inf"):
        response = client.get(reverse("healthz"), {"wait": wait})
        assert response.status_code == 400
        assert "wait" in response.json()["error"]
