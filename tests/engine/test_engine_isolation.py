"""The engine stands apart from Django: importing all of it must not import Django."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_engine_does_not_import_django():
    code = (
        "import importlib, pkgutil, sys\n"
        "import flowengine\n"
        "for mod in pkgutil.walk_packages(flowengine.__path__, 'flowengine.'):\n"
        "    if '.compat' in mod.name or mod.name.endswith('__main__'):\n"
        "        continue\n"
        "    importlib.import_module(mod.name)\n"
        "print('django' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr
