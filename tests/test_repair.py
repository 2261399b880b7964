"""`check --repair` keeps everything that survives: each file of an index damaged in turn (deleted, emptied, cut at
several points, bytes flipped) gives one clear line from `check`, and after the repair the index answers as it did
before the damage, because the photos are still on disk. What nothing holds any more is named, never dropped
silently."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import run
from corpus import make_images

from clipdex.cli.main import app
from clipdex.retrieval.maintain.check import check_index

QUERIES = ("a red circle",)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how.startswith("cut"):
        path.write_bytes(data[: len(data) * int(how[3:]) // 4])
    else:
        flipped = bytearray(data)
        rng = random.Random(len(data))
        for _ in range(16):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        path.write_bytes(bytes(flipped))


def answers(cli, index: Path) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for query in QUERIES:
        for target in ("images", "texts"):
            found = json.loads(run(cli, "search", query, "--index", index, "--target", target, "-k", "100", "--json"))
            out[f"{query}/{target}"] = [(h.get("path") or h["text"], round(h["score"], 4)) for h in found["results"]]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("repair")
    make_images(root / "photos", 14, seed=71)
    captions = root / "caps.txt"
    captions.write_text("a red circle\na blue square\na green cross\n")
    args = [str(root / "photos"), "--texts", str(captions), "--index", str(root / "idx"), *tiny_model.cli_args()]
    result = CliRunner().invoke(app, ["index", *args, "--batch-size", "8", "--commit-every", "1"])
    assert result.exit_code == 0, result.stderr
    return root / "idx", root / "photos"


def test_every_file_damaged_in_turn_is_found_and_repaired(cli, built, tmp_path):
    source, _ = built
    before = answers(cli, source)
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.name != "write.lock")
    assert {"manifest.json", "catalog.duckdb"} <= {str(f) for f in files} and len(files) >= 9
    for rel in files:
        for how in ("delete", "empty", "cut1", "cut3", "flip"):
            index = tmp_path / f"{rel.name}-{how}"
            shutil.copytree(source, index)
            _damage(index / rel, how)
            said = cli.invoke(app, ["check", "--index", str(index)])
            output = (said.stdout + said.stderr).strip()
            case = f"{rel} {how}: {output}"
            assert said.exit_code == 1 and "Traceback" not in output and output.startswith("problem:"), case
            assert str(rel.name) in output or "catalog" in output or "model config" in output, case
            repaired = cli.invoke(app, ["check", "--repair", "--index", str(index)])
            assert repaired.exit_code == 0, f"{case}\nrepair: {repaired.stdout}{repaired.stderr}"
            lost = [x for x in repaired.stderr.splitlines() if x.startswith("lost:") and "if any" not in x]
            assert not lost, f"{case}\nrepair: {repaired.stderr}"
            assert answers(cli, index) == before, case
            shutil.rmtree(index)


def test_lost_vectors_come_back_from_photos_then_from_the_faiss_index_else_are_named(cli, built, tmp_path):
    source, _ = built
    index = tmp_path / "idx"
    shutil.copytree(source, index)
    rows = json.loads(run(cli, "search", "x", "--index", index, "-k", "100", "--json"))["results"]
    gone = Path(rows[0]["path"])
    moved = tmp_path / gone.name
    shutil.move(gone, moved)  # one photo is no longer on disk
    for shard in (index / "vectors").glob("*.npy"):
        shard.unlink()  # every vector gone: texts and present photos are encoded again, the absent one read back
    result = cli.invoke(app, ["check", "--repair", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    actions = " ".join(json.loads(result.stdout)["repair"]["actions"])
    assert "encoded 13 images again from their files and 3 texts" in actions and "read 1 back" in actions
    shutil.move(moved, gone)
    assert answers(cli, index) == answers(cli, source)

    flat_gone = tmp_path / "second"
    shutil.copytree(source, flat_gone)
    for name in flat_gone.glob("images-*.faiss"):
        name.unlink()  # and no exact copy either: that photo is lost, named, and nothing else is
    for shard in (flat_gone / "vectors").glob("*.npy"):
        shard.unlink()
    shutil.move(gone, moved)
    try:
        result = cli.invoke(app, ["check", "--repair", "--index", str(flat_gone)])
    finally:
        shutil.move(moved, gone)
    assert result.exit_code == 0, result.stdout + result.stderr
    lost = [line for line in result.stderr.splitlines() if line.startswith("lost:")]
    assert len(lost) == 1 and str(gone) in lost[0] and "its file is gone" in lost[0], result.stderr
    assert len(json.loads(run(cli, "search", "x", "--index", flat_gone, "-k", "100", "--json"))["results"]) == 13
    assert check_index(flat_gone).ok


def test_a_catalog_moved_aside_keeps_every_item(cli, built, tmp_path):
    source, photos = built
    index = tmp_path / "idx"
    shutil.copytree(source, index)
    (index / "catalog.duckdb").rename(tmp_path / "elsewhere.duckdb")
    before = answers(cli, index)  # searches never needed it
    result = cli.invoke(app, ["check", "--repair", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"images": 14, "texts": 3} and report["ok"]
    assert answers(cli, index) == before
    summary = json.loads(run(cli, "index", photos, "--index", index, "--json"))
    assert summary["unchanged"] == 14 and summary["added"] == 0  # nothing is encoded twice


def test_a_folder_that_is_no_index_is_still_refused(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("mine")
    result = cli.invoke(app, ["check", "--repair", "--index", str(tmp_path / "photos")])
    assert result.exit_code == 2 and "not a clipdex index" in result.stderr
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a.txt"]
