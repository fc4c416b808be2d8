"""The browser tests' environment: Django's async-safety switch is the browser fixture's business alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_a_browser_test_module_leaves_django_async_safety_on(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(DJANGO_SETTINGS_MODULE="studio.settings", STUDIO_DATA_DIR=str(tmp_path))
    code = (
        "import os, django; django.setup(); import tests.e2e.test_authoring; "
        "print(os.environ.get('DJANGO_ALLOW_ASYNC_UNSAFE'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
