#!/usr/bin/env python3
"""Run a command and sample its whole process tree: wall time, CPU time, peak tree RSS, peak process count.

usage: treemon.py [--interval 0.1] [--label X] -- cmd args...   (prints one JSON line)

Linux only: it reads /proc directly so that it needs nothing beyond the standard library. The tree RSS is
the sum of every process's resident set, so pages shared between processes are counted once per process.
CPU time comes from wait4() and covers the command and every descendant it waited for.

`monitor(extra_roots=...)` also counts processes outside the command's tree that work for it, such as a
fork server that outlives the command and the runners it forks: their memory joins the peak and their CPU
time (their own plus that of the children they reaped during the run) joins `cpu_s`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1048576.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class TreeSample:
    """What one monitored command used."""

    label: str
    wall_s: float
    rc: int
    cpu_s: float
    peak_tree_rss_mb: float
    peak_procs: int
    peak_memavail_drop_mb: float
    timed_out: bool = False
    extra_cpu_s: float = 0.0
    peak_by_kind: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)


def memavail_mb() -> float:
    """The system's MemAvailable in MB."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(name)] = int(fields[1])
    return out


def tree_pids(*roots: int) -> list[int]:
    """The root pids and all their live descendants (each pid once)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, None] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found[pid] = None
        todo.extend(children.get(pid, ()))
    return list(found)


def cpu_s(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds (user + system) of a process, plus those of its reaped children when asked; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def cmdline(pid: int) -> str:
    """The command line of a process, arguments separated by spaces ("" once gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    """Resident set of one process in MB (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE_MB
    except (OSError, IndexError, ValueError):
        return 0.0


def monitor(
    cmd: Sequence[str],
    *,
    label: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdout: IO[Any] | None = None,
    stderr: IO[Any] | None = None,
    timeout: float | None = None,
    interval: float = 0.1,
    extra_roots: Callable[[], Sequence[int]] | None = None,
    classify: Callable[[int], str | None] | None = None,
) -> TreeSample:
    """Run cmd to completion in its own session while sampling its process tree.

    extra_roots returns pids of helper processes outside the tree (asked at every sample); classify names
    the kind of a pid (or None), and the peak count of each kind is reported in peak_by_kind.
    """
    base_avail = memavail_mb()
    roots_before = {p: cpu_s(p, reaped=True) for p in (extra_roots() if extra_roots else ())}
    extra_seen: dict[int, float] = {}
    kinds: dict[int, str | None] = {}
    peak_by_kind: dict[str, int] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    peak = {"rss": 0.0, "procs": 0, "drop": 0.0}
    done = threading.Event()
    timed_out = threading.Event()

    def sample() -> None:
        while not done.is_set():
            roots = list(extra_roots()) if extra_roots else []
            pids = tree_pids(proc.pid, *roots)
            peak["rss"] = max(peak["rss"], sum(rss_mb(p) for p in pids))
            peak["procs"] = max(peak["procs"], len(pids))
            peak["drop"] = max(peak["drop"], base_avail - memavail_mb())
            for root in roots:
                roots_before.setdefault(root, 0.0)  # a helper started during the run counts from zero
            for p in tree_pids(*roots) if roots else ():
                if p not in roots_before:
                    extra_seen[p] = max(extra_seen.get(p, 0.0), cpu_s(p))
            if classify:
                counts: dict[str, int] = {}
                for p in pids:
                    if p not in kinds:
                        kinds[p] = classify(p)
                    kind = kinds[p]
                    if kind:
                        counts[kind] = counts.get(kind, 0) + 1
                for kind, n in counts.items():
                    peak_by_kind[kind] = max(peak_by_kind.get(kind, 0), n)
            done.wait(interval)

    def expire() -> None:
        if not done.wait(timeout):
            timed_out.set()
            # the command runs in its own session: its group holds the whole tree it started
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if timeout is not None:
        threading.Thread(target=expire, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    done.set()
    sampler.join()
    # Helpers' children reaped during the run are in their parent's reaped-children time; those still
    # alive count with their last sampled time (the sampler may miss their last interval).
    extra_cpu = 0.0
    for root, before in roots_before.items():
        extra_cpu += max(0.0, cpu_s(root, reaped=True) - before)
    alive = set(tree_pids(*roots_before)) if roots_before else set()
    extra_cpu += sum(max(t, cpu_s(p)) for p, t in extra_seen.items() if p in alive)
    return TreeSample(
        label=label,
        wall_s=round(wall, 3),
        rc=rc,
        cpu_s=round(usage.ru_utime + usage.ru_stime + extra_cpu, 3),
        peak_tree_rss_mb=round(peak["rss"], 1),
        peak_procs=peak["procs"],
        peak_memavail_drop_mb=round(peak["drop"], 1),
        timed_out=timed_out.is_set(),
        extra_cpu_s=round(extra_cpu, 3),
        peak_by_kind=peak_by_kind,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: monitor the command after `--` and print one JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    interval, label = 0.1, ""
    while args and args[0] != "--":
        if args[0] == "--interval" and len(args) > 1:
            interval, args = float(args[1]), args[2:]
        elif args[0] == "--label" and len(args) > 1:
            label, args = args[1], args[2:]
        else:
            print(__doc__, file=sys.stderr)
            return 2
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    result = monitor(args[1:], label=label, interval=interval)
    print(json.dumps(result.to_dict()), flush=True)
    return result.rc


if __name__ == "__main__":
    sys.exit(main())
