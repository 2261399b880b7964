"""ANN search: clipdex's automatic index vs. the index autofaiss picks, same vectors, same memory budget.

n clustered vectors of dimension d (unit length), 1000 held-out queries drawn near the clusters but off the
data (like text queries against image vectors). For each index: build time, index bytes, recall@10 against
exact search, QPS at batch 1 and 1000, p50/p99 single-query latency. autofaiss runs in its own virtualenv
(it pins numpy 1.x) as a subprocess; both indexes are then searched here, side by side, with the same FAISS.
To compare at equal recall, autofaiss's nprobe is raised until its recall@10 reaches clipdex's.

    python -m venv /tmp/af && /tmp/af/bin/pip install autofaiss
    python benchmarks/bench_search.py --n 1000000 --memory 1.2G --autofaiss-python /tmp/af/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _report import machine, markdown_table, write_report

from clipdex.retrieval import ann
from clipdex.retrieval.ann.build import build_kind
from clipdex.retrieval.store.manifest import AnnSettings
from clipdex.retrieval.store.shards import LiveVectors

_AUTOFAISS = """
import sys, numpy as np
from autofaiss import build_index
x = np.load(sys.argv[1], mmap_mode="r")
index, info = build_index(np.asarray(x), save_on_disk=False, max_index_memory_usage=sys.argv[3],
                          current_memory_available="16G", metric_type="ip", min_nearest_neighbors_to_retrieve=10,
                          verbose=40)
import faiss; faiss.write_index(index, sys.argv[2])
print(info.get("index_key", ""))
"""


def clustered(n: int, d: int, rng: np.random.Generator, centres: np.ndarray, noise: float) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 200_000):
        m = min(200_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=noise, size=(m, d)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(
    name: str, index: Any, queries: np.ndarray, truth: np.ndarray, fetch: Any, build_s: float, key: str
) -> dict[str, Any]:
    faiss.omp_set_num_threads(1)  # single-query latency is a one-thread figure
    lat = []
    for q in queries[:300]:
        t0 = time.perf_counter()
        ann.search_reranked(index, q[None], 10, fetch)
        lat.append(1000 * (time.perf_counter() - t0))
    faiss.omp_set_num_threads(0)
    t0 = time.perf_counter()
    _, found = ann.search_reranked(index, queries, 10, fetch)
    batch_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    return {
        "index": name,
        "factory": key,
        "build s": build_s,
        "index MiB": len(faiss.serialize_index(index)) / 2**20,
        "recall@10": recall,
        "QPS batch 1": 1000 / statistics.mean(lat),
        "QPS batch 1000": len(queries) / batch_s,
        "p50 ms": float(np.percentile(lat, 50)),
        "p99 ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory", default="1G", help="index memory budget given to both")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--autofaiss-python", help="python of a virtualenv with autofaiss installed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim)).astype(np.float32)
    x = clustered(args.n, args.dim, rng, centres, noise=0.9)
    queries = clustered(1000, args.dim, np.random.default_rng(1), centres, noise=1.1)  # off the data, like text
    ids = np.arange(args.n, dtype=np.int64)
    truth = ann.exact_top_k(queries, [(x, ids)], 10)
    live = LiveVectors(ids, np.zeros(args.n, np.int64), ids, lambda _: x, args.dim)

    rows = []
    t0 = time.perf_counter()
    settings = AnnSettings(memory=ann.parse_memory(args.memory), target_recall=args.target_recall)
    index, info = build_kind(live, settings)
    rows.append(
        measure(
            "clipdex",
            index,
            queries,
            truth,
            live.fetch,
            time.perf_counter() - t0,
            f"{info.factory} {info.params}",
        )
    )

    if args.autofaiss_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "x.npy", x)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    args.autofaiss_python,
                    "-c",
                    _AUTOFAISS,
                    str(Path(tmp) / "x.npy"),
                    str(Path(tmp) / "af.index"),
                    args.memory.upper().rstrip("B") + "B" if not args.memory.upper().endswith("B") else args.memory,
                ],
                capture_output=True,
                text=True,
            )
            build_s = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"autofaiss failed: {proc.stderr[-2000:]}", file=sys.stderr)
                af = None
            else:
                af = faiss.read_index(str(Path(tmp) / "af.index"))
    else:
        af = None
    if af is not None:
        key = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
        # autofaiss's index ids are row numbers, which here are our ids
        rows.append(measure("autofaiss (its nprobe)", af, queries, truth, None, build_s, key))
        ivf = faiss.extract_index_ivf(af) if "IVF" in key else None
        if ivf is not None and rows[-1]["recall@10"] < rows[0]["recall@10"]:
            for nprobe in (2**i for i in range(0, 14)):
                if nprobe > ivf.nlist:
                    break
                ivf.nprobe = nprobe
                _, found = af.search(queries, 10)
                if (
                    np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
                    >= rows[0]["recall@10"]
                ):
                    break
            rows.append(
                measure(f"autofaiss (nprobe={ivf.nprobe}, equal recall)", af, queries, truth, None, build_s, key)
            )

    columns = [
        "index",
        "factory",
        "build s",
        "index MiB",
        "recall@10",
        "QPS batch 1",
        "QPS batch 1000",
        "p50 ms",
        "p99 ms",
    ]
    table = markdown_table(rows, columns)
    table += f"\n\n{args.n} x {args.dim} clustered vectors, budget {args.memory}, 1000 off-data queries; {machine()['cores']} cores"
    write_report(
        args.out,
        f"search_{args.n}",
        {"args": vars(args) | {"out": str(args.out)}, "machine": machine(), "rows": rows, "clipdex_ann": info},
        table,
    )


if __name__ == "__main__":
    main()
