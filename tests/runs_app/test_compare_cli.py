"""`flowstudio run visualize` for local runs: a static HTML comparison with word diffs, and opening a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flowengine.runs import RunRecord, RunStore
from flowengine.visualize import word_diff_html

REPO = Path(__file__).resolve().parents[2]


def _local_run(store: RunStore, name: str, answers: list[str], metrics: dict) -> None:
    store.save(RunRecord(name=name, flow="f", status="Completed", total_lines=len(answers)))
    folder = store.path(name)
    details = [
        {"line_number": i, "status": "Completed", "inputs": {"q": f"q{i}"}, "outputs": {"answer": a}}
        for i, a in enumerate(answers)
    ]
    (folder / "details.jsonl").write_text("".join(json.dumps(d) + "\n" for d in details))
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_word_diff_marks_added_and_removed_words_and_escapes_html():
    assert word_diff_html("the <b>cat</b> sat", "the <b>dog</b> sat") == (
        "the &lt;b&gt;<del>cat</del><ins>dog</ins>&lt;/b&gt; sat"
    )
    assert word_diff_html("same", "same") is None


def test_visualize_writes_a_static_comparison_of_local_runs(tmp_path: Path):
    store = RunStore(tmp_path)
    _local_run(store, "base", ["a red fox", "hello"], {"accuracy": 0.5})
    _local_run(store, "other", ["a brown fox", "hello"], {"accuracy": 0.75})
    env = {**os.environ, "FLOWSTUDIO_HOME": str(tmp_path), "BROWSER": "true"}
    env.pop("FLOWSTUDIO_SERVER", None)

    done = subprocess.run(
        [sys.executable, "-m", "flowengine.cli", "run", "visualize", "-n", "base", "other"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip().splitlines()[-1])
    html = page.read_text()
    assert page.parent == store.path("base")
    assert "<del>red</del><ins>brown</ins>" in html
    assert "0.75" in html


def test_open_in_browser_uses_the_browser_the_user_set(tmp_path: Path):
    seen = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    script.chmod(0o755)
    code = "import sys; from flowengine.visualize import open_in_browser; sys.exit(0 if open_in_browser(sys.argv[1]) else 3)"
    env = {**os.environ, "BROWSER": str(script)}

    done = subprocess.run(
        [sys.executable, "-c", code, "http://studio.test/runs/compare?runs=a,b"],
        env=env,
        cwd=REPO,
        timeout=60,
    )

    assert done.returncode == 0
    assert seen.read_text().strip() == "http://studio.test/runs/compare?runs=a,b"


def test_visualize_at_a_terminal_opens_the_page_and_in_a_pipeline_does_not(tmp_path: Path):
    import pty

    store = RunStore(tmp_path)
    _local_run(store, "base", ["a red fox"], {"accuracy": 0.5})
    _local_run(store, "other", ["a brown fox"], {"accuracy": 0.75})
    seen = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    script.chmod(0o755)
    env = {**os.environ, "FLOWSTUDIO_HOME": str(tmp_path), "BROWSER": str(script)}
    for name in ("FLOWSTUDIO_SERVER", "CI"):
        env.pop(name, None)
    command = [sys.executable, "-m", "flowengine.cli", "run", "visualize", "-n", "base", "other"]

    piped = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert not seen.exists()

    primary, secondary = pty.openpty()
    at_terminal = subprocess.run(command, cwd=REPO, env=env, stdout=secondary, stderr=secondary, timeout=60)
    os.close(secondary)
    os.close(primary)
    assert at_terminal.returncode == 0
    assert seen.read_text().strip() == (store.path("base") / "visualize.html").resolve().as_uri()
