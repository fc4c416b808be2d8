"""The comparison selectors: the join by line, display modes, deltas, paging and the run list's columns."""

from __future__ import annotations

import pytest
from django.db import connection
from django.http import Http404
from django.test.utils import CaptureQueriesContext

from runs_app import selectors
from runs_app.models import LineResult
from runs_app.selectors import CompareError, run_compare
from tests.runs_app.compare_data import build_comparison, duration_of, output_of, remove_owner, score_of

pytestmark = pytest.mark.django_db

LINES = 2000


@pytest.fixture(scope="module")
def runs(django_db_setup, django_db_blocker):
    """Two variant runs of 2,000 lines and an evaluation of each, built once for the module (their owner is the
    `analyst`), removed afterwards."""
    from django.contrib.auth import get_user_model

    with django_db_blocker.unblock():
        analyst = get_user_model().objects.create_user(username="analyst", password="analyst-pass-123!")
        built = build_comparison(analyst, lines=LINES, prefix="sel")
    yield built
    with django_db_blocker.unblock():
        remove_owner(analyst)


@pytest.fixture
def owner(runs):
    """The owner of the runs under test."""
    return runs.v0.owner


def _compare(owner, runs, **kw):
    return run_compare(owner, runs=[str(r.pk) for r in runs.all], **kw)


def _numbers(cmp) -> list[int]:
    return list(selectors._compare_numbers(cmp))


def test_evaluation_runs_attach_to_their_base_runs_and_the_first_run_is_the_baseline(owner, runs):
    cmp = _compare(owner, runs)

    assert [r.pk for r in cmp.mains] == [runs.v0.pk, runs.v1.pk]
    assert cmp.baseline.pk == runs.v0.pk
    assert [r.pk for r in cmp.evals[runs.v0.pk].values()] == [runs.e0.pk]
    assert [r.pk for r in cmp.evals[runs.v1.pk].values()] == [runs.e1.pk]
    assert cmp.input_keys == ["question", "n"]
    assert cmp.output_keys == ["answer", "length"]
    assert [(s.label, s.numeric) for s in cmp.scores] == [("score", True), ("grade", False)]


def test_rows_join_outputs_and_scores_of_each_run_by_line(owner, runs):
    cmp = _compare(owner, runs)
    row = selectors.run_compare_rows(cmp, [10])[0]

    assert row["inputs"] == [("question", "question 10"), ("n", "10")]
    base, other = row["cells"]
    assert [o["text"] for o in base["outputs"]] == [
        output_of(0, 10)["answer"],
        str(output_of(0, 10)["length"]),
    ]
    assert [o["text"] for o in other["outputs"]] == [
        output_of(1, 10)["answer"],
        str(output_of(1, 10)["length"]),
    ]
    assert base["scores"][0]["text"] == str(score_of(0, 10))
    assert other["scores"][0]["text"] == str(score_of(1, 10))
    # Line 10 of variant 1 is a changed answer: a word diff against the baseline and a worse score.
    assert "<ins>reply</ins>" in str(other["outputs"][0]["diff"])
    assert "<del>answer</del>" in str(other["outputs"][0]["diff"])
    assert other["scores"][0]["delta"]["cls"] == "delta-worse"
    assert other["flag"] == "regression"
    assert other["latency_delta"]["value"] == duration_of(1, 10) - duration_of(0, 10)


def test_different_mode_keeps_exactly_the_lines_whose_outputs_or_status_differ(owner, runs):
    cmp = _compare(owner, runs, mode="different")

    expected = [i for i in range(LINES) if output_of(0, i) != output_of(1, i)]
    assert _numbers(cmp) == expected
    assert selectors.run_compare_page(cmp).paginator.count == len(expected)


def test_failures_regressions_and_improvements_follow_status_and_scores(owner, runs):
    def expect(worse: bool) -> list[int]:
        found = []
        for i in range(LINES):
            ok0, ok1 = output_of(0, i) is not None, output_of(1, i) is not None
            if ok0 and ok1:
                hit = score_of(1, i) < score_of(0, i) if worse else score_of(1, i) > score_of(0, i)
            else:
                hit = (ok0 and not ok1) if worse else (ok1 and not ok0)
            if hit:
                found.append(i)
        return found

    failures = [i for i in range(LINES) if output_of(0, i) is None or output_of(1, i) is None]
    assert _numbers(_compare(owner, runs, mode="failures")) == failures
    assert _numbers(_compare(owner, runs, mode="regressions")) == expect(worse=True)
    assert _numbers(_compare(owner, runs, mode="improvements")) == expect(worse=False)


def test_mode_counts_come_from_one_pass_and_match_the_modes(owner, runs):
    cmp = _compare(owner, runs)
    counts = selectors.run_compare_counts(cmp)

    assert counts["all"] == LINES
    for mode in ("different", "failures", "regressions", "improvements"):
        assert counts[mode] == len(_numbers(_compare(owner, runs, mode=mode))), mode


def test_choosing_the_other_baseline_swaps_regressions_and_improvements(owner, runs):
    regressions = _numbers(_compare(owner, runs, mode="regressions"))
    swapped = _numbers(_compare(owner, runs, mode="improvements", baseline=str(runs.v1.pk)))

    assert swapped == regressions


def test_search_filters_lines_by_inputs_or_outputs(owner, runs):
    cmp = _compare(owner, runs, q="question 1234")

    assert _numbers(cmp) == [1234]
    assert _numbers(_compare(owner, runs, q="the reply to question 15 ")) == [15]


def test_pages_hold_fifty_lines_and_cost_a_fixed_number_of_queries(owner, runs):
    cmp = _compare(owner, runs, page=3)
    with CaptureQueriesContext(connection) as queries:
        context = selectors.run_compare_context(cmp)

    assert [row["number"] for row in context["rows"]] == list(range(100, 150))
    assert context["page"].paginator.count == LINES
    assert len(queries) <= 10, [q["sql"][:120] for q in queries]


def test_metrics_table_has_each_metric_with_its_delta_to_the_baseline(owner, runs):
    cmp = _compare(owner, runs)
    rows = {row["key"]: row for row in selectors.run_compare_metrics(cmp)["rows"]}

    assert set(rows) == {"mean_length", "accuracy"}
    base, other = rows["accuracy"]["cells"]
    assert base["delta"] is None
    expected = runs.e1.metrics["accuracy"] - runs.e0.metrics["accuracy"]
    assert other["delta"]["value"] == pytest.approx(expected)


def test_charts_give_bars_a_histogram_and_a_sampled_scatter(owner, runs):
    cmp = _compare(owner, runs, num="out:length")
    charts = selectors.run_compare_charts(cmp)

    assert charts["bars"]["labels"] == ["mean_length", "accuracy"]
    histogram = charts["histogram"]
    completed0 = sum(1 for i in range(LINES) if output_of(0, i) is not None)
    assert sum(histogram["datasets"][0]["data"]) == completed0
    points = charts["scatter"]["points"]
    assert 0 < len(points) <= 1000
    for point in points[:20]:
        assert point["x"] == output_of(0, point["line"])["length"]
        assert point["y"] == output_of(1, point["line"])["length"]


def test_a_comparison_needs_two_to_ten_runs(owner, runs):
    with pytest.raises(CompareError):
        run_compare(owner, runs=[str(runs.v0.pk)])
    with pytest.raises(CompareError):
        run_compare(owner, runs=[str(i) for i in range(11)])


def test_an_outsider_gets_404_for_a_set_with_any_run_not_theirs(owner, outsider, runs):
    with pytest.raises(Http404):
        _compare(outsider, runs)


def test_run_list_columns_offer_every_metric_key_and_show_the_chosen_ones(owner, runs):
    listed = list(selectors.run_list_for(owner))
    columns = selectors.run_list_columns(listed, cols=["status", "m:accuracy"])

    ids = [c["id"] for c in columns["columns"]]
    assert "m:accuracy" in ids and "m:mean_length" in ids
    assert columns["shown"] == {"status", "m:accuracy"}
    evaluation = next(r for r in listed if r.pk == runs.e0.pk)
    assert evaluation.list_metrics == [str(runs.e0.metrics["accuracy"])]


def test_cost_comes_from_the_price_table_of_the_runs_model(owner, runs, settings):
    settings.STUDIO_MODEL_PRICES = '{"gpt-test": {"input": 1000000, "output": 2000000}}'
    span = {"kind": "llm", "inputs": {"model": "gpt-test"}, "span_id": "s"}
    LineResult.objects.filter(run__in=[runs.v0, runs.v1], line_number=0).update(trace=[span])
    cmp = _compare(owner, runs)
    cell = selectors.run_compare_rows(cmp, [1])[0]["cells"][0]

    usage = LineResult.objects.get(run=runs.v0, line_number=1).usage
    assert cell["cost"] == f"${usage['prompt_tokens'] + 2 * usage['completion_tokens']}"
