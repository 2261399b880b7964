"""Disks that are full or read-only, for real: small tmpfs mounts made by the test (as root; skipped cleanly where
`mount` is refused). A full disk stops a run with one line and loses nothing published; after space is freed the
same command finishes with every file exactly once. A read-only index still answers everything that only reads."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import LOCAL, run
from corpus import make_captioned_library, make_domain_pairs, make_images
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.retrieval.config import Kind
from clipdex.retrieval.maintain.check import check_index
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app


def _mount(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


def _remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 160 MiB tmpfs of the test's own (a fine-tuning run of the tiny model keeps some 60 MB: weights, optimiser state, a temp copy)."""
    where = tmp_path / "disk"
    _mount(where, "160m")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_read_only_index_answers_what_only_reads(disk, tmp_path, tiny_model, monkeypatch):
    made = make_images(tmp_path / "photos", 6, seed=91)
    index = disk / "idx"
    cache = disk / "cache"
    cache.mkdir()
    monkeypatch.setenv("CLIPDEX_CACHE", str(cache))
    run(CliRunner(), "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    want = json.loads(run(CliRunner(), "search", "a red circle", "--index", index, "--json", "--no-server"))
    _remount(disk, "ro")

    assert json.loads(run(CliRunner(), "search", "a red circle", "--index", index, "--json", "--no-server")) == want
    assert json.loads(run(CliRunner(), "info", "--index", index, "--json"))["counts"]["images"] == 6
    assert json.loads(run(CliRunner(), "check", "--index", index, "--json"))["ok"] is True
    assert "groups" in json.loads(run(CliRunner(), "duplicates", "--index", index, "--json"))
    run(CliRunner(), "export", "--index", index, "--out", tmp_path / "exported")
    assert (tmp_path / "exported" / "img_emb" / "img_emb_0.npy").is_file()
    code, out, err = _invoke("classify", "--index", index, "--labels", "circle,square", "--json")
    assert code == 0 and len(json.loads(out)["items"]) == 6 and "could not store" in _one_line(err)

    searcher = Searcher(index)
    client = TestClient(create_app(searcher, ServeConfig(index)), base_url=LOCAL)
    image = int(searcher.ids(Kind.IMAGE)[0])
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
    thumb = client.get(f"/api/items/{image}/thumbnail")  # the cache cannot be written: made in memory
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

    for args in (
        ("index", tmp_path / "photos", "--index", index),
        ("remove", made[0][0], "--index", index),
        ("build", "--index", index),
    ):
        code, _, err = _invoke(*args)
        assert code != 0 and "read-only" in _one_line(err), (args, err)
    _remount(disk, "rw")
    assert check_index(index).ok


def _fill(disk: Path, leave: int) -> None:
    """Fill the disk to within `leave` bytes of full."""
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as f:
        f.truncate(0)
        remaining = max(0, free - leave)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            n = min(len(block), remaining)
            try:
                f.write(block[:n])
                f.flush()
            except OSError:
                break
            remaining -= n


@pytest.mark.parametrize("leave", [0, 16_000, 64_000, 160_000, 320_000])
def test_a_full_disk_stops_a_run_cleanly_and_the_same_command_finishes_after(disk, tmp_path, tiny_model, leave):
    """Filled to within `leave` bytes while more photos wait: the run fails in one line (or fits), the published
    index still answers and checks, and once space is freed the same command indexes every photo exactly once."""
    make_images(tmp_path / "photos", 8, seed=92)
    index = disk / "idx"
    run(CliRunner(), "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    before = json.loads(run(CliRunner(), "search", "a shape", "--index", index, "--json", "--no-server", "-k", 50))
    make_images(tmp_path / "photos" / "more", 40, seed=93)
    _fill(disk, leave)
    code, _, err = _invoke("index", tmp_path / "photos", "--index", index, "--commit-every", 1, "--batch-size", 4)
    assert code != 0 or leave > 0  # a disk with no room at all cannot take a new photo
    if code != 0:
        line = _one_line(err)
        assert "no space left" in line and str(disk) in line, line
        now = json.loads(run(CliRunner(), "search", "a shape", "--index", index, "--json", "--no-server", "-k", 50))
        assert {h["path"] for h in before["results"]} <= {h["path"] for h in now["results"]}
    assert check_index(index).ok, check_index(index).problems
    (disk / "filler").unlink()
    run(CliRunner(), "index", tmp_path / "photos", "--index", index)
    assert check_index(index).ok
    hits = json.loads(run(CliRunner(), "search", "a shape", "--index", index, "--json", "--no-server", "-k", 100))
    paths = [h["path"] for h in hits["results"]]
    assert len(paths) == len(set(paths)) == 48
    assert set(paths) == {str(p.resolve()) for p in (tmp_path / "photos").rglob("*.png")}


def test_an_export_to_a_full_disk_leaves_nothing_and_succeeds_after(disk, tmp_path, tiny_model):
    make_images(tmp_path / "photos", 30, seed=94)
    index = tmp_path / "idx"
    run(CliRunner(), "index", tmp_path / "photos", "--index", index, *tiny_model.cli_args())
    _fill(disk, 2_000)
    code, _, err = _invoke("export", "--index", index, "--out", disk / "exported", "--json")
    assert code != 0 and "no space left" in _one_line(err)
    assert not (disk / "exported").exists()
    (disk / "filler").unlink()
    out = json.loads(run(CliRunner(), "export", "--index", index, "--out", disk / "exported", "--json"))
    assert out["images"] == 30 and not list(disk.rglob("*.tmp"))


@pytest.fixture
def writers_setup(disk, tmp_path, tiny_model):
    """Photos, captions and an exported index off the small disk; an index on it."""
    make_captioned_library(tmp_path, 20, 10, seed=95)
    make_domain_pairs(tmp_path / "pairs", 40, seed=96)
    run(CliRunner(), "index", tmp_path / "photos", "--index", tmp_path / "src", *tiny_model.cli_args())
    run(CliRunner(), "export", "--index", tmp_path / "src", "--out", tmp_path / "exported")
    run(CliRunner(), "index", tmp_path / "photos", "--index", disk / "idx", *tiny_model.cli_args())
    other = tmp_path / "other.pt"  # weights of the same architecture, for reindex
    state = torch.load(tiny_model.weights, weights_only=True)
    torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, other)
    return tmp_path


WRITERS = {
    "import": lambda t, d, m: ["import", t / "exported", "--index", d / "imported", *m.cli_args()],
    "build": lambda t, d, m: ["build", "--index", d / "idx", "--index-type", "HNSW16"],
    "reindex": lambda t, d, m: ["reindex", "--index", d / "idx", "--pretrained", t / "other.pt"],
    "embed": lambda t, d, m: ["embed", t / "photos", "--texts", t / "captions.csv", "--out", d / "emb", *m.cli_args()],
    "finetune": lambda t, d, m: [
        "finetune",
        t / "pairs" / "pairs.csv",
        "--out",
        d / "ft",
        *m.cli_args(),
        "--epochs",
        1,
        "--workers",
        0,
        "--batch-size",
        16,
    ],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_stops_in_one_line_on_a_full_disk_and_finishes_after(disk, writers_setup, tiny_model, writer):
    """Import, build, reindex, embed and finetune on a disk with no room: one line naming the disk, the index on it
    still checks and answers as before, nothing half-written is left to trust; with space freed the same command
    succeeds."""
    args = WRITERS[writer](writers_setup, disk, tiny_model)
    before = json.loads(run(CliRunner(), "search", "a shape", "--index", disk / "idx", "--json", "--no-server"))
    _fill(disk, 0)
    code, _, err = _invoke(*args)
    line = _one_line(err)
    assert code != 0 and "no space left" in line and str(disk) in line, line
    assert check_index(disk / "idx").ok
    assert json.loads(run(CliRunner(), "search", "a shape", "--index", disk / "idx", "--json", "--no-server")) == before
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
    (disk / "filler").unlink()
    run(CliRunner(), *args)
    for index in (disk / "idx", disk / "imported"):
        if index.exists():
            assert check_index(index).ok
    if writer == "import":
        assert json.loads(run(CliRunner(), "info", "--index", disk / "imported", "--json"))["counts"]["images"] == 20


def test_thumbnails_on_a_full_disk_are_made_in_memory(disk, tmp_path, tiny_model, monkeypatch):
    make_images(tmp_path / "photos", 4, seed=97)
    monkeypatch.setenv("CLIPDEX_CACHE", str(disk / "cache"))
    run(CliRunner(), "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    _fill(disk, 0)
    searcher = Searcher(tmp_path / "idx")
    client = TestClient(create_app(searcher, ServeConfig(tmp_path / "idx")), base_url=LOCAL)
    for image in searcher.ids(Kind.IMAGE):
        thumb = client.get(f"/api/items/{int(image)}/thumbnail")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]


def test_a_package_left_half_imported_by_a_failed_read_is_a_disk_error(tmp_path, monkeypatch):
    """A package whose import failed on an I/O error is dropped but its loaded submodules stay; imported again it
    lacks them, and a library reaching one raises AttributeError (met in the I/O fault test: `module 'onnx' has no
    attribute 'external_data_helper'`). That is the one-line I/O error; any other missing attribute is not."""
    from clipdex.retrieval.errors import DiskIOError, disk_error

    (tmp_path / "halfpkg").mkdir()
    (tmp_path / "halfpkg" / "__init__.py").write_text("")
    (tmp_path / "halfpkg" / "helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import halfpkg.helper

    monkeypatch.delitem(sys.modules, "halfpkg")  # what Python does when the package's own import raises
    import halfpkg

    try:
        halfpkg.helper  # noqa: B018
    except AttributeError as e:
        said = disk_error(e, tmp_path)
    assert isinstance(said, DiskIOError) and "halfpkg.helper" in str(said) and "I/O error" in str(said)
    try:
        halfpkg.missing  # noqa: B018
    except AttributeError as e:
        assert disk_error(e, tmp_path) is None
    monkeypatch.delitem(sys.modules, "halfpkg.helper")
    monkeypatch.delitem(sys.modules, "halfpkg")


def test_disk_errors_are_read_from_what_each_library_raises(tmp_path):
    """The one line names the file written, or the folder when nothing names one ("Input/output" is no path); a
    library's own error raised while handling an OSError (torch.save into a file) is that OSError."""
    from clipdex.retrieval.errors import DiskFullError, DiskIOError, disk_error

    said = disk_error(OSError(errno.EIO, "Input/output error"), tmp_path / "idx")
    assert isinstance(said, DiskIOError) and f"read or write {tmp_path / 'idx'} (I/O error)" in str(said)
    named = disk_error(OSError(errno.EIO, "Input/output error", str(tmp_path / "a.npy")), tmp_path)
    assert f"{tmp_path / 'a.npy'} (I/O error)" in str(named)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as e:
        assert e.__context__ is not None
        assert isinstance(disk_error(e, tmp_path), DiskFullError)
    fatal = RuntimeError("FATAL Error: fsync failed!")  # DuckDB's, when its WAL could not be made durable
    assert isinstance(disk_error(fatal, tmp_path), DiskIOError)
    assert disk_error(ValueError("Input/output of the model"), tmp_path) is None
    import sqlite3  # the words index's file: SQLite says it in its own words, with no errno

    assert isinstance(disk_error(sqlite3.OperationalError("disk I/O error"), tmp_path), DiskIOError)
    assert isinstance(disk_error(sqlite3.OperationalError("database or disk is full"), tmp_path), DiskFullError)
    assert disk_error(sqlite3.OperationalError("no such table: grams"), tmp_path) is None
