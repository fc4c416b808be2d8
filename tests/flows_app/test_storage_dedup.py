"""Deduplication: 200 versions of a 50-file flow cost at most twice the bytes of its distinct contents."""

from __future__ import annotations

import random

import pytest
from django.db.models import Sum

from flows_app.models import Blob, Snapshot
from flows_app.services import flow_create, flow_file_save, manifest_json

pytestmark = pytest.mark.django_db


def _flow_files(rng: random.Random) -> dict[str, bytes]:
    # The shape of a larger prompt flow: code, prompts, docs, a data file; sizes between 1 and 9 KB.
    files: dict[str, bytes] = {"flow.dag.yaml": b"nodes:\n" + b"- name: step\n  type: python\n" * 100}
    files["data.jsonl"] = b"".join(b'{"question": "q%05d", "answer": "a"}\n' % i for i in range(1500))
    for index in range(48):
        folder = ("tools", "prompts", "docs")[index % 3]
        lines = rng.randint(25, 220)
        files[f"{folder}/file_{index:02d}.txt"] = b"".join(
            b"line %d of file %d: %s\n" % (n, index, rng.randbytes(8).hex().encode()) for n in range(lines)
        )
    return files


def test_two_hundred_versions_cost_at_most_twice_the_distinct_bytes(owner):
    rng = random.Random(4)
    files = _flow_files(rng)
    assert len(files) == 50
    flow = flow_create(owner=owner, name="big", files=files)
    distinct = {data for data in files.values()}
    editable = sorted(path for path in files if "/" in path)
    for number in range(1, 200):
        path = rng.choice(editable)
        files[path] = files[path] + b"edit %d\n" % number
        distinct.add(files[path])
        flow_file_save(flow=flow, user=owner, path=path, content=files[path], based_on=number)
    flow.refresh_from_db()
    assert flow.head.number == 200
    blob_bytes = Blob.objects.aggregate(total=Sum("size"))["total"]
    manifest_bytes = sum(len(manifest_json(m)) for m in Snapshot.objects.values_list("manifest", flat=True))
    distinct_bytes = sum(len(data) for data in distinct)
    assert blob_bytes == distinct_bytes
    assert Blob.objects.count() == len(distinct)
    assert blob_bytes + manifest_bytes <= 2 * distinct_bytes
    naive = 200 * sum(len(data) for data in files.values())
    assert blob_bytes + manifest_bytes < naive / 20
