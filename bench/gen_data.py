#!/usr/bin/env python3
"""Write N rows of {"question": ...} to a JSON-lines dataset: gen_data.py N OUT"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path


def write_questions(n: int, out: str | Path) -> Path:
    """Write n distinct questions (with uneven spacing, which the flows normalise) and return the path."""
    path = Path(out)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"Question {i}: what is {i} squared,  plus   one?"}) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[0].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    write_questions(int(args[0]), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
