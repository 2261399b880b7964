"""Real processes: SIGKILL at random moments, Ctrl-C, a second indexer, a search during a run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from conftest import TinyModel, counts
from corpus import make_images

from clipdex.retrieval import Searcher, Target
from clipdex.retrieval.maintain.check import check_index

REPO = Path(__file__).parents[1]


def clipdex(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipdex", *map(str, args)]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def index_cmd(photos: Path, index: Path, model: TinyModel) -> list[str]:
    # small batches, a commit and a publish after every batch: many states a kill can land in
    return clipdex(
        "index",
        photos,
        "--index",
        index,
        *model.cli_args(),
        "--batch-size",
        "8",
        "--commit-every",
        "1",
        "--publish-every",
        "0",
        "--workers",
        "1",
        "--json",
    )


def assert_matches_disk(index: Path, photos: Path) -> None:
    on_disk = sorted(str(p) for p in photos.rglob("*.png"))
    con = duckdb.connect(str(index / "catalog.duckdb"), read_only=True)
    try:
        rows = [r[0] for r in con.execute("SELECT path FROM items WHERE kind = 'image' AND status = 'ok'").fetchall()]
    finally:
        con.close()
    assert sorted(rows) == on_disk  # every file exactly once
    searcher = Searcher(index)
    assert searcher.count(Target.IMAGES) == len(on_disk)
    hits = searcher.search_text("a red circle", k=len(on_disk) + 5)
    assert sorted(h.path for h in hits) == on_disk
    report = check_index(index)
    assert report.ok and not report.notes, report.to_json()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    photos = tmp_path_factory.mktemp("kill") / "photos"
    make_images(photos, 300, seed=21)
    return photos


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return [int(c) for t in tasks for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_sigkill_at_random_moments_then_rerun(tmp_path, big_corpus, tiny_model):
    # how long one whole run takes here, so the kills land throughout it
    t0 = time.monotonic()
    warm = subprocess.run(
        index_cmd(big_corpus, tmp_path / "warm", tiny_model), cwd=REPO, capture_output=True, text=True
    )
    assert warm.returncode == 0, warm.stderr
    total = time.monotonic() - t0

    index = tmp_path / "idx"
    rng = random.Random(4)
    for attempt in range(5):
        proc = start(index_cmd(big_corpus, index, tiny_model))
        time.sleep(rng.uniform(0.3, 1.0) * total if attempt else 0.85 * total)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15  # its decode workers end with it, not linger as orphans
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), [p for p in workers if _alive(p)]
        if (index / "manifest.json").exists():
            # whatever moment it died at, the index opens, searches, and is consistent
            Searcher(index).search_text("a blue square", k=5)
            report = check_index(index)
            assert report.ok, report.to_json()

    final = subprocess.run(index_cmd(big_corpus, index, tiny_model), cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["failed"] == 0 and summary["removed"] == 0
    assert summary["added"] + summary["unchanged"] == 300
    assert_matches_disk(index, big_corpus)
    again = subprocess.run(index_cmd(big_corpus, index, tiny_model), cwd=REPO, capture_output=True, text=True)
    assert counts(json.loads(again.stdout)) == {"added": 0, "updated": 0, "removed": 0, "unchanged": 300, "failed": 0}


def test_ctrl_c_keeps_work_and_second_indexer_refuses(tmp_path, tiny_model):
    big_corpus = tmp_path / "photos"
    make_images(big_corpus, 1500, seed=22)
    index = tmp_path / "idx"
    cmd = index_cmd(big_corpus, index, tiny_model)
    cmd[cmd.index("--publish-every") + 1] = "0.5"
    proc = start(cmd)
    deadline = time.monotonic() + 60
    # wait until the run has published something and holds the lock, then freeze it there: whatever this
    # machine's speed, the checks below happen while the run is unfinished
    while time.monotonic() < deadline and not _published_images(index):
        if proc.poll() is not None:
            pytest.fail(f"indexer ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "being written" in second.stderr and "pid" in second.stderr
        # a search in the middle of the run sees a published state: each file at most once, all real
        during = subprocess.run(
            clipdex("search", "a circle", "--index", index, "--json", "-k", "2000"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert during.returncode == 0, during.stderr
        paths = [h["path"] for h in json.loads(during.stdout)["results"]]
        assert 0 < len(paths) < 1500 and len(paths) == len(set(paths)) and all(Path(p).exists() for p in paths)
    finally:
        proc.send_signal(signal.SIGCONT)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    stderr = proc.stderr.read()
    assert code == 130, stderr  # stopped by Ctrl-C, not finished
    assert time.monotonic() - t0 < 10
    assert "the work done so far is saved" in stderr and "Traceback" not in stderr
    report = check_index(index)
    assert report.ok, report.to_json()
    assert not report.notes  # Ctrl-C publishes what was committed
    saved = Searcher(index).count(Target.IMAGES)
    assert len(paths) <= saved < 1500
    final = subprocess.run(index_cmd(big_corpus, index, tiny_model), cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["unchanged"] == saved  # nothing saved is encoded again
    assert_matches_disk(index, big_corpus)


def _published_images(index: Path) -> int:
    """Images in the published snapshot (its files are written before the manifest names them)."""
    try:
        return int(json.loads((index / "manifest.json").read_text())["counts"].get("images", 0))
    except (OSError, ValueError, KeyError):
        return 0


def test_lock_is_released_when_the_holder_dies(tmp_path, tiny_model):
    """A lock file left by a dead process does not block: the kernel drops its flock."""
    from clipdex.retrieval.ann.build import index_writer
    from clipdex.retrieval.errors import IndexLockedError
    from clipdex.retrieval.model.encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)))
    writer = index_writer(tmp_path / "idx", encoder.spec, encoder.dim)
    with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
        index_writer(tmp_path / "idx", encoder.spec, encoder.dim)
    writer.close()
    code = "import sys, os; sys.path.insert(0, '.'); import fcntl; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1\\n'); f.flush(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "idx" / "write.lock")], check=True)
    index_writer(tmp_path / "idx", encoder.spec, encoder.dim).close()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Decode workers are forked while the writer holds the lock: a worker that outlives its killed parent must not
    keep the index locked (the next run would be refused), and the lock still excludes other processes."""
    from clipdex.retrieval.store.lock import acquire_lock

    lock = acquire_lock(tmp_path)
    ready, told = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that lives on
        os.write(told, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(ready, 1)  # the child is running (its fork handlers have run)
        lock.close()  # the writer is gone; its child is not
        again = acquire_lock(tmp_path)
        probe = "import pathlib; from clipdex.retrieval.store.lock import acquire_lock; acquire_lock(pathlib.Path(%r))"
        other = subprocess.run([sys.executable, "-c", probe % str(tmp_path)], capture_output=True, text=True)
        assert "IndexLockedError" in other.stderr
        again.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_held_lock_excludes_others_and_a_forked_child_does_not_keep_it(tmp_path):
    """`held` (the lock on making an export's optimised graph) excludes other holders; a child forked meanwhile (a
    decode worker) does not keep it once the holder leaves; an unwritable place runs the block unlocked."""
    import fcntl

    from clipdex.retrieval.store.lock import held

    def free(path: Path) -> bool:
        with open(path, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    path = tmp_path / ".graph.lock"
    ready, told = os.pipe()
    with held(path) as locked:
        assert locked and not free(path)
        child = os.fork()
        if child == 0:  # a worker that lives on
            os.write(told, b"x")
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)  # its fork handlers have run
    try:
        assert free(path)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    with held(tmp_path / "missing" / "x.lock") as locked:
        assert not locked
