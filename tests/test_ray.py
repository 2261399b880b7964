"""`--engine ray`: the same items and vectors as a local run, on a local Ray and on a two-node cluster, and a
killed driver resumed without loss or duplicates."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import run, search_json
from corpus import edit, make_captioned_library, make_images

from clipdex.cli.main import app
from clipdex.retrieval.search.searcher import Searcher, Target

ray = pytest.importorskip("ray")

REPO = Path(__file__).parents[1]
ITEM_COLUMNS = "id, kind, path, text, link, status, error, hash, size, width, height, taken_at, camera, lat, lon"


def items(index: Path) -> list[tuple]:
    con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT {ITEM_COLUMNS} FROM items ORDER BY id").fetchall()
    finally:
        con.close()


def assert_same_index(local: Path, other: Path) -> None:
    """The same items under the same ids, and the same vectors to 1e-5."""
    assert items(other) == items(local)
    a, b = Searcher(local), Searcher(other)
    for target in Target:
        ids = a.ids(target)
        np.testing.assert_array_equal(b.ids(target), ids)
        np.testing.assert_allclose(b.vectors(ids), a.vectors(ids), atol=1e-5)


def library(root: Path) -> tuple[Path, Path]:
    make_captioned_library(root, 36, 20, seed=211)
    photos = root / "photos"
    shutil.copy(photos / sorted(os.listdir(photos))[0], photos / "copy.png")  # one vector for both
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # fails, and the run goes on
    return photos, root / "captions.csv"


def test_ray_engine_indexes_as_the_local_engine_does(cli, tmp_path, tiny_model):
    photos, captions = library(tmp_path)
    args = [photos, "--texts", captions, *tiny_model.cli_args(), "--batch-size", 8, "--json"]
    local = json.loads(run(cli, "index", "--index", tmp_path / "local", *args))
    assert not ray.is_initialized()
    remote = json.loads(run(cli, "index", "--index", tmp_path / "ray", *args, "--engine", "ray"))
    assert not ray.is_initialized()  # the local Ray it started is shut down
    assert remote == local and local["failed"] == 1 and local["added"] == 37 + 20
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    for query in (
        ["a red circle"],
        ["--image", photos / "copy.png", "--include-self"],
        ["a square", "--target", "texts"],
    ):
        got, want = (search_json(cli, tmp_path / i, *query, "-k", 8)["results"] for i in ("ray", "local"))
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)
        assert [{**h, "score": 0} for h in got] == [{**h, "score": 0} for h in want]  # batches round differently

    # an incremental run: an edited, an added and a deleted file
    edit(photos / "copy.png", 5)
    make_images(photos / "new", 3, seed=212)
    next(p for p in sorted(photos.iterdir()) if p.suffix == ".png" and p.name != "copy.png").unlink()
    again = [photos, "--index"]
    local = json.loads(run(cli, "index", *again, tmp_path / "local", "--json"))
    remote = json.loads(run(cli, "index", *again, tmp_path / "ray", "--json", "--engine", "ray"))
    assert remote == local and (local["added"], local["updated"], local["removed"]) == (3, 1, 1)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_two_node_cluster_gives_the_local_result(cli, tmp_path, tiny_model):
    from ray.cluster_utils import Cluster

    photos, captions = library(tmp_path)
    args = [photos, "--texts", captions, *tiny_model.cli_args(), "--batch-size", 4, "--json"]
    run(cli, "index", "--index", tmp_path / "local", *args)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        ray.shutdown()
        run(cli, "index", "--index", tmp_path / "cluster", *args, "--engine", "ray", "--ray-address", cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same_index(tmp_path / "local", tmp_path / "cluster")


def test_a_killed_ray_driver_resumes_without_loss_or_duplicates(cli, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_images(photos, 240, seed=213)
    index = tmp_path / "ray"
    cmd = [sys.executable, "-m", "clipdex", "index", str(photos), "--index", str(index), *tiny_model.cli_args()]
    cmd += ["--engine", "ray", "--batch-size", "4", "--commit-every", "2", "--json"]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list((index / "vectors").glob("*.npy"))) < 2 and time.monotonic() < deadline:
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)  # the driver alone, mid-run
        driver.wait(timeout=30)
    finally:
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # what the dead driver's local Ray left behind
    committed = items(index)
    assert 0 < len(committed) < 240, len(committed)
    finished = json.loads(run(cli, "index", photos, "--index", index, "--engine", "ray", "--json"))
    assert finished["unchanged"] + finished["added"] == 240 and finished["unchanged"] >= len(committed)
    run(cli, "index", photos, "--index", tmp_path / "local", *tiny_model.cli_args())
    paths = [r[2] for r in items(index)]
    assert len(paths) == len(set(paths)) == 240
    assert_same_index(tmp_path / "local", index)


def test_ray_engine_errors_are_one_line(cli, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_images(photos, 2, seed=214)
    r = cli.invoke(app, ["index", str(photos), "--index", str(tmp_path / "i"), "--ray-address", "auto"])
    assert r.exit_code != 0 and "--ray-address needs --engine ray" in r.stderr


def test_embed_on_ray_writes_what_a_local_embed_writes(cli, tmp_path, tiny_model):
    from test_embed import read_layout

    photos, captions = library(tmp_path)
    args = [photos, "--texts", captions, *tiny_model.cli_args(), "--partition-rows", 15, "--json"]
    local = json.loads(run(cli, "embed", "--out", tmp_path / "local", *args))
    remote = json.loads(run(cli, "embed", "--out", tmp_path / "ray", *args, "--engine", "ray"))
    assert remote == {**local, "out": str(tmp_path / "ray")} and local["failed"] == 1
    want, got = read_layout(str(tmp_path / "local")), read_layout(str(tmp_path / "ray"))
    assert got.keys() == want.keys()
    for n in want:
        assert got[n][0] == want[n][0] and got[n][2] == want[n][2]
        np.testing.assert_allclose(got[n][1], want[n][1], atol=1e-5)
