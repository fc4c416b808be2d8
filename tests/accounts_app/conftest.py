"""Fixtures of the accounts tests: a staff persona and a real Celery worker with daphne in front of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.conf import settings
from django.db import connection

REPO = Path(settings.BASE_DIR)


@pytest.fixture
def staff(django_user_model):
    """A staff member: may invite users and manage every team."""
    return django_user_model.objects.create_user(username="staff", password="staff-pass-123!", is_staff=True)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _database_url_for_children() -> str | None:
    """The test database as a URL for subprocesses; None for SQLite, whose test database lives in memory."""
    params = connection.settings_dict
    if connection.vendor != "postgresql":
        return None
    user = quote(params.get("USER") or "", safe="")
    password = quote(params.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return (
        f"postgres://{auth}{params.get('HOST') or '127.0.0.1'}:{params.get('PORT') or 5432}/{params['NAME']}"
    )


@dataclass
class LiveStudio:
    """daphne and a Celery worker running as subprocesses on a private data directory."""

    url: str
    data_dir: Path
    log: Path


def _stop(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signum)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture
def live_worker_studio(tmp_path: Path, django_db_setup: None, django_db_blocker) -> Iterator[LiveStudio]:
    """A real `celery -A studio worker` and daphne sharing the configured broker, on a temporary data dir."""
    data_dir = tmp_path / "studio-data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STUDIO_DATA_DIR")}
    env["STUDIO_DATA_DIR"] = str(data_dir)
    with django_db_blocker.unblock():
        database_url = _database_url_for_children()
    if database_url:
        env["DATABASE_URL"] = database_url
    log = tmp_path / "studio.log"
    python = sys.executable
    with log.open("wb") as out:
        if not env.get("REDIS_URL"):
            # The embedded channel layer is a SQLite database: give the private data dir its tables.
            subprocess.run(
                [python, "manage.py", "migrate", "--database", "channels", "--verbosity", "0"],
                cwd=REPO,
                env=env,
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        port = free_port()
        worker = subprocess.Popen(
            [python, "-m", "celery", "-A", "studio", "worker", "--concurrency", "1", "--loglevel", "INFO"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        web = subprocess.Popen(
            [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "studio.asgi:application"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/healthz?wait=0.1", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or web.poll() is not None:
                    raise AssertionError("daphne did not start:\n" + log.read_text()) from None
                time.sleep(0.2)
        yield LiveStudio(url=url, data_dir=data_dir, log=log)
    finally:
        # Nothing of this worker needs to finish, and a warm shutdown takes seconds.
        _stop(worker, signal.SIGKILL)
        _stop(web, signal.SIGTERM)
