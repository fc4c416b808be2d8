"""`manage.py runstudio` (what `make run` calls): prepare the data, then run daphne and a Celery worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts_app.services import setup_token_create


@dataclass
class Child:
    """A process the launcher started, in its own process group."""

    label: str
    process: subprocess.Popen[bytes]


class Command(BaseCommand):
    """Migrate, collect static files, print the first-user link, and supervise the web server and a worker."""

    help = (
        "Start Flow Studio on this machine: migrate, collect static files, print a one-time setup link when "
        "there is no user yet, then run the web server (daphne) and a Celery worker until Ctrl-C."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Host, port, worker concurrency and the stop timeout."""
        parser.add_argument("--host", default=settings.STUDIO_HOST, help="address to bind (STUDIO_HOST)")
        parser.add_argument(
            "--port", type=int, default=settings.STUDIO_PORT, help="port to bind (STUDIO_PORT)"
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=settings.CELERY_WORKER_CONCURRENCY,
            help="worker processes (STUDIO_WORKER_CONCURRENCY)",
        )
        parser.add_argument(
            "--stop-timeout", type=float, default=10.0, help="seconds to wait for a clean stop before killing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Prepare, start, supervise; exits non-zero when a child died on its own."""
        host, port = options["host"], options["port"]
        self._ensure_port_free(host, port)
        self._prepare()
        base_url = self._base_url(host, port)
        if not get_user_model()._default_manager.exists():
            token = setup_token_create()
            self._say(f"Open {base_url}/setup/{token} to create the first admin account")
        children = self._start(host, port, options["concurrency"])
        stop_requested: list[int] = []

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop_requested.append(signum)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = self._supervise(children, stop_requested, base_url, host, port)
        finally:
            self._stop(children, options["stop_timeout"])
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failed:
            raise CommandError(f"{failed} stopped unexpectedly; the studio was shut down.", returncode=1)
        self._say("Flow Studio stopped.")

    def _say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    @staticmethod
    def _base_url(host: str, port: int) -> str:
        if "STUDIO_PUBLIC_URL" in os.environ:
            return settings.STUDIO_PUBLIC_URL
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}"

    @staticmethod
    def _ensure_port_free(host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise CommandError(
                    f"Cannot listen on {host}:{port} ({exc.strerror}); another program uses it. "
                    "Set STUDIO_PORT (or --port) to a free port."
                ) from None

    def _prepare(self) -> None:
        started = time.monotonic()
        call_command("migrate", interactive=False, verbosity=0)
        if "channels" in settings.DATABASES:
            call_command("migrate", database="channels", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        self._say(f"Database and static files ready ({time.monotonic() - started:.1f} s).")

    def _start(self, host: str, port: int, concurrency: int) -> list[Child]:
        python = sys.executable
        commands = [
            (
                "web server (daphne)",
                [python, "-m", "daphne", "-b", host, "-p", str(port), "studio.asgi:application"],
            ),
            (
                "Celery worker",
                [
                    python,
                    "-m",
                    "celery",
                    "-A",
                    "studio",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    "--loglevel",
                    "INFO",
                ],
            ),
        ]
        children = []
        for label, command in commands:
            # A session of its own: Ctrl-C reaches only this launcher, which then stops each group in order.
            process = subprocess.Popen(command, cwd=settings.BASE_DIR, start_new_session=True)
            children.append(Child(label=label, process=process))
        return children

    def _supervise(
        self, children: list[Child], stop_requested: list[int], base_url: str, host: str, port: int
    ) -> str | None:
        announced = False
        while not stop_requested:
            for child in children:
                code = child.process.poll()
                if code is not None:
                    self.stderr.write(f"The {child.label} exited with code {code}; stopping the others.")
                    return child.label
            if not announced and self._listening(host, port):
                announced = True
                self._say(f"Flow Studio is running at {base_url}/ (Ctrl-C stops it)")
            time.sleep(0.2)
        return None

    @staticmethod
    def _listening(host: str, port: int) -> bool:
        target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        try:
            socket.create_connection((target, port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def _stop(self, children: list[Child], timeout: float) -> None:
        running = [c for c in children if c.process.poll() is None]
        if running:
            self._say("Stopping " + ", ".join(c.label for c in running) + " ...")
        for child in running:
            # The leader alone: Celery's main process stops its pool itself (a signal to the whole group
            # would kill pool processes under it mid-task).
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for child in running:
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"The {child.label} did not stop within {timeout:g} s; killing it.")
        # Worker pool processes and anything else left in the groups go too.
        for child in children:
            self._signal_group(child, signal.SIGKILL)
            child.process.wait()

    @staticmethod
    def _signal_group(child: Child, signum: int) -> None:
        try:
            os.killpg(child.process.pid, signum)
        except ProcessLookupError:
            pass
