"""Accuracy cost of storing vectors as float16: top-10 agreement and score error against float32.

python benchmarks/bench_fp16.py --n 200000 --dim 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np
from _report import machine, markdown_table, write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim))
    x = centres[rng.integers(0, 1000, args.n)] + rng.normal(scale=0.9, size=(args.n, args.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = centres[rng.integers(0, 1000, args.queries)] + rng.normal(scale=1.1, size=(args.queries, args.dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    half = x.astype(np.float16).astype(np.float32)
    _, i32 = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, i16 = faiss.knn(q, half, 10, metric=faiss.METRIC_INNER_PRODUCT)
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i32, i16, strict=True)]))
    same_order = float(np.mean(np.all(i32 == i16, axis=1)))
    score_err = float(np.max(np.abs((half - x) @ q[:100].T)))
    norm_err = float(np.max(np.abs(np.linalg.norm(half, axis=1) - 1)))
    rows = [
        {
            "n": args.n,
            "dim": args.dim,
            "recall@10 (fp16 vs fp32 exact)": overlap,
            "identical top-10 order": same_order,
            "max |score error|": score_err,
            "max |norm - 1|": norm_err,
            "bytes/vector": f"{2 * args.dim} vs {4 * args.dim}",
        }
    ]
    table = markdown_table(rows, list(rows[0]))
    write_report(args.out, "fp16", {"machine": machine(), "rows": rows}, table)


if __name__ == "__main__":
    main()
