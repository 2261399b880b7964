"""Evaluate (model, pretrained) pairs on Flickr30k or COCO and put clipdex's recalls next to open_clip's.

open_clip publishes its retrieval results in docs/openclip_retrieval_results.csv; pass that file with
--published to compare every row, or rely on the few rows built in below. On a machine with weights and
data this confirms that clipdex reproduces the published numbers.

    python benchmarks/eval_models.py flickr30k --root data/flickr30k \\
        --pair ViT-B-32 laion2b_s34b_b79k --pair ViT-B-16-SigLIP webli --published openclip_retrieval_results.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from _report import machine, markdown_table, write_report

from clipdex.retrieval.config import EncoderConfig
from clipdex.retrieval.errors import ClipdexError
from clipdex.retrieval.evaluation.datasets import DatasetName
from clipdex.retrieval.evaluation.evaluate import EvalConfig, evaluate

# From open_clip's docs/openclip_retrieval_results.csv: (t2i R@1, R@5, R@10, i2t R@1, R@5, R@10), in %.
BUILT_IN = {
    ("ViT-B-32", "laion2b_s34b_b79k", "flickr30k"): (66.78, 88.38, 93.10, 84.10, 96.20, 98.30),
    ("ViT-B-32", "laion2b_s34b_b79k", "coco"): (39.34, 65.43, 75.61, 56.32, 79.84, 87.12),
    ("ViT-B-32", "openai", "flickr30k"): (58.78, 83.56, 90.02, 78.90, 94.90, 98.20),
    ("ViT-B-32", "openai", "coco"): (30.44, 55.94, 66.87, 50.12, 75.00, 83.52),
    ("ViT-B-16-SigLIP", "webli", "flickr30k"): (74.68, 92.30, 95.62, 89.10, 98.00, 99.30),
    ("ViT-B-16-SigLIP", "webli", "coco"): (47.78, 72.44, 81.00, 65.74, 85.42, 91.26),
}
_CSV_PREFIX = {"flickr30k": "Flickr", "coco": "MSCOCO"}


def published(path: Path | None) -> dict[tuple[str, str, str], tuple[float, ...]]:
    table = dict(BUILT_IN)
    if path is None:
        return table
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for ds, prefix in _CSV_PREFIX.items():
                keys = [f"{prefix} image retr. R@{k}" for k in (1, 5, 10)] + [
                    f"{prefix} text retr. R@{k}" for k in (1, 5, 10)
                ]
                if all(row.get(k) for k in keys):
                    table[(row["name"], row["pretrained"], ds)] = tuple(100 * float(row[k]) for k in keys)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=[d.value for d in DatasetName])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("MODEL", "PRETRAINED"), required=True)
    ap.add_argument("--published", type=Path, help="open_clip's openclip_retrieval_results.csv")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    reference = published(args.published)
    rows: list[dict[str, Any]] = []
    results = []
    for model, pretrained in args.pair:
        config = EvalConfig(
            DatasetName(args.dataset),
            args.root,
            EncoderConfig(model, pretrained, args.device),
            split=args.split,
            batch_size=args.batch_size,
            workers=args.workers,
            limit=args.limit,
        )
        try:
            result = evaluate(config)
        except ClipdexError as e:
            print(f"skipped {model} / {pretrained}: {e}")
            continue
        results.append(result)
        ours = [100 * result[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
        pub = reference.get((model, pretrained, args.dataset))
        row: dict[str, Any] = {"model": model, "pretrained": pretrained, "images/s": result["images_per_s"]}
        names = ("T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10")
        for i, (name, value) in enumerate(zip(names, ours, strict=True)):
            row[name] = f"{value:.2f}" + (f" ({pub[i]:.2f})" if pub and args.limit is None else "")
        rows.append(row)
    columns = ["model", "pretrained", "T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10", "images/s"]
    table = markdown_table(rows, columns) + "\n\nclipdex's recall in %, open_clip's published figure in parentheses."
    write_report(args.out, f"eval_{args.dataset}_{args.split}", {"machine": machine(), "results": results}, table)


if __name__ == "__main__":
    main()
