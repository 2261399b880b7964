"""A plan for LAION-5B scale (5.85 billion pairs), computed from figures measured here, plus one simulation.

Inputs: single-query latency against vectors scanned from `bench_ondisk.py` (on-disk IVF,Flat lists, d=512). Measured
here: recall@10 against nprobe at several sizes on a hard corpus (many small overlapping clusters, queries that are
perturbed corpus vectors: close to IVF's worst case, where bench_ondisk's clustered corpus is close to its best),
with clipdex's cell count; and a
simulation that splits one corpus into 8 shards, searches each and merges their top-10, against one index over the
whole corpus at the same nprobe: what sharding, the way past one machine, costs. Encoding is GPU-hours at a rate
per GPU, given as a table of rates, since no GPU was measured here.

    python benchmarks/plan_billions.py --latency benchmarks/results/ondisk.json benchmarks/results/ondisk_4m.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _report import machine, markdown_table, write_report

from clipdex.retrieval import ann

N = 5_850_000_000
GiB = 2**30
TiB = 2**40


def scanned_for(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The cheapest measured nprobe reaching `target` recall@10, with the vectors it scans."""
    for r in sorted(rows, key=lambda r: r["nprobe"]):
        if r["recall@10"] >= target:
            return {**r, "target": target, "vectors scanned": r["n"] * r["scanned %"] / 100}
    return None


def ms_per_million(rows: list[dict[str, Any]]) -> float:
    """Median single-thread milliseconds per million float32 vectors scanned (d=512), from the larger probes."""
    rates = [r["p50 ms"] / (r["n"] * r["scanned %"] / 100 / 1e6) for r in rows if r["n"] * r["scanned %"] / 100 >= 2e4]
    return float(np.median(rates))


def hard_corpus(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Many small, overlapping clusters (one centre per 25 vectors, cosine to it about 0.7) and queries that are
    perturbed corpus vectors: neighbours spread over many cells, unlike bench_ondisk's easy data."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 25), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 250_000):
        m = min(250_000, n - s)
        v = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=1.0 / math.sqrt(d), size=(m, d)).astype(
            np.float32
        )
        x[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    q = x[rng.integers(0, n, 500)] + rng.normal(scale=0.8 / math.sqrt(d), size=(500, d)).astype(np.float32)
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def build_ivf(x: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> faiss.Index:
    """IVF,Flat with the cells clipdex chooses for this many vectors, trained on 40 a cell (in memory: recall is
    the same as on disk, tests/test_ondisk.py)."""
    cells = ann.nlist_for(len(x))
    train = x[np.sort(rng.choice(len(x), size=min(len(x), 40 * cells), replace=False))]
    return ann.build_index([(x, ids)], x.shape[1], factory=f"IVF{cells},Flat", train=train)


def recall_curves(sizes: list[int], d: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        x, q = hard_corpus(n, d, seed=n)
        ids = np.arange(n, dtype=np.int64)
        truth = ann.exact_top_k(q, [(x[s : s + 100_000], ids[s : s + 100_000]) for s in range(0, n, 100_000)], 10)
        index = build_ivf(x, ids, np.random.default_rng(1))
        nlist = ann.find_ivf(index).nlist
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            if nprobe > nlist:
                break
            ann.apply_params(index, f"nprobe={nprobe}")
            _, found = index.search(q, 10)
            recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
            rows.append(
                {"n": n, "cells": nlist, "nprobe": nprobe, "scanned %": 100 * nprobe / nlist, "recall@10": recall}
            )
        del x, index
    return rows


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def shard_simulation(n: int, d: int, shards: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    x, q = hard_corpus(n, d, seed)
    ids = np.arange(n, dtype=np.int64)
    truth = ann.exact_top_k(q, [(x, ids)], 10)

    def build(part: slice) -> faiss.Index:
        return build_ivf(x[part], ids[part], rng)

    whole = build(slice(0, n))
    size = n // shards
    parts = [build(slice(s * size, (s + 1) * size)) for s in range(shards)]
    own = [
        ann.exact_top_k(q, [(x[s * size : (s + 1) * size], ids[s * size : (s + 1) * size])], 10) for s in range(shards)
    ]
    rows = []
    for nprobe in (1, 2, 4, 8, 16, 32):
        for index in [whole, *parts]:
            ann.apply_params(index, f"nprobe={nprobe}")
        _, one = whole.search(q, 10)
        results = [p.search(q, 10) for p in parts]
        scores = np.concatenate([r[0] for r in results], axis=1)
        labels = np.concatenate([r[1] for r in results], axis=1)
        merged = np.take_along_axis(labels, np.argsort(-scores, axis=1)[:, :10], axis=1)
        recall = [_recall(got, truth) for got in (one, merged)]
        worst_shard = min(_recall(r[1], t) for r, t in zip(results, own, strict=True))
        rows.append(
            {
                "n": n,
                "nprobe": nprobe,
                "recall@10 one index": recall[0],
                "scanned, one index": nprobe * n / ann.find_ivf(whole).nlist,
                f"recall@10 {shards} shards merged": recall[1],
                "worst shard's recall@10 of its own top-10": worst_shard,
                "scanned a shard (in parallel)": nprobe * size / ann.find_ivf(parts[0]).nlist,
            }
        )
    return rows


def plan(dim: int, ms_per_m: float, budget_gib: float, rates: dict[str, float]) -> list[dict[str, Any]]:
    """One kind's index at 5.85B: PQ codes in RAM across machines, each machine one shard searched in parallel;
    per nprobe, the vectors each shard scans and what scanning that many float32 vectors costs one thread here."""
    pq = dim // 8  # bytes of PQ code a vector (OPQ rotation first), re-ranked exactly from float16 vectors
    code_bytes = N * (pq + 8)
    usable = 0.75 * budget_gib * GiB  # the rest for the OS, the coarse quantizer, query buffers
    machines = math.ceil(code_bytes / usable)
    shard = N / machines
    nlist = ann.nlist_for(int(shard))
    base = {
        "dim": dim,
        "float16 vectors TiB": N * dim * 2 / TiB,
        "index (a shard)": f"OPQ{pq},IVF{nlist}_HNSW32,PQ{pq}",
        "PQ codes + ids TiB": code_bytes / TiB,
        f"machines ({budget_gib:.0f} GiB each)": machines,
        "vectors a shard": shard,
        "coarse centroids GiB": nlist * dim * 4 / GiB,
        **{f"encode GPU-h at {name}": N / rate / 3600 for name, rate in rates.items()},
    }
    return [
        {
            **base,
            "nprobe": nprobe,
            "scanned % a shard": 100 * nprobe / nlist,
            "vectors scanned a shard": nprobe * shard / nlist,
            "Flat-scan ms, 1 thread (upper bound)": nprobe * shard / nlist / 1e6 * ms_per_m * dim / 512,
        }
        for nprobe in (16, 64, 256)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=Path, nargs="+", required=True, help="bench_ondisk.py JSON files")
    ap.add_argument("--budget-gib", type=float, default=256, help="memory per machine")
    ap.add_argument("--shard-n", type=int, default=400_000, help="vectors in the sharding simulation")
    ap.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 2_000_000], help="recall curves")
    ap.add_argument("--reuse", type=Path, help="take the recall curves and the simulation from this earlier JSON")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    ms = ms_per_million([r for f in args.latency for r in json.loads(f.read_text())["rows"]])
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        curves, simulation = earlier["curves"], earlier["simulation"]
    else:
        curves, simulation = recall_curves(args.sizes, 512), shard_simulation(args.shard_n, 512, 8)
    rates = {"1,000 img/s": 1000.0, "3,000 img/s": 3000.0, "10,000 img/s": 10000.0}
    plans = [row for d in (512, 768) for row in plan(d, ms, args.budget_gib, rates)]
    payload = {
        "machine": machine(),
        "ms_per_million_scanned": ms,
        "curves": curves,
        "plans": plans,
        "simulation": simulation,
    }
    table = "\n\n".join(
        [
            markdown_table(curves, list(curves[0])),
            f"single-thread scan cost {ms:.1f} ms per million float32 vectors (d=512, bench_ondisk)",
            markdown_table(plans, list(plans[0])),
            markdown_table(simulation, list(simulation[0])),
        ]
    )
    write_report(args.out, "plan_billions", payload, table)


if __name__ == "__main__":
    main()
