"""`clipdex check` passes on a good index and names what is wrong in a damaged one; search refuses damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from corpus import make_images

from clipdex.cli.main import app


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model) -> Path:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("check")
    make_images(root / "photos", 30, seed=31)
    captions = root / "caps.txt"
    captions.write_text("a red circle\na blue square\na green cross\n")
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(root / "photos"),
            "--texts",
            str(captions),
            "--index",
            str(root / "idx"),
            *tiny_model.cli_args(),
            "--batch-size",
            "8",
            "--commit-every",
            "1",
        ],
    )
    assert result.exit_code == 0, result.stderr
    return root / "idx"


@pytest.fixture
def index(built, tmp_path) -> Path:
    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    return copy


def check(cli, index: Path) -> tuple[int, dict]:
    result = cli.invoke(app, ["check", "--index", str(index), "--json"])
    return result.exit_code, json.loads(result.stdout)


def manifest(index: Path) -> dict:
    return json.loads((index / "manifest.json").read_text())


def test_good_index_passes(cli, index):
    code, report = check(cli, index)
    assert code == 0 and report["ok"] and report["problems"] == [] and report["counts"] == {"images": 30, "texts": 3}
    human = cli.invoke(app, ["check", "--index", str(index)])
    assert human.exit_code == 0 and "consistent" in human.stdout


def test_flipped_bytes_in_faiss_file(cli, index):
    path = index / manifest(index)["snapshot"]["files"]["images"]
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the last vector: the file still parses, the results would be wrong
    path.write_bytes(bytes(data))
    code, report = check(cli, index)
    assert code == 1 and any("does not match its checksum" in p and path.name in p for p in report["problems"])
    search = cli.invoke(app, ["search", "a dog", "--index", str(index)])
    assert search.exit_code == 2 and "damaged" in search.stderr


def test_truncated_files(cli, index):
    faiss_file = index / manifest(index)["snapshot"]["files"]["texts"]
    faiss_file.write_bytes(faiss_file.read_bytes()[:50])
    shard = sorted((index / "vectors").glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    code, report = check(cli, index)
    assert code == 1
    problems = " | ".join(report["problems"])
    assert f"FAISS index {faiss_file.name} cannot be read" in problems and f"vector shard {shard.name}" in problems


def test_missing_snapshot_file_and_wrong_counts(cli, index):
    m = manifest(index)
    (index / m["snapshot"]["files"]["items"]).unlink()
    m["counts"]["images"] = 31
    (index / "manifest.json").write_text(json.dumps(m))
    code, report = check(cli, index)
    assert code == 1
    problems = " | ".join(report["problems"])
    assert "is missing" in problems and "manifest counts 31" in problems
    search = cli.invoke(app, ["search", "a dog", "--index", str(index)])
    assert search.exit_code == 2 and "missing" in search.stderr


def test_catalog_disagreeing_with_vectors(cli, index):
    import duckdb

    con = duckdb.connect(str(index / "catalog.duckdb"))
    con.execute("UPDATE items SET row = 999 WHERE id = (SELECT min(id) FROM items WHERE kind = 'image')")
    con.execute("INSERT INTO items SELECT * FROM items WHERE kind = 'image' LIMIT 1")
    con.close()
    code, report = check(cli, index)
    assert code == 1
    problems = " | ".join(report["problems"])
    assert "point past the end of their vector shard" in problems and "appear more than once" in problems


def test_newer_format_and_garbage_manifest(cli, index):
    m = manifest(index)
    m["format_version"] = 7
    (index / "manifest.json").write_text(json.dumps(m))
    for command in (["check"], ["search", "x"], ["info"]):
        result = cli.invoke(app, [*command, "--index", str(index)])
        assert result.exit_code in (1, 2) and "newer than this clipdex reads" in result.stdout + result.stderr
    (index / "manifest.json").write_bytes(b"\x00\x01garbage")
    result = cli.invoke(app, ["search", "x", "--index", str(index)])
    assert result.exit_code == 2 and "damaged" in result.stderr and "Traceback" not in result.stderr


def test_nothing_in_an_index_is_a_pickle(index):
    import numpy as np

    for path in (index / "vectors").glob("*.npy"):
        np.load(path, allow_pickle=False)  # raises on object arrays
    for path in index.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), path
