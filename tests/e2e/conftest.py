"""Browser-test fixtures: a real `manage.py runstudio` on a free port, and Debian's Chromium via Playwright."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# The browser tests run the embedded default whatever the surrounding shell points at.
SCALE_OUT_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "STUDIO_PUBLIC_URL",
)
SETUP_LINE = re.compile(r"Open (\S+/setup/\S+) to create the first admin account")
RUNNING_LINE = re.compile(r"Flow Studio is running at (\S+?)/? ")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningStudio:
    """A `manage.py runstudio` process and what it printed."""

    process: subprocess.Popen[str]
    data_dir: Path
    lines: list[str] = field(default_factory=list)
    url: str = ""
    setup_url: str = ""

    def output(self) -> str:
        """Everything the launcher and its children printed so far."""
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first printed line matching the pattern; fails with the output when it never comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = pattern.search(line)
                if match:
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"runstudio never printed {pattern.pattern!r}:\n{self.output()[-5000:]}")

    def shell(self, code: str, *, timeout: float = 120, **env: str) -> str:
        """Run Python `code` in `manage.py shell` on this studio's data (embedded default); returns its stdout."""
        environ = {k: v for k, v in os.environ.items() if k not in SCALE_OUT_VARIABLES}
        environ.update(env, STUDIO_DATA_DIR=str(self.data_dir))
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env=environ,
            check=True,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        return done.stdout


def start_studio(data_dir: Path, port: int) -> RunningStudio:
    """Start `manage.py runstudio` on a private data dir and port, draining its output in a thread."""
    env = {k: v for k, v in os.environ.items() if k not in SCALE_OUT_VARIABLES}
    env.update(
        STUDIO_DATA_DIR=str(data_dir), STUDIO_PORT=str(port), STUDIO_HOST="127.0.0.1", PYTHONUNBUFFERED="1"
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runstudio", "--concurrency", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    studio = RunningStudio(process=process, data_dir=data_dir)

    def drain() -> None:
        # The children share this pipe: it must be read all the time or they block on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            studio.lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return studio


def stop_studio(studio: RunningStudio, timeout: float = 30) -> int:
    """Ctrl-C equivalent (SIGTERM to the launcher), then make sure nothing of it is left."""
    if studio.process.poll() is None:
        studio.process.send_signal(signal.SIGTERM)
        try:
            studio.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(studio.process.pid, signal.SIGKILL)
            studio.process.wait()
    return studio.process.returncode


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStudio]:
    """A fresh studio (no users yet) with its web server and worker, for the tests of one module."""
    running = start_studio(tmp_path_factory.mktemp("studio-data"), free_port())
    try:
        running.setup_url = running.wait_for(SETUP_LINE, timeout=120).group(1)
        running.url = running.wait_for(RUNNING_LINE, timeout=60).group(1)
        yield running
    finally:
        stop_studio(running)


@pytest.fixture(scope="session")
def allow_sync_orm_under_playwright() -> Iterator[None]:
    """Let the tests' own ORM calls run while the browser is up, and only then.

    Playwright's sync API keeps an event loop running in the test thread (its dispatcher greenlet sits inside
    `run_until_complete`), so Django would refuse the tests' plain synchronous database calls as "called from
    an async context".
    """
    name = "DJANGO_ALLOW_ASYNC_UNSAFE"
    previous = os.environ.get(name)
    os.environ[name] = "true"
    yield
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


@pytest.fixture(scope="session")
def browser(allow_sync_orm_under_playwright: None) -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright's sync API (no browser download)."""
    from playwright.sync_api import sync_playwright

    deadline = time.monotonic() + 300
    while not CHROMIUM.exists():
        # CI installs chromium through apt; a machine being set up may still be installing it.
        if time.monotonic() > deadline:
            raise AssertionError(f"{CHROMIUM} is missing: install Debian's chromium package.")
        time.sleep(2)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    """A fresh browser context and page; closed after the test."""
    context = browser.new_context(viewport={"width": 1366, "height": 820})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()
