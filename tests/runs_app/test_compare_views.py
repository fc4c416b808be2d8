"""The compare page, its parts, exports and "what changed", and the rich run list: allowed, outsider, anonymous
and htmx paths."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from django.test import Client
from django.urls import reverse

from flows_app.services import flow_save
from runs_app.models import LineResult, Run
from runs_app.services import run_create
from tests.runs_app.compare_data import answer_files, build_comparison, output_of

pytestmark = pytest.mark.django_db

LINES = 60
HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def runs(owner):
    """Two variant runs of 60 lines and an evaluation of each, owned by the owner."""
    return build_comparison(owner, lines=LINES)


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _query(runs, **extra) -> dict[str, str]:
    return {"runs": ",".join(str(r.pk) for r in runs.all), **extra}


# --- the compare page ---------------------------------------------------------------------------------------


def test_owner_sees_runs_side_by_side_with_the_baseline_marked(owner, runs):
    response = _client(owner).get(reverse("runs:compare"), _query(runs))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Compare 2 runs" in html and "with 2 evaluation runs" in html
    assert output_of(0, 0)["answer"] in html
    assert "data-baseline" in html
    assert 'data-metric="accuracy"' in html
    assert f"a={runs.v0.pk}&amp;b={runs.v1.pk}" in html


def test_different_mode_shows_the_number_of_lines_that_differ(owner, runs):
    response = _client(owner).get(reverse("runs:compare"), _query(runs, mode="different"))

    expected = sum(1 for i in range(LINES) if output_of(0, i) != output_of(1, i))
    assert f'data-count="{expected}"' in response.content.decode()


def test_htmx_gets_only_the_rows_when_it_targets_them(owner, runs):
    response = _client(owner).get(
        reverse("runs:compare"), _query(runs, mode="failures"), HTTP_HX_TARGET="compare-rows", **HTMX
    )

    html = response.content.decode()
    assert html.lstrip().startswith('<div id="compare-rows"')
    assert "<html" not in html
    assert 'data-status="Failed"' in html


@pytest.mark.parametrize("part", ["counts", "charts"])
def test_htmx_parts_are_fragments(owner, runs, part):
    response = _client(owner).get(reverse("runs:compare"), _query(runs, part=part), **HTMX)

    html = response.content.decode()
    assert response.status_code == 200
    assert f'id="compare-{part}"' in html and "<html" not in html


def test_chart_data_is_passed_as_json_script(owner, runs):
    response = _client(owner).get(
        reverse("runs:compare"), _query(runs, part="charts", num="score:score"), **HTMX
    )

    html = response.content.decode()
    data = json.loads(html.split('id="compare-chart-data" type="application/json">')[1].split("</script>")[0])
    assert data["bars"]["labels"] == ["mean_length", "accuracy"]
    assert data["histogram"]["column"] == "score: score"


def test_one_run_is_refused_with_a_reason(owner, runs):
    response = _client(owner).get(reverse("runs:compare"), {"runs": str(runs.v0.pk)})

    assert response.status_code == 400
    assert "at least 2 runs" in response.content.decode()


def test_outsider_gets_404_when_any_run_of_the_set_is_not_theirs(owner, outsider, runs):
    mine = build_comparison(outsider, lines=3, prefix="theirs")
    query = {"runs": f"{mine.v0.pk},{mine.v1.pk},{runs.v1.pk}"}

    assert _client(outsider).get(reverse("runs:compare"), query).status_code == 404
    assert _client(outsider).get(reverse("runs:compare_csv"), query).status_code == 404
    assert (
        _client(outsider).get(reverse("runs:compare"), {"runs": f"{mine.v0.pk},{mine.v1.pk}"}).status_code
        == 200
    )


def test_teammate_compares_runs_of_a_flow_shared_with_the_team(owner, teammate, runs):
    from accounts_app.models import Team
    from flows_app.services import flow_share

    flow_share(flow=runs.v0.flow, team=Team.objects.get(name="core"), role="viewer", by=owner)
    evaluator = runs.e0.flow
    flow_share(flow=evaluator, team=Team.objects.get(name="core"), role="viewer", by=owner)

    assert _client(teammate).get(reverse("runs:compare"), _query(runs)).status_code == 200


@pytest.mark.parametrize(
    "name", ["runs:compare", "runs:compare_csv", "runs:compare_json", "runs:compare_changes"]
)
def test_anonymous_is_sent_to_login(runs, name):
    response = _client().get(reverse(name), _query(runs))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


# --- exports ------------------------------------------------------------------------------------------------


def _cell(value):
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _independent_join(runs, numbers=None) -> pd.DataFrame:
    """The comparison computed straight from the line results with pandas merges, one frame per run."""
    frames = []
    keys = {runs.v0.pk: ["answer", "length"], runs.v1.pk: ["answer", "length"]}
    keys.update({runs.e0.pk: ["score", "grade"], runs.e1.pk: ["score", "grade"]})
    inputs = pd.DataFrame(
        [
            {
                "line_number": line.line_number,
                "inputs.question": line.inputs["question"],
                "inputs.n": _cell(line.inputs["n"]),
            }
            for line in LineResult.objects.filter(run=runs.v0)
        ]
    )
    for run in runs.all:
        rows = []
        for line in LineResult.objects.filter(run=run):
            row = {"line_number": line.line_number, f"{run.name}.status": line.status}
            for key in keys[run.pk]:
                row[f"{run.name}.outputs.{key}"] = _cell(line.outputs.get(key))
            row[f"{run.name}.error"] = (line.error or {}).get("message", "")
            row[f"{run.name}.duration_ms"] = _cell(line.duration_ms)
            row[f"{run.name}.total_tokens"] = _cell(line.usage.get("total_tokens"))
            rows.append(row)
        frames.append(pd.DataFrame(rows))
    joined = inputs
    for frame in frames:
        joined = joined.merge(frame, on="line_number", how="outer")
    joined = joined.sort_values("line_number").reset_index(drop=True).fillna("")
    if numbers is not None:
        joined = joined[joined["line_number"].isin(numbers)].reset_index(drop=True)
    joined["line_number"] = joined["line_number"].astype(str)
    return joined


def _read_csv(content: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(content), dtype=str, keep_default_na=False)


def test_csv_export_equals_the_join_computed_independently_with_pandas(owner, runs):
    response = _client(owner).get(reverse("runs:compare_csv"), _query(runs))

    assert response["Content-Type"].startswith("text/csv")
    exported = _read_csv(b"".join(response.streaming_content))
    expected = _independent_join(runs)
    pd.testing.assert_frame_equal(exported, expected[exported.columns.tolist()], check_dtype=False)
    assert sorted(exported.columns) == sorted(expected.columns)


def test_csv_export_keeps_the_mode_and_the_search_of_the_page(owner, runs):
    response = _client(owner).get(reverse("runs:compare_csv"), _query(runs, mode="different"))

    exported = _read_csv(b"".join(response.streaming_content))
    differing = [i for i in range(LINES) if output_of(0, i) != output_of(1, i)]
    expected = _independent_join(runs, numbers=differing)
    pd.testing.assert_frame_equal(exported, expected[exported.columns.tolist()], check_dtype=False)


def test_json_export_is_an_array_of_the_same_rows(owner, runs):
    response = _client(owner).get(reverse("runs:compare_json"), _query(runs, q="question 7"))

    rows = json.loads(b"".join(response.streaming_content))
    assert [row["line_number"] for row in rows] == [7]
    assert rows[0][f"{runs.v1.name}.outputs.answer"] == output_of(1, 7)["answer"]


# --- what changed -------------------------------------------------------------------------------------------


def test_what_changed_shows_file_and_dag_diffs_between_two_runs_snapshots(owner, runs):
    flow = runs.v0.flow
    version = flow_save(
        flow=flow, user=owner, files=answer_files(suffix="!"), message="louder", based_on=flow.head.number
    )
    newer = run_create(
        user=owner,
        flow_version=version,
        dataset=runs.v1.dataset,
        column_mapping=runs.v1.column_mapping,
        variant="${answer.variant_1}",
    )

    response = _client(owner).get(reverse("runs:compare_changes"), {"a": str(runs.v1.pk), "b": str(newer.pk)})

    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-path="answer_alt.py"' in html
    assert "+ &#x27;!&#x27;" in html or "+ '!'" in html


def test_what_changed_between_two_variants_names_the_variant(owner, runs):
    response = _client(owner).get(
        reverse("runs:compare_changes"), {"a": str(runs.v0.pk), "b": str(runs.v1.pk)}
    )

    html = response.content.decode()
    assert "data-same-snapshot" in html
    assert 'data-setting="variant"' in html


def test_outsider_gets_404_for_what_changed(outsider, runs):
    response = _client(outsider).get(
        reverse("runs:compare_changes"), {"a": str(runs.v0.pk), "b": str(runs.v1.pk)}
    )

    assert response.status_code == 404


# --- the run list -------------------------------------------------------------------------------------------


def test_run_list_has_selection_boxes_and_the_chosen_metric_columns(owner, runs):
    response = _client(owner).get(reverse("runs:list"), {"cols": "status,m:accuracy"})

    html = response.content.decode()
    assert f'data-select-run value="{runs.v0.pk}"' in html
    assert 'data-metric-column="accuracy"' in html
    assert "<th>Flow</th>" not in html
    assert str(runs.e0.metrics["accuracy"]) in html


def test_run_list_filters_by_date(owner, runs):
    Run.objects.filter(pk=runs.v0.pk).update(created_at="2020-01-02T10:00:00Z")

    response = _client(owner).get(reverse("runs:list"), {"until": "2020-01-31"}, **HTMX)

    html = response.content.decode()
    assert f'value="{runs.v0.pk}"' in html
    assert f'value="{runs.v1.pk}"' not in html


def test_archiving_a_selection_archives_only_the_users_runs(owner, outsider, runs):
    theirs = build_comparison(outsider, lines=2, prefix="other")

    response = _client(owner).post(
        reverse("runs:archive_selected"), {"runs": [str(runs.v0.pk), str(runs.v1.pk)]}, **HTMX
    )

    assert response.status_code == 200
    assert set(Run.objects.filter(archived=True).values_list("pk", flat=True)) == {runs.v0.pk, runs.v1.pk}
    assert (
        _client(owner).post(reverse("runs:archive_selected"), {"runs": [str(theirs.v0.pk)]}).status_code
        == 404
    )
    assert not Run.objects.get(pk=theirs.v0.pk).archived


def test_a_foreign_run_in_the_selection_404s_and_archives_nothing(owner, outsider, runs):
    theirs = build_comparison(outsider, lines=2, prefix="other")

    response = _client(owner).post(
        reverse("runs:archive_selected"),
        {"runs": [str(runs.v0.pk), str(theirs.v0.pk), str(runs.v1.pk)]},
        **HTMX,
    )

    assert response.status_code == 404
    assert not Run.objects.filter(archived=True).exists()


def test_anonymous_cannot_archive_a_selection(runs):
    response = _client().post(reverse("runs:archive_selected"), {"runs": [str(runs.v0.pk)]})

    assert response.status_code == 302
    assert not Run.objects.get(pk=runs.v0.pk).archived
