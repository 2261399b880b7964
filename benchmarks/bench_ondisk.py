"""On-disk IVF indexes larger than memory: build memory against its budget, build time, recall and latency curves.

For each size n: n unit vectors of dimension d around 4096 cluster centres, written as float16 shards (as clipdex
stores vectors above the exact-search size), then the index is built exactly as `clipdex build --on-disk --memory
M` builds it (`retrieval.build.build_on_disk`: a budget-sized training sample, lists added in blocks and merged
into one on-disk file by faiss.contrib.ondisk, tuned to the target recall). Measured: the most anonymous memory
(RssAnon, sampled every millisecond) the build held above the process before it, build seconds, the lists
file's size; then, on 500 held-out queries (noisier than the data, as text queries lie off image vectors),
recall@10 against exact search and single-query latency (p50, one thread) at each nprobe, and how much of the
lists file one query maps in at each nprobe, on a freshly opened index (what a search reads).

    python benchmarks/bench_ondisk.py --n 1000000 4000000 --dim 512 --memory 512M
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _report import machine, markdown_table, write_report

from clipdex.retrieval import ann
from clipdex.retrieval.ann.build import build_on_disk
from clipdex.retrieval.store.manifest import AnnSettings
from clipdex.retrieval.store.shards import LiveVectors

_SHARD = 250_000


def anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError


def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def write_corpus(folder: Path, n: int, d: int, centres: np.ndarray, rng: np.random.Generator) -> LiveVectors:
    shards = []
    for s, start in enumerate(range(0, n, _SHARD)):
        m = min(_SHARD, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=0.6 / np.sqrt(d), size=(m, d)).astype(
            np.float32
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / f"{s}.npy", x.astype(np.float16))
        shards.append(m)
    ids = np.arange(n, dtype=np.int64)
    shard = np.repeat(np.arange(len(shards)), shards)
    row = np.concatenate([np.arange(m) for m in shards])
    return LiveVectors(ids, shard, row, lambda s: np.load(folder / f"{s}.npy", mmap_mode="r"), d)


def run_size(n: int, d: int, budget: int, queries: np.ndarray, centres: np.ndarray, work: Path) -> list[dict[str, Any]]:
    folder = work / f"n{n}"
    folder.mkdir()
    live = write_corpus(folder, n, d, centres, np.random.default_rng(n))
    base, peak, done = anon(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    lists = folder / "index.ivfdata"
    index, info = build_on_disk(
        live, AnnSettings(memory=budget, on_disk=True), out=folder / "index.faiss", lists=lists, queries=None
    )
    build_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    held = max(peak[0], anon()) - base
    del index
    index = ann.read_index(folder / "index.faiss")  # as a search opens it
    truth = ann.exact_top_k(queries, live.batches(), 10)
    ivf = ann.find_ivf(index)
    rows = []
    faiss.omp_set_num_threads(1)
    for nprobe in (1, 4, 16, 32, 64, 128, 256):
        if nprobe > ivf.nlist:
            break
        ann.apply_params(index, f"nprobe={nprobe}")
        lat = []
        for q in queries[:200]:
            t = time.perf_counter()
            index.search(q[None], 10)
            lat.append(1000 * (time.perf_counter() - t))
        _, found = index.search(queries, 10)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        rows.append(
            {
                "n": n,
                "dim": d,
                "factory": info.factory,
                "budget MiB": budget / 2**20,
                "corpus MiB (float32)": n * d * 4 / 2**20,
                "build held MiB": held / 2**20,
                "build s": build_s,
                "lists MiB": lists.stat().st_size / 2**20,
                "tuned": info.params,
                "nprobe": nprobe,
                "scanned %": 100 * nprobe / ivf.nlist,
                "recall@10": recall,
                "p50 ms": statistics.median(lat),
            }
        )
    # what one search reads: a fresh open, one query, the lists file's pages mapped in after it
    del index
    for r in rows:
        fresh = ann.read_index(folder / "index.faiss", params=f"nprobe={r['nprobe']}")
        before = mapped_bytes(lists)
        fresh.search(queries[:1], 10)
        r["one query maps MiB"] = (mapped_bytes(lists) - before) / 2**20
        del fresh
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    budget = ann.parse_memory(args.memory)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4096, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    q = centres[rng.integers(0, 4096, 500)] + rng.normal(scale=0.8 / np.sqrt(args.dim), size=(500, args.dim)).astype(
        np.float32
    )
    queries = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for n in args.n:
            rows += run_size(n, args.dim, budget, queries, centres, Path(tmp))
            print(markdown_table([r for r in rows if r["n"] == n], list(rows[-1])), flush=True)
    payload = {"machine": machine(), "args": {**vars(args), "out": str(args.out)}, "rows": rows}
    write_report(args.out, "ondisk", payload, markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
