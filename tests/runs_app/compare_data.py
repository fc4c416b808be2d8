"""Runs to compare, built through the services with bulk-created line results (no flow is executed).

`build_comparison(owner, lines=N)` makes a flow with two variants of its `answer` node, an evaluation flow,
a dataset of N rows, one run per variant and one evaluation run of each, all Completed, with deterministic
outputs so tests can compute the expected comparison independently. Used by the selector, view and browser
tests and by bench/compare_bench.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.db import transaction

ANSWER_DAG = """\
inputs:
  question:
    type: string
  n:
    type: int
outputs:
  answer:
    type: string
    reference: ${answer.output}
  length:
    type: int
    reference: ${measure.output}
nodes:
- name: answer
  use_variants: true
- name: measure
  type: python
  source:
    type: code
    path: measure.py
  inputs:
    text: ${answer.output}
node_variants:
  answer:
    default_variant_id: variant_0
    variants:
      variant_0:
        node:
          type: python
          source:
            type: code
            path: answer.py
          inputs:
            question: ${inputs.question}
      variant_1:
        node:
          type: python
          source:
            type: code
            path: answer_alt.py
          inputs:
            question: ${inputs.question}
"""

EVAL_DAG = """\
inputs:
  answer:
    type: string
  n:
    type: int
outputs:
  score:
    type: double
    reference: ${grade.output.score}
  grade:
    type: string
    reference: ${grade.output.grade}
nodes:
- name: grade
  type: python
  source:
    type: code
    path: grade.py
  inputs:
    answer: ${inputs.answer}
    n: ${inputs.n}
"""

PY = """\
from promptflow.core import tool


@tool
def {name}({arg}):
    return {body}
"""


def answer_files(*, suffix: str = "") -> dict[str, bytes]:
    """The answer flow's files; `suffix` changes answer_alt.py so two versions differ in one file."""
    return {
        "flow.dag.yaml": ANSWER_DAG.encode(),
        "answer.py": PY.format(name="answer", arg="question: str", body="question.upper()").encode(),
        "answer_alt.py": PY.format(
            name="answer_alt", arg="question: str", body=f"question.lower() + {suffix!r}"
        ).encode(),
        "measure.py": PY.format(name="measure", arg="text: str", body="len(text)").encode(),
    }


def eval_files() -> dict[str, bytes]:
    """The evaluation flow's files."""
    body = "{'score': float(n % 3 != 0), 'grade': 'good' if n % 3 else 'bad'}"
    return {
        "flow.dag.yaml": EVAL_DAG.encode(),
        "grade.py": PY.format(name="grade", arg="answer: str, n: int", body=body).encode(),
    }


def output_of(variant: int, i: int) -> dict[str, Any] | None:
    """Line i's outputs in variant 0 or 1; None when the line failed. Variant 1 differs on every fifth line."""
    if (variant == 0 and i % 97 == 3) or (variant == 1 and i % 89 == 5):
        return None
    if variant == 1 and i % 5 == 0:
        return {"answer": f"the reply to question {i} is {(i + 1) % 7}", "length": (i + 1) % 7}
    return {"answer": f"the answer to question {i} is {i % 7}", "length": i % 7}


def score_of(variant: int, i: int) -> float:
    """The evaluation score of line i of a variant: variant 1 flips the score on every fifth line."""
    base = float(i % 3 != 0)
    return 1.0 - base if variant == 1 and i % 5 == 0 else base


def usage_of(variant: int, i: int) -> dict[str, int]:
    """Token usage of line i."""
    prompt, completion = 10 + i % 3, 5 + i % 4 + variant
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def duration_of(variant: int, i: int) -> float:
    """Line i's duration in milliseconds."""
    return float(100 + i % 50) if variant == 0 else float(90 + i % 60)


@dataclass
class ComparisonRuns:
    """The four runs of a comparison: two variants and an evaluation of each."""

    v0: Any
    v1: Any
    e0: Any
    e1: Any
    lines: int

    @property
    def all(self) -> list[Any]:
        """The runs in the order a comparison lists them."""
        return [self.v0, self.v1, self.e0, self.e1]


def _bulk_lines(run: Any, rows: list[dict[str, Any]]) -> None:
    from runs_app.models import LineResult

    LineResult.objects.bulk_create([LineResult(run=run, **row) for row in rows], batch_size=2000)


def _complete(run: Any, *, metrics: dict[str, Any], lines: int, failed: int, tokens: dict[str, int]) -> None:
    from django.utils import timezone

    from runs_app.models import Run, RunChunk

    now = timezone.now()
    RunChunk.objects.filter(run=run).update(status="Done", finished_at=now)
    Run.objects.filter(pk=run.pk).update(
        status="Completed",
        started_at=now,
        finished_at=now,
        total_lines=lines,
        done_lines=lines,
        failed_lines=failed,
        metrics=metrics,
        tokens=tokens,
    )
    run.refresh_from_db()


def build_comparison(owner: Any, *, lines: int = 40, prefix: str = "cmp") -> ComparisonRuns:
    """Two variant runs over `lines` rows and an evaluation run of each, Completed, with deterministic lines."""
    from flows_app.services import flow_create
    from runs_app.services import dataset_create, run_create, run_evaluate

    with transaction.atomic():
        flow = flow_create(owner=owner, name=f"{prefix}_answer", files=answer_files())
        evaluator = flow_create(owner=owner, name=f"{prefix}_grader", files=eval_files())
        rows = [{"question": f"question {i}", "n": i} for i in range(lines)]
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        dataset = dataset_create(owner=owner, name=f"{prefix}_data", filename="data.jsonl", data=data)
        mapping = {"question": "${data.question}", "n": "${data.n}"}
        made = []
        for variant in (0, 1):
            run = run_create(
                user=owner,
                flow_version=flow.head,
                dataset=dataset,
                column_mapping=mapping,
                variant=f"${{answer.variant_{variant}}}",
                name=f"{prefix}_variant_{variant}",
                tags={"experiment": prefix},
            )
            line_rows, failed, total_tokens = [], 0, 0
            for i, row in enumerate(rows):
                outputs = output_of(variant, i)
                usage = usage_of(variant, i)
                total_tokens += usage["total_tokens"]
                failed += outputs is None
                line_rows.append(
                    {
                        "line_number": i,
                        "status": "Completed" if outputs is not None else "Failed",
                        "inputs": row,
                        "outputs": outputs or {},
                        "error": None
                        if outputs is not None
                        else {"type": "ValueError", "message": f"line {i} failed", "node": "answer"},
                        "duration_ms": duration_of(variant, i),
                        "usage": usage,
                    }
                )
            _bulk_lines(run, line_rows)
            completed = [output_of(variant, i) for i in range(lines) if output_of(variant, i) is not None]
            _complete(
                run,
                metrics={"mean_length": sum(o["length"] for o in completed) / max(len(completed), 1)},
                lines=lines,
                failed=failed,
                tokens={"total_tokens": total_tokens},
            )
            made.append(run)
        evaluations = []
        for variant, run in enumerate(made):
            evaluation = run_evaluate(
                user=owner,
                run=run,
                flow_version=evaluator.head,
                column_mapping={"answer": "${run.outputs.answer}", "n": "${data.n}"},
                name=f"{prefix}_eval_{variant}",
                tags={"experiment": prefix},
            )
            numbers = [i for i in range(lines) if output_of(variant, i) is not None]
            _bulk_lines(
                evaluation,
                [
                    {
                        "line_number": i,
                        "status": "Completed",
                        "inputs": {"answer": output_of(variant, i)["answer"], "n": i},
                        "outputs": {
                            "score": score_of(variant, i),
                            "grade": "good" if score_of(variant, i) else "bad",
                        },
                        "duration_ms": 5.0,
                        "usage": {},
                    }
                    for i in numbers
                ],
            )
            scores = [score_of(variant, i) for i in numbers]
            _complete(
                evaluation,
                metrics={"accuracy": sum(scores) / max(len(scores), 1)},
                lines=len(numbers),
                failed=0,
                tokens={},
            )
            evaluations.append(evaluation)
    return ComparisonRuns(v0=made[0], v1=made[1], e0=evaluations[0], e1=evaluations[1], lines=lines)


def remove_owner(owner: Any) -> None:
    """Delete a user with their runs, datasets and flows (runs first: they protect their datasets)."""
    from runs_app.models import Dataset, Run

    Run.objects.filter(owner=owner).delete()
    Dataset.objects.filter(owner=owner).delete()
    owner.delete()
