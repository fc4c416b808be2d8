"""`manage.py runs_reap`: requeue chunks of dead workers once, or every few seconds with --loop."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from runs_app.services import run_reap_stale


class Command(BaseCommand):
    """Run the reaper that workers also run on their own (for cron, or a host without workers)."""

    help = "Requeue chunks whose worker stopped heartbeating and finish cancels and aggregations left behind."

    def add_arguments(self, parser: CommandParser) -> None:
        """--stale-after and --loop."""
        parser.add_argument("--stale-after", type=float, default=None, help="seconds without a heartbeat")
        parser.add_argument("--loop", type=float, default=None, help="repeat every this many seconds")

    def handle(self, *args: Any, **options: Any) -> None:
        """Reap once (or forever with --loop) and print how many chunks or runs were acted on."""
        while True:
            acted = run_reap_stale(stale_after=options["stale_after"])
            self.stdout.write(f"requeued or finished {acted} chunk(s) or run(s)")
            if options["loop"] is None:
                return
            time.sleep(options["loop"])
