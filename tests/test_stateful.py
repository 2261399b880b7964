"""A photo library's life as a hypothesis state machine, checked against a plain model of the world.

Rules change the real library and index (add, edit, rename, copy, delete files; empty a folder; add an alias;
move the checkpoint; index, remove, build an IVF index; SIGKILL a run midway; check) and a Python model
alike: `model` maps each canonical path the index should hold to the seed of the picture it holds. After
every step the invariants compare searches with brute force over the model, look for duplicates, and run
`clipdex check`.

The default run is short; `pytest tests/test_stateful.py --hypothesis-profile=long` runs many more steps
(profiles in conftest.py).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from corpus import draw, random_scene
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clipdex.indexer import IndexConfig, run_index
from clipdex.indexer.importer import rebuild
from clipdex.indexer.remove import remove_paths
from clipdex.retrieval import EncoderConfig, Searcher, Target
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.maintain.check import check_index
from clipdex.retrieval.paths import is_at_or_under
from clipdex.retrieval.store.manifest import AnnSettings, read_manifest

FOLDERS = ("a", "b", "a/deep")
TEXT_QUERIES = ("a red circle", "a large green square on a white background")
REPO = Path(__file__).parents[1]


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(random_scene(random.Random(seed)), noise_seed=seed).save(path)


class LibraryLife(RuleBasedStateMachine):
    # the tiny model and the brute-force reference come from pytest fixtures, set before the machine runs
    tiny_model: object = None
    reference: object = None
    tmp: Path = Path()

    @initialize()
    def start(self) -> None:
        self.root = Path(os.path.realpath(self.tmp)) / f"life-{time.monotonic_ns()}"
        self.photos = self.root / "photos"
        self.index = self.root / "idx"
        self.photos.mkdir(parents=True)
        self.checkpoint = self.root / "ckpt-0.pt"
        shutil.copy(self.tiny_model.weights, self.checkpoint)  # type: ignore[attr-defined]
        self.next_seed = 0
        self.disk: dict[str, int] = {}  # real files under photos → picture seed
        self.model: dict[str, int] = {}  # what the index must hold
        self.aliases = 0
        self.root_known = False
        self.vectors: dict[int, np.ndarray] = {}
        self.query_image = self.root / "query.png"
        picture(self.query_image, 10_000)
        self.add_files(3, "a")
        self.index_root(0)

    # -- the world --------------------------------------------------------------------------------

    def _new_file(self, folder: str) -> None:
        path = self.photos / folder / f"img{self.next_seed:03d}.png"
        picture(path, 100 + self.next_seed)
        self.disk[str(path)] = 100 + self.next_seed
        self.next_seed += 1

    @rule(n=st.integers(1, 4), folder=st.sampled_from(FOLDERS))
    def add_files(self, n: int, folder: str) -> None:
        for _ in range(n):
            self._new_file(folder)

    @precondition(lambda self: self.disk)
    @rule(data=st.data())
    def edit_file(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.disk)))
        seed = 5000 + self.next_seed
        self.next_seed += 1
        picture(Path(path), seed)
        later = time.time() + 2
        os.utime(path, (later, later))  # a new mtime even within the filesystem's time resolution
        self.disk[path] = seed

    @precondition(lambda self: self.disk)
    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def rename(self, data: st.DataObject, folder: str) -> None:
        path = data.draw(st.sampled_from(sorted(self.disk)))
        new = self.photos / folder / f"renamed{self.next_seed:03d}.png"
        self.next_seed += 1
        new.parent.mkdir(parents=True, exist_ok=True)
        Path(path).rename(new)
        self.disk[str(new)] = self.disk.pop(path)

    @precondition(lambda self: self.disk)
    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def copy(self, data: st.DataObject, folder: str) -> None:
        path = data.draw(st.sampled_from(sorted(self.disk)))
        new = self.photos / folder / f"copy{self.next_seed:03d}.png"
        self.next_seed += 1
        new.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, new)
        self.disk[str(new)] = self.disk[path]

    @precondition(lambda self: self.disk)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.disk)))
        Path(path).unlink()
        del self.disk[path]

    @rule(folder=st.sampled_from(FOLDERS))
    def empty_folder(self, folder: str) -> None:
        for path in [p for p in self.disk if Path(p).parent == self.photos / folder]:
            Path(path).unlink()
            del self.disk[path]

    @rule(folder=st.sampled_from(FOLDERS), to_file=st.booleans())
    def add_alias(self, folder: str, to_file: bool) -> None:
        """A symlink inside the library to a folder or a file already in it: never a second item."""
        self.aliases += 1
        target = self.photos / folder
        if to_file:
            files = sorted(p for p in self.disk if Path(p).parent == target)
            if not files:
                return
            target = Path(files[0])
        (self.photos / "b").mkdir(parents=True, exist_ok=True)
        os.symlink(target, self.photos / "b" / f"alias{self.aliases}{'.png' if to_file else ''}")

    @rule()
    def move_checkpoint(self) -> None:
        new = self.root / f"ckpt-{self.next_seed}.pt"
        self.next_seed += 1
        self.checkpoint.rename(new)
        self.checkpoint = new

    # -- the index --------------------------------------------------------------------------------

    @rule(spelling=st.integers(0, 3))
    def index_root(self, spelling: int) -> None:
        link = self.root / "library-link"
        if not link.exists():
            os.symlink(self.photos, link)
        self._index_all([self.photos, Path(f"{self.photos}/./"), self.photos / "a" / "..", link][spelling])

    def _index_all(self, root: Path) -> None:
        try:
            run_index(self._config(root))
        except InputError:
            # an empty library is refused only when the index never held it, or was told to forget it
            assert not self.disk and not self.model and not self.root_known
            return
        self.root_known = True
        self.model = dict(self.disk)

    @rule(folder=st.sampled_from((*FOLDERS, "")))
    def remove(self, folder: str) -> None:
        root = str(self.photos / folder) if folder else str(self.photos)
        summary = remove_paths(self.index, [Path(root)])
        gone = [p for p in self.model if is_at_or_under(p, root)]
        assert summary.removed == len(gone)
        for p in gone:
            del self.model[p]
        if root == str(self.photos):
            self.root_known = False

    @rule(index_type=st.sampled_from(["IVF4,Flat", "IVF2,SQ8", None]))
    def build(self, index_type: str | None) -> None:
        rebuild(self.index, AnnSettings(index_type=index_type, target_recall=0.9))

    @rule(delay=st.floats(0.0, 1.5))
    def sigkill_midway(self, delay: float) -> None:
        cmd = [sys.executable, "-m", "clipdex", "index", str(self.photos), "--index", str(self.index)]
        cmd += ["--batch-size", "1", "--commit-every", "1", "--publish-every", "0", "--workers", "0"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lock = self.index / "write.lock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:  # until the run holds the index
            if lock.exists() and f"pid {proc.pid}" in lock.read_text():
                break
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = check_index(self.index)
        assert report.ok, report.problems  # whatever the moment, the index is consistent
        self._index_all(self.photos)  # and the same command again finishes the job

    @rule()
    def check(self) -> None:
        report = check_index(self.index)
        assert report.ok and not report.notes, report.to_json()

    def _config(self, root: Path) -> IndexConfig:
        # the checkpoint is named only for a new index: later runs find it through the index (it may have moved)
        encoder = None
        if not (self.index / "manifest.json").exists():
            encoder = EncoderConfig(model=str(self.tiny_model.config), pretrained=str(self.checkpoint))  # type: ignore[attr-defined]
        return IndexConfig(paths=(root,), index_dir=self.index, encoder=encoder, workers=0, batch_size=4)

    # -- invariants -------------------------------------------------------------------------------

    def _vector(self, seed: int) -> np.ndarray:
        if seed not in self.vectors:
            tmp = self.root / f"ref-{seed}.png"
            picture(tmp, seed)
            self.vectors[seed] = self.reference.images([tmp])[0]  # type: ignore[attr-defined]
            tmp.unlink()
        return self.vectors[seed]

    @invariant()
    def searches_equal_brute_force(self) -> None:
        if not (self.index / "manifest.json").exists():
            return
        searcher = Searcher(self.index)  # loads the model through the index: the checkpoint may have moved
        paths = sorted(self.model)
        assert searcher.count(Target.IMAGES) == len(paths)
        vecs = np.stack([self._vector(self.model[p]) for p in paths]) if paths else np.zeros((0, 32), np.float32)
        record = read_manifest(self.index).ann.get("images")
        exact = record is not None and record.factory == "Flat"
        queries = [(q, self.reference.texts([q])[0]) for q in TEXT_QUERIES]  # type: ignore[attr-defined]
        queries.append((self.query_image, self.reference.images([self.query_image])[0]))  # type: ignore[attr-defined]
        for query, qv in queries:
            k = len(paths) + 3
            hits = searcher.search_image(query, k=k) if isinstance(query, Path) else searcher.search_text(query, k=k)
            got = [h.path for h in hits]
            assert len(got) == len(set(got)), "a file appears twice"
            assert set(got) <= set(paths), set(got) - set(paths)
            want = vecs @ qv
            for h in hits:  # every score is the exact cosine of that file as it is now
                assert abs(h.score - float(want[paths.index(h.path)])) < 2e-5, (h.path, h.score)
            if exact:
                assert sorted(got) == paths
                order = np.argsort(-want, kind="stable")
                for rank, h in enumerate(hits):
                    assert abs(h.score - want[order[rank]]) < 2e-5, f"rank {rank + 1} is not brute force"
        if not exact and len(paths) >= 10:
            self._recall_meets_manifest(searcher, vecs)

    def _recall_meets_manifest(self, searcher: Searcher, vecs: np.ndarray) -> None:
        """At the recorded nprobe, recall@10 on 300 random directions (the tuner's hardest set) meets the
        recall the manifest states, within the sampling error of 300 queries."""
        rng = np.random.default_rng(len(vecs))
        q = rng.normal(size=(300, vecs.shape[1])).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        truth = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
        paths = sorted(self.model)
        found = searcher.search_vectors(q, k=10)
        recall = np.mean(
            [len({paths.index(h.path) for h in hits} & set(t)) / 10 for hits, t in zip(found, truth, strict=True)]
        )
        stated = read_manifest(self.index).ann["images"].recall_at_10
        assert recall >= stated - 0.03, (recall, stated)

    @invariant()
    def consistent(self) -> None:
        if (self.index / "manifest.json").exists():
            report = check_index(self.index)
            assert report.ok, report.problems


def test_library_life(tiny_model, reference, tmp_path):
    LibraryLife.tiny_model = tiny_model
    LibraryLife.reference = reference
    LibraryLife.tmp = tmp_path
    LibraryLife.TestCase().runTest()
