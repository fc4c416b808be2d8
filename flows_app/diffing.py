"""Text differences for the history, diff and conflict pages: file-level unified diffs and a three-way merge.

Pure functions over file contents (bytes or str); the views render their results, the diff page's long tables
through `diff_table_html`.
"""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from django.utils.safestring import SafeString, mark_safe

CONTEXT_LINES = 3
# Beyond this many lines a file's diff is summarised instead of rendered, so one huge file cannot stall a page.
MAX_DIFF_LINES = 20_000

RowKind = Literal["hunk", "ctx", "add", "del"]


@dataclass(frozen=True)
class DiffRow:
    """One rendered line of a unified diff, with its line numbers on either side."""

    kind: RowKind
    text: str
    old_no: int | None = None
    new_no: int | None = None

    # Ready-to-print cells: a page of diffs renders thousands of rows, and template filters per cell add up.
    @property
    def sign(self) -> str:
        """The diff marker of the row: '+', '-' or a space."""
        return _SIGNS.get(self.kind, " ")

    @property
    def old_label(self) -> str:
        """The old line number as text, empty when the row has none."""
        return "" if self.old_no is None else str(self.old_no)

    @property
    def new_label(self) -> str:
        """The new line number as text, empty when the row has none."""
        return "" if self.new_no is None else str(self.new_no)


_SIGNS = {"add": "+", "del": "-"}


@dataclass
class FileChange:
    """How one file differs between two versions."""

    path: str
    status: Literal["added", "removed", "modified"]
    binary: bool = False
    too_large: bool = False
    rows: list[DiffRow] = field(default_factory=list)
    added: int = 0
    removed: int = 0


def decode_text(data: bytes | None) -> str | None:
    """The UTF-8 text of a file, or None when it is binary (has NUL bytes or is not UTF-8)."""
    if data is None:
        return ""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def unified_rows(old: str, new: str, *, context: int = CONTEXT_LINES) -> list[DiffRow]:
    """The rows of a unified diff from `old` to `new`, grouped in hunks with `context` lines around changes."""
    a = old.splitlines()
    b = new.splitlines()
    rows: list[DiffRow] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        rows.append(
            DiffRow(
                "hunk",
                f"@@ -{first[1] + 1},{last[2] - first[1]} +{first[3] + 1},{last[4] - first[3]} @@",
            )
        )
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows.extend(DiffRow("ctx", a[i], i + 1, j1 + (i - i1) + 1) for i in range(i1, i2))
                continue
            rows.extend(DiffRow("del", a[i], old_no=i + 1) for i in range(i1, i2))
            rows.extend(DiffRow("add", b[j], new_no=j + 1) for j in range(j1, j2))
    return rows


_ROW_HTML = (
    '<tr class="diff-{}"><td class="ln">{}</td><td class="ln">{}</td>'
    '<td class="code"><span class="sign">{}</span>{}</td></tr>\n'
)
_HUNK_HTML = '<tr class="diff-hunk"><td class="ln"></td><td class="ln"></td><td class="code">{}</td></tr>\n'


def diff_table_html(rows: Iterable[DiffRow]) -> SafeString:
    """The rows as the `diff-table` markup of flows_app/_diff_table.html, every text escaped.

    Built in Python because a diff page can hold thousands of rows and the template engine costs tens of
    microseconds per row; the markup is the template's, so styles and scripts treat both alike.
    """
    out = ['<table class="diff-table"><tbody>\n']
    for row in rows:
        text = html.escape(row.text)
        if row.kind == "hunk":
            out.append(_HUNK_HTML.format(text))
        else:
            out.append(_ROW_HTML.format(row.kind, row.old_label, row.new_label, row.sign, text))
    if len(out) == 1:
        out.append('<tr><td class="muted empty-row">No change.</td></tr>\n')
    out.append("</tbody></table>")
    # Every piece of text above went through html.escape; the rest is fixed markup.
    return mark_safe("".join(out))


def file_changes(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> list[FileChange]:
    """Every file added, removed or modified from `old` to `new`, sorted by path, with its diff rows."""
    changes: list[FileChange] = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        status: Literal["added", "removed", "modified"] = (
            "added" if before is None else "removed" if after is None else "modified"
        )
        change = FileChange(path=path, status=status)
        old_text, new_text = decode_text(before), decode_text(after)
        if old_text is None or new_text is None:
            change.binary = True
        elif old_text.count("\n") + new_text.count("\n") > MAX_DIFF_LINES:
            change.too_large = True
        else:
            change.rows = unified_rows(old_text, new_text)
            change.added = sum(1 for row in change.rows if row.kind == "add")
            change.removed = sum(1 for row in change.rows if row.kind == "del")
        changes.append(change)
    return changes


def unified_text(old: str, new: str, *, old_name: str = "a", new_name: str = "b") -> str:
    """A plain `diff -u` style text (for downloads and copy-paste)."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), fromfile=old_name, tofile=new_name
        )
    )


@dataclass(frozen=True)
class MergeResult:
    """The outcome of a three-way merge: the merged text and how many regions conflict (marked in the text)."""

    text: str
    conflicts: int


def _edits(base: list[str], other: list[str]) -> list[tuple[int, int, list[str]]]:
    matcher = difflib.SequenceMatcher(None, base, other, autojunk=False)
    return [(i1, i2, other[j1:j2]) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def _apply(base: list[str], start: int, end: int, edits: list[tuple[int, int, list[str]]]) -> list[str]:
    out: list[str] = []
    position = start
    for i1, i2, lines in edits:
        out.extend(base[position:i1])
        out.extend(lines)
        position = i2
    out.extend(base[position:end])
    return out


def _touches(start: int, end: int, i1: int, i2: int) -> bool:
    if i1 < end and start < i2:
        return True
    # Insertions at the same place, or an insertion at the edge of a replaced region, are ambiguous in order.
    return i1 == i2 and start <= i1 <= end or start == end and i1 <= start <= i2


def merge3(
    base: str, ours: str, theirs: str, *, ours_label: str = "yours", theirs_label: str = "theirs"
) -> MergeResult:
    """Merge two edits of `base` line by line; regions both sides changed differently get conflict markers."""
    base_lines = base.splitlines(keepends=True)
    ours_edits = [(*e, "ours") for e in _edits(base_lines, ours.splitlines(keepends=True))]
    theirs_edits = [(*e, "theirs") for e in _edits(base_lines, theirs.splitlines(keepends=True))]
    edits = sorted(ours_edits + theirs_edits, key=lambda e: (e[0], e[1]))
    out: list[str] = []
    conflicts = 0
    position = 0
    index = 0
    while index < len(edits):
        start, end = edits[index][0], edits[index][1]
        group = [edits[index]]
        index += 1
        while index < len(edits) and _touches(start, end, edits[index][0], edits[index][1]):
            start, end = min(start, edits[index][0]), max(end, edits[index][1])
            group.append(edits[index])
            index += 1
        out.extend(base_lines[position:start])
        position = end
        mine = [(i1, i2, lines) for i1, i2, lines, side in group if side == "ours"]
        other = [(i1, i2, lines) for i1, i2, lines, side in group if side == "theirs"]
        ours_region = _apply(base_lines, start, end, mine)
        theirs_region = _apply(base_lines, start, end, other)
        if not mine or not other or ours_region == theirs_region:
            out.extend(theirs_region if not mine else ours_region)
            continue
        conflicts += 1
        out.append(f"<<<<<<< {ours_label}\n")
        out.extend(_terminated(ours_region))
        out.append("=======\n")
        out.extend(_terminated(theirs_region))
        out.append(f">>>>>>> {theirs_label}\n")
    out.extend(base_lines[position:])
    return MergeResult(text="".join(out), conflicts=conflicts)


def _terminated(lines: list[str]) -> list[str]:
    if lines and not lines[-1].endswith("\n"):
        return [*lines[:-1], lines[-1] + "\n"]
    return lines


_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


def rows_from_unified(text: str) -> list[DiffRow]:
    """The rows of a `diff -u` text, with line numbers, for rendering (file headers dropped)."""
    rows: list[DiffRow] = []
    old_no = new_no = 0
    for line in text.splitlines():
        if line.startswith(("--- ", "+++ ")) and not rows:
            continue
        match = _HUNK_RE.match(line)
        if match:
            old_no, new_no = int(match.group(1)), int(match.group(2))
            rows.append(DiffRow("hunk", line))
        elif line.startswith("+"):
            rows.append(DiffRow("add", line[1:], new_no=new_no))
            new_no += 1
        elif line.startswith("-"):
            rows.append(DiffRow("del", line[1:], old_no=old_no))
            old_no += 1
        elif line.startswith(" "):
            rows.append(DiffRow("ctx", line[1:], old_no, new_no))
            old_no += 1
            new_no += 1
    return rows
