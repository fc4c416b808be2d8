#!/usr/bin/env python3
"""Compare-page benchmark: three 20,000-line runs (variant_0, variant_1 and an evaluation of variant_0) and
the same at 2,000 lines, in a scratch SQLite database migrated from scratch under a temporary STUDIO_DATA_DIR.

The runs are made through the services with bulk-created line results (tests/runs_app/compare_data.py). Server
time is measured in-process with Django's test client (no network), as the median of several requests:

  (a) the compare page's first page, mode All (target <= 300 ms at 20,000 lines);
  (b) the first page of the Different and Regressions modes, the htmx rows fragment, the mode counts and the
      charts part (reported, no target: the page loads counts and charts after the first paint);
  (c) memory: the tracemalloc peak of one first-page request at 2,000 and at 20,000 lines (target: the 20,000
      line peak within 1.5x of the 2,000 line peak, i.e. memory does not grow with the number of lines).

Results: bench/results/compare.md. Exit status 0 only when every target is met.
usage: compare_bench.py [--lines N] [--reps N] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_MS = 300.0
TARGET_MEMORY_RATIO = 1.5
SMALL = 2_000


def _setup_django(scratch: Path) -> None:
    # Settings read the environment once, at import: point them at the scratch folder first.
    os.environ["STUDIO_DATA_DIR"] = str(scratch)
    os.environ.pop("DATABASE_URL", None)
    os.environ["STUDIO_ALLOWED_HOSTS"] = "testserver,127.0.0.1,localhost"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _build(owner: Any, lines: int, prefix: str) -> list[Any]:
    from tests.runs_app.compare_data import build_comparison

    built = build_comparison(owner, lines=lines, prefix=prefix)
    # Three runs: both variants and the evaluation of the first (which scores it line by line).
    return [built.v0, built.v1, built.e0]


def _timed(client: Any, url: str, reps: int, **headers: Any) -> tuple[float, int]:
    samples = []
    size = 0
    for _ in range(reps):
        start = time.perf_counter()
        response = client.get(url, **headers)
        samples.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (url, response.status_code)
        size = len(response.content)
    return statistics.median(samples), size


def _peak(client: Any, url: str) -> int:
    client.get(url)  # warm caches (templates, compiled queries) so the peak is the request's own
    tracemalloc.start()
    tracemalloc.reset_peak()
    client.get(url)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> int:
    """Run the benchmark and write bench/results/compare.md."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="compare-bench-"))
    try:
        _setup_django(scratch)
        from django.contrib.auth import get_user_model
        from django.test import Client
        from django.urls import reverse

        owner = get_user_model().objects.create_user(username="bench", password="bench-pass-123!")
        start = time.perf_counter()
        big = _build(owner, args.lines, "big")
        small = _build(owner, SMALL, "small")
        build_s = time.perf_counter() - start
        client = Client()
        client.force_login(owner)
        base = reverse("runs:compare")

        def url(runs: list[Any], extra: str = "") -> str:
            return f"{base}?runs={','.join(str(r.pk) for r in runs)}{extra}"

        rows: list[tuple[str, float, int]] = []
        first_ms, first_size = _timed(client, url(big), args.reps)
        rows.append(("first page, All (full page)", first_ms, first_size))
        htmx = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "compare-rows"}
        for label, extra, headers in [
            ("first page, Different (full page)", "&mode=different", {}),
            ("first page, Regressions (full page)", "&mode=regressions", {}),
            ("page 200, All (htmx rows)", "&page=200", htmx),
            ("search 'question 12345' (htmx rows)", "&q=question+12345", htmx),
            ("mode counts (htmx part)", "&part=counts", {"HTTP_HX_REQUEST": "true"}),
            ("charts (htmx part)", "&part=charts", {"HTTP_HX_REQUEST": "true"}),
        ]:
            ms, size = _timed(client, url(big, extra), args.reps, **headers)
            rows.append((label, ms, size))
        peak_small = _peak(client, url(small))
        peak_big = _peak(client, url(big))
        ratio = peak_big / peak_small if peak_small else float("inf")
        ok_time = first_ms <= TARGET_MS
        ok_memory = ratio <= TARGET_MEMORY_RATIO
        lines = [
            "# Compare page benchmark",
            "",
            f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · Python {platform.python_version()} · "
            f"{platform.machine()} · {os.cpu_count()} CPUs · SQLite (embedded default) · `bench/compare_bench.py`",
            "",
            f"Three runs of {args.lines:,} lines each (variant_0, variant_1 and an evaluation of variant_0), "
            f"line results bulk-created through the services (setup {build_s:.1f} s, not measured). Server time "
            f"is in-process through Django's test client, the median of {args.reps} requests.",
            "",
            "| request | median ms | response bytes |",
            "|---|---:|---:|",
            *[f"| {label} | {ms:.1f} | {size:,} |" for label, ms, size in rows],
            "",
            f"**First page: {first_ms:.1f} ms** (target ≤ {TARGET_MS:.0f} ms): {'met' if ok_time else 'NOT met'}.",
            "",
            "Memory (tracemalloc peak of one first-page request):",
            "",
            "| lines per run | peak KiB |",
            "|---:|---:|",
            f"| {SMALL:,} | {peak_small / 1024:,.0f} |",
            f"| {args.lines:,} | {peak_big / 1024:,.0f} |",
            "",
            f"Ratio {ratio:.2f} (target ≤ {TARGET_MEMORY_RATIO}): {'met' if ok_memory else 'NOT met'} — the page "
            "reads a sample of 50 lines per run for the keys, one page of line numbers and only that page's line "
            "results; the join, modes and counts run in SQL.",
            "",
        ]
        out = HERE / "results" / "compare.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines), encoding="utf-8")
        sys.stdout.write("\n".join(lines) + f"\nwritten to {out}\n")
        return 0 if ok_time and ok_memory else 1
    finally:
        if args.keep:
            sys.stdout.write(f"scratch kept in {scratch}\n")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
