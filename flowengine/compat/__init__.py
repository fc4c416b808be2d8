"""Compatibility with code written for prompt flow: a `promptflow` package used when prompt flow is not installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHIM_DIR = str(Path(__file__).resolve().parent)


def shim_path() -> str:
    """The directory that holds the `promptflow` shim package (put it on sys.path / PYTHONPATH)."""
    return SHIM_DIR


def install() -> bool:
    """Make `import promptflow` work: add the shim only when prompt flow itself cannot be imported.

    Returns True when the shim is (now) what `import promptflow` finds.
    """
    if SHIM_DIR in sys.path:
        return True
    if "promptflow" in sys.modules or importlib.util.find_spec("promptflow") is not None:
        return False
    # Appended, not prepended: a real prompt flow installed later in the process still wins.
    sys.path.append(SHIM_DIR)
    importlib.invalidate_caches()
    return True
