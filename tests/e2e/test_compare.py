"""Comparing runs in the browser: pick them in the run list, switch display modes, read the baseline deltas and
reopen the view from its URL.

Runs against a real `manage.py runstudio` in Debian's Chromium. The runs (variant_0, variant_1 and an evaluation
of each) are made through the studio's services with bulk-created line results; no flow is executed.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.test_first_user import ensure_admin
from tests.runs_app.compare_data import output_of

pytestmark = pytest.mark.e2e

LINES = 120


def _seed_runs(studio, prefix: str) -> dict:
    """Build the four runs in the studio's database as the admin; returns their ids, names and metrics."""
    code = (
        "import json, os\n"
        "from django.contrib.auth import get_user_model\n"
        "from tests.runs_app.compare_data import build_comparison\n"
        "admin = get_user_model().objects.get(username='admin')\n"
        "built = build_comparison(admin, lines=int(os.environ['SEED_LINES']), prefix=os.environ['SEED_PREFIX'])\n"
        "print('SEEDED ' + json.dumps({k: {'id': str(r.pk), 'name': r.name, 'metrics': r.metrics}\n"
        "    for k, r in zip(('v0', 'v1', 'e0', 'e1'), built.all)}))\n"
    )
    stdout = studio.shell(code, timeout=180, SEED_LINES=str(LINES), SEED_PREFIX=prefix)
    line = next(line for line in stdout.splitlines() if line.startswith("SEEDED "))
    return json.loads(line[len("SEEDED ") :])


def _wait_rows(page, mode: str) -> int:
    page.wait_for_selector(f"#compare-rows[data-mode={mode}]")
    return int(page.locator("[data-row-count]").inner_text())


def test_three_runs_compare_by_line_with_baseline_deltas_and_a_reproducible_url(studio, page):
    ensure_admin(studio, page)
    runs = _seed_runs(studio, "e2e")

    page.goto(studio.url + "/runs/?tag=experiment%3De2e")
    for key in ("v0", "v1", "e0", "e1"):
        page.locator(f"input[data-select-run][value='{runs[key]['id']}']").check()
    assert page.locator("[data-selected-count]").inner_text() == "4 selected"
    page.locator("[data-compare-selected]").click()
    page.wait_for_url(re.compile(r".*/runs/compare\?runs=.*"))
    assert _wait_rows(page, "all") == LINES

    # The baseline's deltas in the metrics table are the differences of the runs' metrics.
    accuracy = page.locator("tr[data-metric=accuracy]")
    expected = runs["e1"]["metrics"]["accuracy"] - runs["e0"]["metrics"]["accuracy"]
    shown = float(
        accuracy.locator(f"td[data-run='{runs['v1']['id']}'] [data-delta]").get_attribute("data-delta")
    )
    assert shown == pytest.approx(expected)
    length = page.locator("tr[data-metric=mean_length]")
    expected = runs["v1"]["metrics"]["mean_length"] - runs["v0"]["metrics"]["mean_length"]
    shown = float(
        length.locator(f"td[data-run='{runs['v1']['id']}'] [data-delta]").get_attribute("data-delta")
    )
    assert shown == pytest.approx(expected)

    # "Different" keeps exactly the lines whose outputs differ, and the mode counts agree.
    differing = sum(1 for i in range(LINES) if output_of(0, i) != output_of(1, i))
    assert page.locator("[data-mode-count=different] dd").inner_text() == str(differing)
    page.locator("#compare-mode").select_option("different")
    assert _wait_rows(page, "different") == differing
    page.wait_for_url(re.compile(r".*mode=different.*"))
    first_lines = page.locator("#compare-rows tbody tr").evaluate_all("rows => rows.map(r => r.dataset.line)")
    assert first_lines[0] == str(next(i for i in range(LINES) if output_of(0, i) != output_of(1, i)))
    assert page.locator("#compare-rows .word-diff ins").count() > 0

    # The charts draw from the json_script data.
    page.wait_for_selector("#chart-histogram")
    page.wait_for_function(
        "window.Chart && Chart.getChart(document.getElementById('chart-histogram')) !== undefined"
    )

    # The URL reopens the same view.
    url = page.url
    other = page.context.new_page()
    other.goto(url)
    assert _wait_rows(other, "different") == differing
    assert other.locator("#compare-mode").input_value() == "different"
    again = other.locator("#compare-rows tbody tr").evaluate_all("rows => rows.map(r => r.dataset.line)")
    assert again == first_lines
    other.close()

    # Export links carry the same state.
    assert "mode=different" in page.locator("[data-export=csv]").get_attribute("href")
