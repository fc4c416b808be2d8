"""Zip import: every hostile archive is refused with its reason before any row is written; real exports import."""

from __future__ import annotations

import copy
import io
import os
import stat
import warnings
import zipfile

import pytest

from flows_app.models import Blob, Flow, FlowVersion, Snapshot
from flows_app.services import (
    FlowConflict,
    FlowImportError,
    flow_create,
    flow_import_zip,
    snapshot_files,
    snapshot_zip,
)

pytestmark = pytest.mark.django_db

FLOW_FILE = ("flow.dag.yaml", b"inputs: {}\noutputs: {}\nnodes: []\n")


def _zip(*entries: tuple[str | zipfile.ZipInfo, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _with_mode(name: str, mode: int, data: bytes = b"/etc/passwd") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    # Rewrites a name in both the local header and the central directory (same length keeps offsets valid).
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


def _overlapping() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(*FLOW_FILE)
        archive.writestr("a.txt", b"shared data")
        twin = copy.copy(archive.filelist[-1])
        twin.filename = twin.orig_filename = "b.txt"
        archive.filelist.append(twin)
    return buffer.getvalue()


def _duplicate() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns, then writes both entries
        return _zip(FLOW_FILE, ("a.txt", b"1"), ("a.txt", b"2"))


def _encrypted() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(*FLOW_FILE)
        archive.writestr("secret.txt", b"ciphertext")
        archive.filelist[-1].flag_bits |= 0x1
    return buffer.getvalue()


def _lying_size() -> bytes:
    # The central directory says 10 bytes; the deflated stream holds 2 MB.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(*FLOW_FILE)
        archive.writestr("small.txt", os.urandom(1024) * 2048)
        archive.filelist[-1].file_size = 10
    return buffer.getvalue()


HOSTILE = {
    "traversal": (lambda: _zip(FLOW_FILE, ("../evil.py", b"x")), "traversal", "../evil.py"),
    "nested_traversal": (lambda: _zip(FLOW_FILE, ("a/../../evil.py", b"x")), "traversal", "a/../../evil.py"),
    "dots_and_slashes": (lambda: _zip(FLOW_FILE, ("....//evil", b"x")), "name", "....//evil"),
    "absolute": (lambda: _zip(FLOW_FILE, ("/etc/cron.d/x", b"x")), "absolute", "/etc/cron.d/x"),
    "windows_drive": (lambda: _zip(FLOW_FILE, ("C:\\x", b"x")), "absolute", "C:\\x"),
    "unc": (lambda: _zip(FLOW_FILE, ("\\\\srv\\share\\x", b"x")), "absolute", "\\\\srv\\share\\x"),
    "backslash_traversal": (lambda: _zip(FLOW_FILE, ("..\\..\\x", b"x")), "traversal", "..\\..\\x"),
    "symlink": (lambda: _zip(FLOW_FILE, _with_mode("passwd", stat.S_IFLNK | 0o777)), "link", "passwd"),
    "hardlink_overlap": (_overlapping, "link", "b.txt"),
    "char_device": (lambda: _zip(FLOW_FILE, _with_mode("tty", stat.S_IFCHR | 0o600, b"")), "device", "tty"),
    "fifo": (lambda: _zip(FLOW_FILE, _with_mode("pipe", stat.S_IFIFO | 0o600, b"")), "device", "pipe"),
    "duplicate": (_duplicate, "duplicate", "a.txt"),
    "case_collision": (lambda: _zip(FLOW_FILE, ("Flow.dag.yaml", b"x")), "duplicate", "flow.dag.yaml"),
    "encrypted": (_encrypted, "encrypted", "secret.txt"),
    "non_utf8_name": (
        lambda: _patched(_zip(FLOW_FILE, ("cafX.txt", b"x")), b"cafX.txt", b"caf\x82.txt"),
        "encoding",
        "caf",
    ),
    "nul_in_name": (
        lambda: _patched(_zip(FLOW_FILE, ("xX.py", b"x")), b"xX.py", b"x\x00.py"),
        "nul",
        "x\x00.py",
    ),
    "rtl_override": (lambda: _zip(FLOW_FILE, ("evil\u202etxt.py", b"x")), "control", "evil\u202etxt.py"),
    "depth_bomb": (lambda: _zip(FLOW_FILE, ("d/" * 200 + "x", b"x")), "too_deep", "d/d/d"),
    "ratio_bomb": (lambda: _zip(FLOW_FILE, ("zeros.bin", b"\0" * (5 * 1024 * 1024))), "ratio", "zeros.bin"),
    "lying_header": (_lying_size, "corrupt", "small.txt"),
    "polyglot_png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 64 + _zip(FLOW_FILE), "corrupt", None),
    "not_a_zip": (lambda: b"PK\x03\x04 but garbage", "corrupt", None),
}


def _rows() -> tuple[int, int, int, int]:
    return Blob.objects.count(), Snapshot.objects.count(), Flow.objects.count(), FlowVersion.objects.count()


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_archive_is_refused_with_its_reason_and_nothing_written(owner, attack):
    build, reason, entry = HOSTILE[attack]
    with pytest.raises(FlowImportError) as caught:
        flow_import_zip(owner=owner, data=build(), name="attempt")
    assert caught.value.reason == reason
    assert str(caught.value).startswith("Refused the archive")
    if entry is not None:
        assert entry in str(caught.value.entry)
        assert repr(caught.value.entry) in str(caught.value)
    assert _rows() == (0, 0, 0, 0)


@pytest.mark.parametrize("attack", ["traversal", "symlink", "duplicate", "encrypted", "ratio_bomb"])
def test_hostile_archive_into_an_existing_flow_adds_nothing(owner, attack):
    flow = flow_create(owner=owner, name="target", files=dict([FLOW_FILE]))
    before = _rows()
    with pytest.raises(FlowImportError):
        flow_import_zip(owner=owner, data=HOSTILE[attack][0](), into=flow, based_on=1)
    assert _rows() == before


def test_total_uncompressed_size_over_the_limit_is_refused(owner, settings):
    settings.STUDIO_ZIP_MAX_BYTES = 1024 * 1024
    lines = b"".join(b"%08d some text that compresses about ten times\n" % i for i in range(12_000))
    data = _zip(FLOW_FILE, ("a.txt", lines), ("b.txt", lines[::-1]))
    assert len(data) < 1024 * 1024 < 2 * len(lines)
    with pytest.raises(FlowImportError, match="the limit is 1,048,576") as caught:
        flow_import_zip(owner=owner, data=data)
    assert caught.value.reason == "too_large"
    assert _rows() == (0, 0, 0, 0)


def test_an_upload_over_the_limit_is_refused_unopened(owner, settings):
    settings.STUDIO_ZIP_MAX_BYTES = 1024
    data = _zip(FLOW_FILE, ("a.bin", os.urandom(2048)), method=zipfile.ZIP_STORED)
    with pytest.raises(FlowImportError, match="upload is larger than the limit of 1,024 bytes") as caught:
        flow_import_zip(owner=owner, data=data)
    assert caught.value.reason == "too_large"


def test_declared_size_over_the_limit_is_refused_before_reading(owner, settings):
    settings.STUDIO_ZIP_MAX_BYTES = 100 * 1024
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(*FLOW_FILE)
        archive.writestr("claims.bin", b"tiny")
        archive.filelist[-1].file_size = 10 * 1024 * 1024 * 1024
    with pytest.raises(FlowImportError, match="declares") as caught:
        flow_import_zip(owner=owner, data=buffer.getvalue())
    assert caught.value.reason == "too_large"


def test_too_many_files_is_refused(owner, settings):
    settings.STUDIO_ZIP_MAX_FILES = 50
    data = _zip(FLOW_FILE, *[(f"f{i}.txt", b"") for i in range(50)])
    with pytest.raises(FlowImportError, match="51 entries; the limit is 50") as caught:
        flow_import_zip(owner=owner, data=data)
    assert caught.value.reason == "too_many_files"
    assert _rows() == (0, 0, 0, 0)


def test_ratio_limit_follows_the_setting(owner, settings):
    settings.STUDIO_ZIP_MAX_RATIO = 2000
    version = flow_import_zip(owner=owner, data=HOSTILE["ratio_bomb"][0](), name="zeros are fine now")
    assert version.snapshot.total_size > 5 * 1024 * 1024


def test_prompt_flow_export_folder_imports_without_its_caches(owner):
    data = _zip(
        ("my_flow/flow.dag.yaml", FLOW_FILE[1]),
        ("my_flow/hello.py", b"print(1)\n"),
        ("my_flow/.promptflow/flow.tools.json", b"{}"),
        ("my_flow/.promptflow/flow.log", b"log"),
        ("my_flow/__pycache__/hello.cpython-311.pyc", b"\x00"),
        ("my_flow/lib/__pycache__/x.pyc", b"\x00"),
        ("my_flow/lib/util.py", b"X = 1\n"),
        ("my_flow/.DS_Store", b"\x00"),
    )
    version = flow_import_zip(owner=owner, data=data)
    assert version.flow.name == "my_flow"
    assert version.flow.kind == "dag"
    assert snapshot_files(snapshot=version.snapshot) == {
        "flow.dag.yaml": FLOW_FILE[1],
        "hello.py": b"print(1)\n",
        "lib/util.py": b"X = 1\n",
    }


def test_a_single_folder_without_a_flow_file_is_kept(owner):
    version = flow_import_zip(owner=owner, data=_zip(("docs/readme.md", b"hi")), name="docs only")
    assert set(version.snapshot.manifest) == {"docs/readme.md"}


def test_nested_zip_is_stored_as_a_file_not_extracted(owner):
    inner = _zip(("../escape.txt", b"x"))
    version = flow_import_zip(owner=owner, data=_zip(FLOW_FILE, ("a.zip", inner)), name="nested")
    assert snapshot_files(snapshot=version.snapshot)["a.zip"] == inner


def test_secrets_files_are_plain_files(owner):
    files = {".env": b"OPENAI_API_KEY=sk-x", "connections.json": b"{}", "key.pem": b"-----"}
    version = flow_import_zip(owner=owner, data=_zip(FLOW_FILE, *files.items()), name="with dotfiles")
    assert {
        path: data for path, data in snapshot_files(snapshot=version.snapshot).items() if path in files
    } == files
    from flows_app.models import Connection

    assert not Connection.objects.exists()


def test_imported_names_are_made_unique(owner):
    data = _zip(("my_flow/flow.dag.yaml", FLOW_FILE[1]))
    assert flow_import_zip(owner=owner, data=data).flow.name == "my_flow"
    assert flow_import_zip(owner=owner, data=data).flow.name == "my_flow (2)"


def test_import_as_a_new_version_checks_based_on(owner):
    flow = flow_create(owner=owner, name="target", files=dict([FLOW_FILE]))
    version = flow_import_zip(owner=owner, data=_zip(FLOW_FILE, ("b.txt", b"b")), into=flow, based_on=1)
    assert (version.number, version.flow_id) == (2, flow.pk)
    before = _rows()
    with pytest.raises(FlowConflict):
        flow_import_zip(owner=owner, data=_zip(FLOW_FILE), into=flow, based_on=1)
    assert _rows() == before


def test_export_import_export_is_byte_identical(owner):
    files = {
        "flow.dag.yaml": FLOW_FILE[1],
        "prompts/answer.jinja2": "system:\nRéponds {{q}}\n".encode(),
        "données.jsonl": b'{"q": 1}\n',
        "empty.txt": b"",
    }
    flow = flow_create(owner=owner, name="round trip", files=files)
    first = snapshot_zip(snapshot=flow.head.snapshot)
    imported = flow_import_zip(owner=owner, data=first, name="again")
    second = snapshot_zip(snapshot=imported.snapshot)
    assert second == first
    assert imported.snapshot_id == flow.head.snapshot_id
    assert snapshot_files(snapshot=imported.snapshot) == files


def test_an_empty_archive_is_refused(owner):
    with pytest.raises(FlowImportError, match="holds no files"):
        flow_import_zip(owner=owner, data=_zip(("__pycache__/x.pyc", b"")), name="empty")
    assert _rows() == (0, 0, 0, 0)
