"""Filtered search: latency and recall@10 within the filter against selectivity, at N vectors.

N synthetic unit vectors (clustered) in clip-retrieval's layout, spread over 100 folders, imported with
`clipdex import` (clipdex chooses and tunes its IVF index); queries are stored vectors of other items (`--like`,
so the model's text tower is not what is timed). `--in` a set of folders selects 1% to 100% of the items; the
first search of a filter runs DuckDB over the item table, later ones reuse its answer, and both are reported.
Recall@10 is against brute force over the matching items.

    python benchmarks/bench_filter.py --n 1000000 --queries 50
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _report import machine, markdown_table, write_report

SELECTIVITY = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--memory", default=None, help="--memory for the import (e.g. 1.2G)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import open_clip
    import torch

    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.search.filters import Filter
    from clipdex.retrieval.search.query import Query
    from clipdex.retrieval.search.searcher import Searcher

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        centres = rng.normal(size=(1000, args.dim)).astype(np.float32)
        x = centres[rng.integers(0, 1000, args.n)] + 0.6 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        (tmp / "emb" / "img_emb").mkdir(parents=True)
        (tmp / "emb" / "metadata").mkdir()
        np.save(tmp / "emb" / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
        folder = np.arange(args.n) % 100
        pq.write_table(
            pa.table({"image_path": [f"/photos/f{f:02d}/{i:07d}.jpg" for i, f in enumerate(folder)]}),
            tmp / "emb" / "metadata" / "metadata_0.parquet",
        )
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), tmp / "vit.pt")
        cmd = [
            sys.executable,
            "-m",
            "clipdex",
            "import",
            str(tmp / "emb"),
            "--index",
            str(tmp / "idx"),
            "--model",
            "ViT-B-32",
            "--pretrained",
            str(tmp / "vit.pt"),
        ] + (["--memory", args.memory] if args.memory else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        build_s = time.perf_counter() - t0
        searcher = Searcher(tmp / "idx", device="cpu")
        chosen = searcher.manifest.ann["images"]
        ids = searcher.ids(Kind.IMAGE)
        stored = searcher.vectors(ids).astype(np.float32)  # float16 on disk past exact size
        paths = np.array([r["path"] for r in searcher.rows(ids)])
        queries = rng.choice(len(ids), args.queries, replace=False)
        rows = []
        for share in SELECTIVITY:
            folders = [f"/photos/f{f:02d}" for f in range(max(1, round(100 * share)))]
            where = Filter(where="folder IN (" + ", ".join(f"'{f}'" for f in folders) + ")")
            t0 = time.perf_counter()
            plan = searcher.filter_plan(where, Kind.IMAGE)
            first_ms = 1000 * (time.perf_counter() - t0)
            inside = np.isin(np.char.rpartition(paths.astype(str), "/")[:, 0], folders)
            latencies, recalls = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = searcher.search(Query.build(like=int(ids[q])), k=10, where=where, include_self=True)
                latencies.append(1000 * (time.perf_counter() - t0))
                scores = stored[inside] @ stored[q]
                truth = set(ids[inside][np.argsort(-scores, kind="stable")[:10]].tolist())
                recalls.append(len(truth & {h.id for h in hits}) / 10)
            rows.append(
                {
                    "selectivity": share,
                    "matched": plan["matched"],
                    "method": plan["method"],
                    "first_filter_ms": first_ms,
                    "p50_ms": statistics.median(latencies),
                    "p99_ms": sorted(latencies)[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
                    "recall_at_10": float(np.mean(recalls)),
                }
            )
            print(rows[-1], flush=True)
    table = markdown_table(
        rows, ["selectivity", "matched", "method", "first_filter_ms", "p50_ms", "p99_ms", "recall_at_10"]
    )
    payload = {
        "machine": machine(),
        "n": args.n,
        "dim": args.dim,
        "index": chosen.to_json(),
        "build_s": build_s,
        "rows": rows,
    }
    write_report(args.out, "filter", payload, table)


if __name__ == "__main__":
    main()
