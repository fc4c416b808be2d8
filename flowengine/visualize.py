"""Side-by-side views of runs without a server: the word diff the studio's compare page also uses, and the
static HTML page `flowstudio run visualize` writes for local runs.

Pure Python (no Django): the studio imports `word_diff_html` from here so both render diffs the same way.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Word diffs of longer texts would cost more than they show; beyond this they are left out.
MAX_DIFF_CHARS = 20_000
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _TOKENS.findall(text)


def word_diff_html(old: str, new: str) -> str | None:
    """`new` as escaped HTML with the words added since `old` in <ins> and the removed ones in <del>.

    None when the texts are equal or too long to diff.
    """
    if old == new or len(old) + len(new) > 2 * MAX_DIFF_CHARS:
        return None
    a, b = _tokens(old), _tokens(new)
    parts: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            parts.append(html.escape("".join(a[i1:i2])))
            continue
        if tag in ("delete", "replace"):
            parts.append(f"<del>{html.escape(''.join(a[i1:i2]))}</del>")
        if tag in ("insert", "replace"):
            parts.append(f"<ins>{html.escape(''.join(b[j1:j2]))}</ins>")
    return "".join(parts)


def shown(value: Any) -> str:
    """A JSON value as tables show it: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5rem;color:#1f2328}} table{{border-collapse:collapse;width:100%}}
th,td{{border:1px solid #d0d7de;padding:.35rem .5rem;vertical-align:top;text-align:left}}
th{{background:#f6f8fa;position:sticky;top:0}} td.failed{{background:#fff1f0}} .muted{{color:#656d76}}
ins{{background:#dafbe1;text-decoration:none}} del{{background:#ffebe9}} pre{{margin:0;white-space:pre-wrap}}
</style></head><body>
<h1>{title}</h1>
<p class="muted">Baseline: <strong>{baseline}</strong>. Word differences are against the baseline's output.</p>
<h2>Metrics</h2>{metrics}
<h2>Lines</h2>{lines}
</body></html>
"""


def static_comparison_html(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, Any]]],
) -> str:
    """One HTML page comparing local runs: `runs` is [(name, details rows, metrics)], the first is the baseline.

    Lines are joined by line number; each run's outputs sit side by side with a word diff against the baseline.
    """
    names = [name for name, _, _ in runs]
    by_run = [{int(d["line_number"]): d for d in details if "line_number" in d} for _, details, _ in runs]
    numbers = sorted(set().union(*[set(lines) for lines in by_run]))
    metric_keys: list[str] = []
    for _, _, metrics in runs:
        metric_keys += [k for k in metrics if k not in metric_keys]
    metric_rows = "".join(
        "<tr><th>{}</th>{}</tr>".format(
            html.escape(key),
            "".join(f"<td>{html.escape(shown(metrics.get(key, '')))}</td>" for _, _, metrics in runs),
        )
        for key in metric_keys
    )
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    metrics_table = (
        f"<table><tr><th>metric</th>{head}</tr>{metric_rows}</table>"
        if metric_keys
        else "<p class='muted'>No metrics.</p>"
    )
    rows = []
    for number in numbers:
        base = by_run[0].get(number) or {}
        line = next((lines[number] for lines in by_run if number in lines), {})
        inputs = "<br>".join(
            f"<span class='muted'>{html.escape(k)}:</span> {html.escape(shown(v))}"
            for k, v in (line.get("inputs") or {}).items()
        )
        cells = []
        for index, lines in enumerate(by_run):
            detail = lines.get(number)
            if detail is None:
                cells.append("<td class='muted'>no line</td>")
                continue
            if detail.get("status") != "Completed":
                message = (detail.get("error") or {}).get("message", "failed")
                cells.append(f"<td class='failed'>{html.escape(str(message))}</td>")
                continue
            parts = []
            for key, value in (detail.get("outputs") or {}).items():
                text = shown(value)
                old = (base.get("outputs") or {}).get(key)
                diff = None
                if index and isinstance(value, str) and isinstance(old, str):
                    diff = word_diff_html(old, value)
                parts.append(
                    f"<div><span class='muted'>{html.escape(key)}:</span> "
                    f"<pre>{diff if diff is not None else html.escape(text)}</pre></div>"
                )
            cells.append(f"<td>{''.join(parts)}</td>")
        rows.append(f"<tr><td>{number}</td><td>{inputs}</td>{''.join(cells)}</tr>")
    lines_table = f"<table><tr><th>line</th><th>inputs</th>{head}</tr>{''.join(rows)}</table>"
    return _PAGE.format(
        title=html.escape("Comparison of " + ", ".join(names)),
        baseline=html.escape(names[0]),
        metrics=metrics_table,
        lines=lines_table,
    )


def open_in_browser(url: str) -> bool:
    """Open `url` in the user's browser when one is available ($BROWSER or a registered one); never fails."""
    import webbrowser

    try:
        return bool(webbrowser.get().open(url))
    except webbrowser.Error:
        return False
