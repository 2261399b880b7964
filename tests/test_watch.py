"""`clipdex watch` and `serve --watch`: a watched folder stays equal to its index.

Files are copied (a burst, then one by one), edited, renamed, deleted, half-written, and their folder is taken away
and brought back while a watcher runs; after each step the index holds exactly the image files that exist, with
the vectors brute force computes for them, and a renamed file keeps its stored vector. The watcher gathers a burst
into a few runs, waits for another writer, catches up after a restart, and sleeps when idle.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import run
from corpus import edit, make_images
from typer.testing import CliRunner

from clipdex.indexer.config import IndexConfig
from clipdex.indexer.watch import WatchConfig, Watcher, polls, relevant
from clipdex.retrieval.store.lock import acquire_lock

FAST = {"settle_s": 0.6, "quiet_ms": 150, "gather_ms": 3000, "tick_s": 1.0}


def wait_for(
    condition: Callable[[], bool], timeout: float = 30.0, what: str = "", watcher: Watcher | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = watcher.status.to_json() if watcher is not None else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition} {state}"
        time.sleep(0.1)


def rows(index: Path) -> dict[str, tuple]:
    """path → (status, shard, row) of every image item. A watcher's run in this process holds the catalog open for
    writing (DuckDB then refuses a read-only connection here): read between runs."""
    deadline = time.monotonic() + 30
    while True:
        try:
            con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
            break
        except duckdb.Error:
            assert time.monotonic() < deadline, "the catalog stayed open for writing"
            time.sleep(0.05)
    try:
        found = con.execute("SELECT path, status, shard, row FROM items WHERE kind = 'image'").fetchall()
    finally:
        con.close()
    return {p: (status, shard, row) for p, status, shard, row in found}


def files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png") if not any(part.startswith(".") for part in p.parts))


@pytest.fixture
def watched(tmp_path, tiny_model) -> Iterator[Callable[..., Watcher]]:
    """Start watchers over `tmp_path/photos` into `tmp_path/idx` (indexed once first); stop them after."""
    started: list[Watcher] = []
    photos = tmp_path / "photos"
    make_images(photos, 6, seed=700)
    run(CliRunner(), "index", photos, "--index", tmp_path / "idx", *tiny_model.cli_args())

    def start(poll: bool | None = None, **options: float) -> Watcher:
        config = WatchConfig(
            IndexConfig(paths=(photos,), index_dir=tmp_path / "idx", workers=0), poll=poll, **{**FAST, **options}
        )
        watcher = Watcher(config)
        started.append(watcher)
        watcher.start()
        wait_for(lambda: watcher.status.runs >= 1, what="the catch-up run")
        return watcher

    yield start
    for w in started:
        w.stop.set()


def settled(watcher: Watcher, index: Path, folder: Path, timeout: float = 40.0) -> None:
    """Wait until the index holds exactly the files under `folder`, and the watcher is idle."""

    def same() -> bool:
        if watcher.status.indexing:
            return False
        return sorted(rows(index)) == files(folder)

    wait_for(same, timeout, what="the index to equal the folder", watcher=watcher)


def assert_exact(index: Path, folder: Path, reference) -> None:
    """Every item is a file that exists, with the vector brute force gives it (a search by each file finds itself
    with its exact cosine against a text)."""
    from clipdex.retrieval import Searcher

    live = files(folder)
    assert sorted(rows(index)) == live and all(status == "ok" for status, _, _ in rows(index).values())
    want = reference.images([Path(p) for p in live]) @ reference.texts(["a red circle"])[0]
    hits = Searcher(index).search_text("a red circle", k=len(live) + 5)
    assert sorted(h.path for h in hits) == live
    for h in hits:
        assert h.score == pytest.approx(float(want[live.index(h.path)]), abs=2e-5)


@pytest.mark.parametrize("poll", [False, True], ids=["events", "polling"])
def test_a_burst_then_single_changes_keep_the_index_equal_to_the_folder(watched, tmp_path, reference, poll):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched(poll=poll)
    runs = watcher.status.runs
    make_images(tmp_path / "incoming", 60, seed=701)
    for f in sorted((tmp_path / "incoming").iterdir()):  # a burst: 60 photos copied one after another
        shutil.copy(f, photos / f.name)
    settled(watcher, index, photos)
    assert watcher.status.runs - runs <= 4, watcher.status.to_json()  # gathered, not one run per file
    assert_exact(index, photos, reference)

    before = rows(index)
    first, second, third = (Path(p) for p in files(photos)[:3])
    moved = photos / "sub" / f"moved_{first.name}"
    moved.parent.mkdir()
    first.rename(moved)  # a move into a new folder keeps its stored vector
    settled(watcher, index, photos)
    assert rows(index)[str(moved)][1:] == before[str(first)][1:]
    edit(second, seed=3)  # an edit is encoded again
    wait_for(
        lambda: rows(index).get(str(second), before[str(second)])[1:] != before[str(second)][1:],
        what="edit",
        watcher=watcher,
    )
    third.unlink()  # a deletion is removed
    settled(watcher, index, photos)
    assert_exact(index, photos, reference)


def test_half_written_and_temporary_files_wait_until_whole(watched, tmp_path, reference):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched(settle_s=1.5, gather_ms=300)
    make_images(tmp_path / "incoming", 1, seed=702)
    data = next((tmp_path / "incoming").iterdir()).read_bytes()
    target = photos / "slow_copy.png"
    (photos / "download.png.part").write_bytes(data)  # a browser's download in progress: not an image name
    (photos / ".~lock.photo.png#").write_bytes(data)  # hidden
    with target.open("wb") as f:  # a copy in progress: half now, the rest a moment later
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.0)  # long enough for a run (gather_ms) to happen while the file is half written
        f.write(data[len(data) // 2 :])
    settled(watcher, index, photos)
    assert watcher.status.last is not None and watcher.status.last["failed"] == 0
    assert not any(p.endswith((".part", "#")) for p in rows(index))
    assert_exact(index, photos, reference)


def test_an_unplugged_root_is_kept_offline_and_comes_back_without_encoding(watched, tmp_path):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched()
    before = rows(index)
    away = tmp_path / "unplugged"
    photos.rename(away)  # the drive goes away: its items stay
    wait_for(lambda: watcher.status.to_json()["offline"] == [str(photos)], what="offline")
    wait_for(lambda: not watcher.status.indexing)
    assert rows(index) == before
    away.rename(photos)  # and comes back: nothing is encoded again
    wait_for(lambda: watcher.status.to_json()["offline"] == [], what="back")
    settled(watcher, index, photos)
    wait_for(lambda: (watcher.status.last or {}).get("unchanged") == len(before), what="the run after it came back")
    assert rows(index) == before
    make_images(photos, 2, seed=703, start=50)  # and is watched again
    settled(watcher, index, photos)


def test_another_writer_is_waited_for_and_a_restart_catches_up(watched, tmp_path, reference):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched()
    lock = acquire_lock(index)  # `clipdex index` is writing
    try:
        make_images(photos, 3, seed=704, start=20)
        wait_for(lambda: watcher.status.to_json()["error"] is not None, what="the watcher to meet the lock")
        assert len(rows(index)) == 6
    finally:
        lock.close()
    settled(watcher, index, photos)
    watcher.stop.set()
    time.sleep(1.5)
    make_images(photos, 2, seed=705, start=30)  # changed while nothing watched
    Path(files(photos)[0]).unlink()
    again = watched()
    settled(again, index, photos)
    assert_exact(index, photos, reference)


def test_an_idle_watcher_uses_no_cpu(watched):
    watched()
    time.sleep(1.0)
    t0 = time.process_time()
    time.sleep(4.0)
    assert time.process_time() - t0 < 0.2  # the whole test process, watcher thread included


def test_which_changes_count():
    assert relevant("/p/a.jpg") and relevant("/p/B.HEIC") and relevant("/p/.clipdexignore")
    assert not relevant("/p/a.jpg.part") and not relevant("/p/.hidden.jpg") and not relevant("/p/@eaDir")
    assert relevant("/p/gone-folder")  # a deleted path may have been a folder of photos
    assert not polls(Path("/proc/self"))  # procfs is not a network mount


def test_the_watch_command_indexes_changes_and_stops_on_sigterm(tmp_path, tiny_model):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 4, seed=706)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "watch", "--index", str(index), "--json", "--settle", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = json.loads(lines.get(timeout=60))  # the catch-up run, over the folders the index holds
        assert first["unchanged"] == 4 and first["added"] == 0
        make_images(photos, 3, seed=707, start=10)
        added = 0
        while added < 3:  # one run, or a few if the files landed across a gathering window
            added += json.loads(lines.get(timeout=60))["added"]
        assert added == 3 and sorted(rows(index)) == files(photos)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped watching" in err and "Traceback" not in err


def test_watch_without_folders_on_a_new_index_is_one_line(tmp_path):
    result = CliRunner().invoke(_app(), ["watch", "--index", str(tmp_path / "new")])
    assert result.exit_code != 0
    assert "name the folders to watch" in result.stderr and "Traceback" not in result.stderr


def _app():
    from clipdex.cli.main import app

    return app


def test_serve_watch_reports_indexing_and_serves_new_files(tmp_path, tiny_model):
    from conftest import serving

    from clipdex.cli.watch import watch_config
    from clipdex.retrieval import Searcher
    from clipdex.retrieval.serve.app import ServeConfig, create_app

    photos, index = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 4, seed=708)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    config = watch_config(index, None, workers=0)
    config.settle_s, config.quiet_ms = 0.5, 150
    watcher = Watcher(config)
    watcher.start()
    import httpx

    try:
        app = create_app(Searcher(index), ServeConfig(index, watch=watcher.status.to_json))
        with serving(app) as url:
            wait_for(lambda: httpx.get(f"{url}/api/status").json()["watch"]["runs"] >= 1)
            generation = httpx.get(f"{url}/api/status").json()["generation"]
            assert httpx.get(f"{url}/api/info").json()["watch"]["indexing"] in (False, True)
            new = make_images(photos, 1, seed=709, start=40)[0][0]
            wait_for(lambda: httpx.get(f"{url}/api/status").json()["generation"] != generation)
            status = httpx.get(f"{url}/api/status").json()
            assert status["counts"]["images"] == 5 and status["watch"]["last"]["added"] == 1
            hits = httpx.get(f"{url}/api/search", params={"q": "a shape", "k": 10}).json()["results"]
            assert str(new) in [h["path"] for h in hits]
            assert np.isclose(sum(1 for h in hits if h["path"] == str(new)), 1)
    finally:
        watcher.stop.set()


def test_a_burst_of_events_in_a_subfolder_that_is_deleted_whole(watched, tmp_path, reference):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched()
    make_images(photos / "trip", 8, seed=710, start=60)
    settled(watcher, index, photos)
    shutil.rmtree(photos / "trip")  # a folder deleted: one event for the folder on some systems
    settled(watcher, index, photos)
    assert_exact(index, photos, reference)
    assert os.path.isdir(photos)


@pytest.fixture
def drive(tmp_path) -> Iterator[Callable[[Path], None]]:
    """A real mount on `tmp_path/drive` (a small tmpfs), and a function that plugs it in again holding a copy of a
    folder (filled first on the side, then moved onto the folder, as a drive comes with its files). Skipped where
    `mount` is refused (not root, a container without the capability)."""
    point, side = tmp_path / "drive", tmp_path / "side"
    point.mkdir()
    side.mkdir()

    def mount(where: Path) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], check=True,
                       capture_output=True)  # fmt: skip

    def plug(contents: Path) -> None:
        mount(side)
        shutil.copytree(contents, side, dirs_exist_ok=True)  # copy2: the same bytes and mtimes
        subprocess.run(["mount", "--move", str(side), str(point)], check=True, capture_output=True)

    try:
        mount(point)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"mount is refused here: {e}")
    yield plug
    for where in (point, side):
        while os.path.ismount(where):
            subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_a_drive_unmounted_from_the_root_folder_is_offline_and_comes_back_as_it_was(drive, tmp_path, tiny_model):
    """The root is the folder a drive is mounted on: unmounted, it is an empty folder, not a deleted library. `index`
    and `watch` keep its items offline; mounted again, nothing is encoded and new photos on it are seen."""
    point, index = tmp_path / "drive", tmp_path / "idx"
    make_images(point, 5, seed=720)
    backup = tmp_path / "backup"
    shutil.copytree(point, backup)  # copy2: the same bytes and mtimes when the drive comes back
    run(CliRunner(), "index", point, "--index", index, *tiny_model.cli_args())
    before = rows(index)
    subprocess.run(["umount", str(point)], check=True)
    summary = json.loads(run(CliRunner(), "index", point, "--index", index, "--json"))
    assert summary["removed"] == 0 and rows(index) == before
    assert any("kept, offline" in n for n in summary["notes"])
    config = WatchConfig(IndexConfig(paths=(point,), index_dir=index, workers=0), poll=False, **FAST)
    watcher = Watcher(config)
    watcher.start()
    try:
        wait_for(lambda: watcher.status.runs >= 1, what="the catch-up run", watcher=watcher)
        assert watcher.status.to_json()["offline"] == [str(point)] and rows(index) == before
        drive(backup)  # plugged in again, its files as they were
        wait_for(lambda: watcher.status.to_json()["offline"] == [], what="back online", watcher=watcher)
        assert rows(index) == before  # nothing encoded again
        make_images(point, 2, seed=721, start=40)  # the watch follows the new mount
        settled(watcher, index, point)
    finally:
        watcher.stop.set()


def test_the_model_is_loaded_once_for_a_watchers_runs_and_again_for_another_model(watched, tmp_path, monkeypatch):
    from clipdex.indexer import pipeline

    loads: list[int] = []
    real = pipeline._exported
    monkeypatch.setattr(pipeline, "_exported", lambda *a, **k: loads.append(1) or real(*a, **k))
    photos, index = tmp_path / "photos", tmp_path / "idx"
    watcher = watched()
    for n in range(3):
        make_images(photos, 1, seed=730 + n, start=80 + n)
        settled(watcher, index, photos)
    assert watcher.status.runs >= 4 and len(loads) == 1
    cache = pipeline.EncoderCache()
    assert cache.get(("a",), lambda: 1) == 1 and cache.get(("a",), lambda: 2) == 1
    assert cache.get(("b",), lambda: 3) == 3  # the index holds another model now: loaded anew
