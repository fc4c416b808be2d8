"""Engine test helpers: write small flow folders from text."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "flows"


@pytest.fixture
def write_flow(tmp_path: Path) -> Callable[..., Path]:
    """Write `files` (name -> text, dedented) into a fresh flow folder and return the folder."""
    counter = iter(range(1000))

    def write(files: dict[str, str], name: str | None = None) -> Path:
        folder = tmp_path / (name or f"flow{next(counter)}")
        for rel, text in files.items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return folder

    return write
