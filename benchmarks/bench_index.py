"""Indexing throughput: clipdex on a folder of JPEGs vs. the model's bare forward pass vs. clip-retrieval.

Three figures from one run, interleaved over rounds so that all see the same machine load:
  * model forward: images/s of `encode_image` alone on already-preprocessed tensors (the ceiling);
  * clipdex: images/s of `clipdex index` (walk, read, hash, decode, preprocess, encode, commit, publish);
  * clip-retrieval: images/s of `clip-retrieval inference` on the same folder and checkpoint, when a
    virtualenv with clip-retrieval is given (`--clip-retrieval-python`).
With no network, a folder of synthetic JPEGs is generated and the model uses random weights (speed does not
depend on them); pass --pretrained FILE to time a real checkpoint.

    python benchmarks/bench_index.py --model ViT-B-32 --images 512 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from _report import machine, markdown_table, write_report
from PIL import Image


def make_folder(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # photo-like: smooth gradients plus noise, 640x480, JPEG quality 90
        yy, xx = np.mgrid[0:480, 0:640]
        base = np.stack(
            [(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256 for _ in range(3)],
            axis=-1,
        )
        img = np.clip(base + rng.normal(scale=12, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def forward_throughput(model: Any, size: int, batch: int, n: int) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model.encode_image(x[:2])
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model.encode_image(x)
            done += batch
    return done / (time.perf_counter() - t0)


def clipdex_throughput(
    folder: Path, config: Path | None, model: str, weights: Path, batch: int, workers: int, engine: str = "local"
) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "clipdex",
            "index",
            str(folder),
            "--index",
            str(Path(tmp) / "idx"),
            "--model",
            str(config) if config else model,
            "--pretrained",
            str(weights),
            "--batch-size",
            str(batch),
            "--device",
            "cpu",
            "--profile",
            "--json",
        ]
        if workers >= 0:
            cmd += ["--workers", str(workers)]
        if engine != "local":
            cmd += ["--engine", engine]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"clipdex failed: {proc.stderr[-1500:]}")
    added = json.loads(proc.stdout)["added"]
    profile = next((ln for ln in proc.stderr.splitlines() if ln.startswith("time:")), "")
    return added / seconds, profile


def steady_rate(profile: str, images: int) -> float:
    """images/s over the pipeline's working time (decode wait + encode + write + publish), startup excluded."""
    stages = {name.strip(): float(sec) for name, sec in re.findall(r"([a-z ]+) ([0-9.]+)s", profile)}
    busy = sum(v for k, v in stages.items() if k != "scan")
    return images / busy if busy else float("nan")


def clip_retrieval_throughput(python: str, folder: Path, model: str, weights: Path, batch: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            python,
            "-m",
            "clip_retrieval.cli",
            "inference",
            "--input_dataset",
            str(folder),
            "--output_folder",
            str(Path(tmp) / "out"),
            "--clip_model",
            f"open_clip:{model}/{weights}",
            "--batch_size",
            str(batch),
            "--num_prepro_workers",
            str(max(workers, 1)),
            "--enable_text",
            "False",
            "--enable_metadata",
            "False",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"clip-retrieval failed: {proc.stderr[-1500:]}")
    return len(list(folder.glob("*.jpg"))) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", type=Path, help="checkpoint file (default: random weights saved to a temp file)")
    ap.add_argument("--folder", type=Path, help="images to index (default: generated JPEGs)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[-1],
        help="decode workers for clipdex, one run each (-1: its default)",
    )
    ap.add_argument(
        "--engines", nargs="+", default=["local"], help="clipdex engines to time, one run each (local, ray)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clip-retrieval-python", help="python of a virtualenv with clip-retrieval installed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    try:
        folder = args.folder or tmp / "images"
        if args.folder is None:
            make_folder(folder, args.images)
        model, _, _ = open_clip.create_model_and_transforms(args.model)
        model.eval()
        weights = args.pretrained or tmp / "weights.pt"
        if args.pretrained is None:
            torch.save(model.state_dict(), weights)
        size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        runs: dict[str, list[float]] = {"model forward": []}
        label = {
            (w, e): ("" if len(args.workers) == 1 else f" (workers {'auto' if w < 0 else w})")
            + ("" if e == "local" else f" --engine {e}")
            for w in args.workers
            for e in args.engines
        }
        for key in label.values():
            runs[f"clipdex index{key}"] = []
            runs[f"clipdex index, startup excluded{key}"] = []
        profile = ""
        if args.clip_retrieval_python:
            runs["clip-retrieval inference"] = []
        for _ in range(args.rounds):
            runs["model forward"].append(
                forward_throughput(model, size, args.batch_size, len(list(folder.glob("*.jpg"))))
            )
            for (w, e), key in label.items():
                rate, profile = clipdex_throughput(folder, None, args.model, weights, args.batch_size, w, e)
                runs[f"clipdex index{key}"].append(rate)
                runs[f"clipdex index, startup excluded{key}"].append(
                    steady_rate(profile, len(list(folder.glob("*.jpg"))))
                )
            if args.clip_retrieval_python:
                runs["clip-retrieval inference"].append(
                    clip_retrieval_throughput(
                        args.clip_retrieval_python, folder, args.model, weights, args.batch_size, max(args.workers)
                    )
                )
        medians = {k: statistics.median(v) for k, v in runs.items()}
        rows = [
            {
                "pipeline": k,
                "median images/s": medians[k],
                "vs model forward": medians[k] / medians["model forward"],
                "runs": ", ".join(f"{r:.1f}" for r in v),
            }
            for k, v in runs.items()
        ]
        table = markdown_table(rows, ["pipeline", "median images/s", "vs model forward", "runs"])
        table += f"\n\n{args.model}, {len(list(folder.glob('*.jpg')))} JPEGs, batch {args.batch_size}, CPU; clipdex {profile}"
        write_report(
            args.out,
            "index_throughput",
            {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "runs": runs},
            table,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
