"""Fixtures of the runs tests: real `celery -A studio worker` processes sharing the test database and broker.

The workers are separate processes, so the test database must be one they can open: on SQLite a file in a
private folder of this session (the in-memory default is invisible to other processes), on PostgreSQL the
test database itself. The filesystem broker of the embedded default is moved to the same private folder,
so other test sessions on this machine never take our messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

REPO = Path(settings.BASE_DIR)
SESSION_DIR = Path(tempfile.mkdtemp(prefix="flowstudio-runs-tests-"))

if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Set before pytest-django creates the test database (it does so lazily, at the first database test).
    settings.DATABASES["default"].setdefault("TEST", {})
    if not settings.DATABASES["default"]["TEST"].get("NAME"):
        settings.DATABASES["default"]["TEST"]["NAME"] = str(SESSION_DIR / "test-studio.sqlite3")


def database_url_for_children() -> str:
    """The test database as a DATABASE_URL for worker processes."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        name = str(params["NAME"])
        if name == ":memory:" or name.startswith("file:memorydb"):
            raise AssertionError("the SQLite test database lives in memory; workers cannot share it")
        return f"sqlite:///{name}"
    user = quote(params.get("USER") or "", safe="")
    password = quote(params.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return (
        f"postgres://{auth}{params.get('HOST') or '127.0.0.1'}:{params.get('PORT') or 5432}/{params['NAME']}"
    )


def _stop(process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
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


@dataclass
class Worker:
    """One `celery worker` process (its pool children execute the chunks)."""

    name: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    cwd: Path
    log: Path

    def children(self) -> list[int]:
        """The pids of the worker's pool processes."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Field 4 of /proc/<pid>/stat is the parent pid (after the parenthesised command name).
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.process.pid:
                cmdline = (entry / "cmdline").read_bytes()
                if b"celery" in cmdline:
                    found.append(int(entry.name))
        return found

    def output(self) -> str:
        """What the worker printed so far (the tail)."""
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


@dataclass
class WorkerPool:
    """Starts workers for one test and stops them all afterwards."""

    env: dict[str, str]
    broker_dir: Path | None
    root: Path
    workers: list[Worker] = field(default_factory=list)

    def start(
        self,
        *,
        concurrency: int = 2,
        data_dir: Path | None = None,
        cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Worker:
        """Start one worker; `data_dir`/`cwd` give it a data folder and working directory of its own."""
        name = f"w{len(self.workers) + 1}"
        env = dict(self.env)
        folder = data_dir or (self.root / "worker-data")
        folder.mkdir(parents=True, exist_ok=True)
        if self.broker_dir is not None and folder != self.broker_dir.parent:
            # The filesystem broker stands in for a broker server both hosts can reach: share only it.
            link = folder / "broker"
            if not link.exists():
                link.symlink_to(self.broker_dir, target_is_directory=True)
        env["STUDIO_DATA_DIR"] = str(folder)
        env.update(extra_env or {})
        log = self.root / f"{name}.log"
        workdir = cwd or REPO
        with log.open("wb") as out:
            if not env.get("REDIS_URL") and not (folder / "channels.sqlite3").exists():
                # The embedded channel layer is a SQLite file per data dir: give it its tables.
                subprocess.run(
                    [sys.executable, "manage.py", "migrate", "--database", "channels", "--verbosity", "0"],
                    cwd=REPO,
                    env=env,
                    check=True,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=120,
                )
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "studio",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "-n",
                    f"{name}-{os.getpid()}@%h",
                ],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name=name, process=process, data_dir=folder, cwd=workdir, log=log)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        """Kill every worker and its runners."""
        for worker in self.workers:
            _stop(worker.process)

    def logs(self) -> str:
        """The tails of every worker's output, for assertion messages."""
        return "\n".join(f"--- {w.name}\n{w.output()}" for w in self.workers)


def _private_broker(root: Path) -> Path | None:
    """Point this process's Celery producer at a private filesystem broker folder (embedded default only)."""
    from studio.celery import app

    if not str(app.conf.broker_url or "").startswith("filesystem://"):
        return None
    broker = root / "worker-data" / "broker"
    for sub in ("queue", "processed", "control"):
        (broker / sub).mkdir(parents=True, exist_ok=True)
    app.conf.broker_transport_options = {
        "data_folder_in": str(broker / "queue"),
        "data_folder_out": str(broker / "queue"),
        "processed_folder": str(broker / "processed"),
        "control_folder": str(broker / "control"),
        "store_processed": False,
        "polling_interval": 0.2,
    }
    _reset_producers(app)
    return broker


def _reset_producers(app: Any) -> None:
    # Celery caches connections and producers made with the old options: drop them.
    from kombu import pools

    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def run_workers(transactional_db: None, tmp_path: Path) -> Iterator[WorkerPool]:
    """A factory of real Celery workers on the test database; `.start()` one or more."""
    from studio.celery import app

    root = Path(tempfile.mkdtemp(prefix="w-", dir=SESSION_DIR))
    saved = dict(app.conf.broker_transport_options or {})
    broker = _private_broker(root)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STUDIO_DATA_DIR")}
    env["DATABASE_URL"] = database_url_for_children()
    # Workers on "other hosts" must decrypt the same connection secrets.
    env["STUDIO_ENCRYPTION_KEYS"] = ",".join(settings.STUDIO_ENCRYPTION_KEYS)
    env["STUDIO_SECRET_KEY"] = settings.SECRET_KEY
    env["PYTHONUNBUFFERED"] = "1"
    pool = WorkerPool(env=env, broker_dir=broker, root=root)
    try:
        yield pool
    finally:
        pool.stop_all()
        app.conf.broker_transport_options = saved
        _reset_producers(app)
        shutil.rmtree(root, ignore_errors=True)


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str, logs: Callable[[], str] = str
) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` (and the workers' logs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs()}")
        time.sleep(0.1)


# --- flows and datasets the tests put into the studio ------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[1] / "data" / "flows"

SQUARE_DAG = """\
inputs:
  x:
    type: int
  pause:
    type: double
    default: 0.0
outputs:
  y:
    type: int
    reference: ${square.output}
nodes:
- name: square
  type: python
  source:
    type: code
    path: square.py
  inputs:
    x: ${inputs.x}
    pause: ${inputs.pause}
- name: total
  type: python
  source:
    type: code
    path: total.py
  inputs:
    ys: ${square.output}
  aggregation: true
"""

SQUARE_PY = """\
import asyncio
import os
import signal

from promptflow.core import tool


@tool
async def square(x: int, pause: float = 0.0) -> int:
    if pause:
        await asyncio.sleep(pause)
    if x == -1:
        # A line that kills its own runner process, every time it runs.
        os.kill(os.getpid(), signal.SIGKILL)
    if x == -2:
        raise ValueError("negative two is not welcome")
    return x * x
"""

TOTAL_PY = """\
from promptflow.core import log_metric, tool


@tool
def total(ys: list) -> dict:
    log_metric("sum", sum(ys))
    log_metric("lines", len(ys))
    return {"sum": sum(ys)}
"""


def square_files() -> dict[str, bytes]:
    """A pure-python DAG flow: y = x * x after an optional pause, with a sum metric."""
    return {
        "flow.dag.yaml": SQUARE_DAG.encode(),
        "square.py": SQUARE_PY.encode(),
        "total.py": TOTAL_PY.encode(),
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSON Lines."""
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def corpus_files(name: str) -> dict[str, bytes]:
    """A corpus flow folder's files, without its recordings."""
    from flows_app.services import files_from_folder

    files = files_from_folder(root=CORPUS / name)
    return {p: d for p, d in files.items() if p not in ("cases.json", "expected.json")}


def fake_openai_connection(owner: Any, fake_llm: Any) -> Any:
    """The owner's connection `fake_openai` (the corpus flows' name) on the fake LLM."""
    from flows_app.services import connection_create

    return connection_create(
        owner=owner,
        name="fake_openai",
        type="open_ai",
        configs={"base_url": fake_llm.base_url},
        secrets={"api_key": "sk-fake-openai-key"},
    )


def chat_flow_on(owner: Any, fake_llm: Any) -> Any:
    """The corpus flow dag_llm_chat as the owner's flow "chat", its connection `fake_openai` on the fake LLM."""
    from flows_app.services import flow_create

    fake_openai_connection(owner, fake_llm)
    return flow_create(owner=owner, name="chat", files=corpus_files("dag_llm_chat"))


def corpus_case(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """cases.json and expected.json of a corpus flow."""
    folder = CORPUS / name
    return json.loads((folder / "cases.json").read_text()), json.loads((folder / "expected.json").read_text())
