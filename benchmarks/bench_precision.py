"""int8 against fp32 (issue 18, `clipdex index --precision`): how far the vectors move and how much the rankings
change, on a model whose rankings mean something.

With no pretrained weights to download here, the model is the tests' tiny CLIP, trained for a few seconds on
Pillow-drawn scenes with captions that describe them (tests/corpus.py), and the library is N such scenes. (A
random-weight ViT maps every image close to every other, so its rankings are noise: bench_vs_rclip reports int8's
speed on ViT-B-32-256, this reports its agreement.) The same folder is indexed at fp32 and at int8, then:

  * cosine between each photo's int8 and fp32 vectors (min, median);
  * text->image: top-10 overlap between the two indexes' answers for Q captions of unseen scenes (mean, min), and
    whether the top-1 is the same;
  * image->image ("more like this") the same, for Q photos of the library.

    python benchmarks/bench_precision.py --n 400 --queries 100
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import machine, markdown_table, write_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from corpus import make_images, random_scene, train_tiny_model, write_tiny_config

    from clipdex.retrieval.config import Kind
    from clipdex.retrieval.search.query import Query
    from clipdex.retrieval.search.searcher import Searcher
    from clipdex.retrieval.store.manifest import read_manifest
    from clipdex.retrieval.store.reader import PublishedItems

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    config = write_tiny_config(work)
    weights = train_tiny_model(config, work / "tiny-clip.pt", steps=args.steps)
    photos = make_images(work / "photos", args.n, seed=7)
    indexes = {}
    for precision in ("fp32", "int8"):
        indexes[precision] = work / f"idx-{precision}"
        cmd = [sys.executable, "-m", "clipdex", "index", str(work / "photos"), "--index", str(indexes[precision])]
        cmd += ["--model", str(config), "--pretrained", str(weights), "--precision", precision]
        subprocess.run(cmd, check=True, env={"CLIPDEX_CACHE": str(work / "cache"), **_env()}, capture_output=True)

    def stored(index: Path) -> dict[str, np.ndarray]:
        items = PublishedItems.open(index, read_manifest(index))
        ids = items.of_kind(Kind.IMAGE)
        return {r["path"]: v for r, v in zip(items.rows(ids), items.vectors(ids), strict=True)}

    full, low = stored(indexes["fp32"]), stored(indexes["int8"])
    cosines = np.array([float(full[p] @ low[p]) for p in full])

    rng = random.Random(11)
    texts = [random_scene(rng).captions(rng, 1)[0] for _ in range(args.queries)]
    images = [p for p, _ in rng.sample(photos, min(args.queries, len(photos)))]
    os.environ["CLIPDEX_CACHE"] = str(work / "cache")
    searchers = {p: Searcher(indexes[p], device="cpu") for p in indexes}

    def agreement(queries: list[Query]) -> dict[str, float]:
        overlaps, same_first = [], []
        for query in queries:
            paths_a, paths_b = ([h.path for h in searchers[p].search(query, k=10)] for p in ("fp32", "int8"))
            overlaps.append(len(set(paths_a) & set(paths_b)) / 10)
            same_first.append(paths_a[0] == paths_b[0])
        return {
            "top-10 overlap mean": round(statistics.mean(overlaps), 3),
            "top-10 overlap min": min(overlaps),
            "same top-1": f"{sum(same_first)}/{len(same_first)}",
        }

    rows = [
        {"queries": f"text->image ({len(texts)})", **agreement([Query.build(text=t) for t in texts])},
        {"queries": f"image->image ({len(images)})", **agreement([Query.build(image=p) for p in images])},
    ]
    vectors = {"photos": len(cosines), "cosine min": round(float(cosines.min()), 5),
               "cosine median": round(float(np.median(cosines)), 5)}  # fmt: skip
    table = markdown_table([vectors], list(vectors)) + "\n\n" + markdown_table(rows, list(rows[0]))
    payload = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "vectors": vectors, "rows": rows}
    write_report(args.out, "precision", payload, table)
    print(table)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}


if __name__ == "__main__":
    main()
