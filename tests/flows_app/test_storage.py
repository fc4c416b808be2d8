"""Content-addressed storage: blobs, snapshots, materialised folders and deterministic zips."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from flows_app.models import Blob, Snapshot
from flows_app.services import (
    FlowPathError,
    manifest_json,
    snapshot_file_read,
    snapshot_files,
    snapshot_from_files,
    snapshot_materialize,
    snapshot_zip,
)

pytestmark = pytest.mark.django_db

FILES = {
    "flow.dag.yaml": b"inputs: {}\noutputs: {}\nnodes: []\n",
    "hello.py": b"print('hi')\n",
    "data/rows.jsonl": b'{"q": 1}\n',
    "copy_of_hello.py": b"print('hi')\n",
}


def test_same_files_give_the_same_snapshot_and_no_new_rows():
    first = snapshot_from_files(files=FILES)
    blobs, snapshots = Blob.objects.count(), Snapshot.objects.count()
    second = snapshot_from_files(files=dict(reversed(list(FILES.items()))))
    assert second.pk == first.pk
    assert (Blob.objects.count(), Snapshot.objects.count()) == (blobs, snapshots)


def test_identical_contents_are_stored_once():
    snapshot = snapshot_from_files(files=FILES)
    assert Blob.objects.count() == 3
    assert snapshot.file_count == 4
    assert snapshot.total_size == sum(len(data) for data in FILES.values())


def test_snapshot_hash_is_the_hash_of_the_canonical_manifest():
    import hashlib

    snapshot = snapshot_from_files(files=FILES)
    assert snapshot.sha256 == hashlib.sha256(manifest_json(snapshot.manifest)).hexdigest()
    assert list(snapshot.manifest) == sorted(FILES)
    assert json.loads(manifest_json(snapshot.manifest)) == snapshot.manifest


def test_files_come_back_byte_for_byte():
    snapshot = snapshot_from_files(files=FILES)
    assert snapshot_files(snapshot=snapshot) == FILES
    assert snapshot_file_read(snapshot=snapshot, path="data/rows.jsonl") == FILES["data/rows.jsonl"]


def test_reading_a_missing_file_names_it():
    snapshot = snapshot_from_files(files=FILES)
    with pytest.raises(FlowPathError, match="no file 'nope.txt'") as caught:
        snapshot_file_read(snapshot=snapshot, path="nope.txt")
    assert caught.value.reason == "not_found"


@pytest.mark.parametrize(
    "path",
    ["../evil.py", "a/../../evil.py", "/etc/passwd", "C:/x", "a//b", "a/", "x\x00.py", "..\\..\\x", "．．/x"],
)
def test_snapshot_refuses_unsafe_paths_and_writes_nothing(path):
    with pytest.raises(FlowPathError):
        snapshot_from_files(files={"ok.txt": b"fine", path: b"bad"})
    assert Blob.objects.count() == 0
    assert Snapshot.objects.count() == 0


def test_snapshot_refuses_case_colliding_paths():
    with pytest.raises(FlowPathError, match="differ only in case") as caught:
        snapshot_from_files(files={"Flow.dag.yaml": b"a", "flow.dag.yaml": b"b"})
    assert caught.value.reason == "duplicate"


def test_snapshot_refuses_a_file_used_as_a_folder():
    with pytest.raises(FlowPathError, match="both a file and a folder"):
        snapshot_from_files(files={"a": b"file", "a/b.txt": b"inside"})


def test_materialize_writes_a_read_only_folder_cached_by_hash(tmp_path):
    snapshot = snapshot_from_files(files=FILES)
    folder = snapshot_materialize(snapshot_sha=snapshot.sha256, root=tmp_path)
    assert folder == tmp_path / snapshot.sha256
    assert {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    } == FILES
    assert (folder / "hello.py").stat().st_mode & 0o222 == 0
    assert snapshot_materialize(snapshot_sha=snapshot.sha256, root=tmp_path) == folder
    assert [p.name for p in tmp_path.iterdir()] == [snapshot.sha256]


@pytest.mark.django_db(transaction=True)
def test_concurrent_materialize_callers_all_see_a_complete_folder(tmp_path):
    snapshot = snapshot_from_files(files=FILES)
    seen: list[dict[str, bytes]] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            folder = snapshot_materialize(snapshot_sha=snapshot.sha256, root=tmp_path)
            seen.append(
                {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert seen == [FILES] * 6
    assert [p.name for p in tmp_path.iterdir()] == [snapshot.sha256]


def test_zip_export_is_byte_identical_and_sorted():
    snapshot = snapshot_from_files(files=FILES)
    import io
    import zipfile

    first, second = snapshot_zip(snapshot=snapshot), snapshot_zip(snapshot=snapshot)
    assert first == second
    archive = zipfile.ZipFile(io.BytesIO(first))
    assert archive.namelist() == sorted(FILES)
    assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.external_attr >> 16 for info in archive.infolist()} == {0o100644}


def test_materialized_paths_stay_inside_the_root(tmp_path):
    snapshot = snapshot_from_files(files={"a/b/c.txt": b"deep"})
    folder = snapshot_materialize(snapshot_sha=snapshot.sha256, root=tmp_path)
    resolved = [Path(p).resolve() for p in folder.rglob("*")]
    assert all(str(p).startswith(str(folder.resolve())) for p in resolved)
