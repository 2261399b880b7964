"""Fine-tuning methods compared on a domain the starting model does not know.

The starting model is a tiny CLIP (the test suite's config) trained for a few seconds on coloured circles,
squares, triangles and crosses. The domain is stars, hexagons, diamonds and rings in other colours, captioned in
catalogue wording ("SKU hexagon in teal, pink backdrop"). For each method, `clipdex finetune` runs in its own
process (so its peak memory is its own) with the same epochs and seed, and reports validation recall before and
after, trainable parameters, pairs/s (median over steps), peak RSS, checkpoint and adapter size; the tuned
checkpoint is then measured by `clipdex eval` on a held-out test set of the domain.

Where CUDA is available it also measures ViT-B-32 training throughput (pairs/s and peak GPU memory) with and
without gradient checkpointing, on synthetic batches (random weights: speed does not depend on them).

    python benchmarks/bench_finetune.py --images 300 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _report import machine, markdown_table, write_report

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the generated corpora the tests use
from corpus import make_domain_pairs, train_tiny_model, write_tiny_config

METHODS = {
    "full": ["--method", "full", "--lr", "1e-3"],
    "last-n (1 block)": ["--method", "last-n", "--layers", "1", "--lr", "2e-3"],
    "lora (rank 8)": ["--method", "lora", "--rank", "8", "--lr", "3e-3"],
    "lit": ["--method", "lit", "--lr", "1e-3"],
}


def clipdex(*args: Any) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "clipdex", *map(str, args), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clipdex {args[0]} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def run_methods(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    config = write_tiny_config(work)
    start = train_tiny_model(config, work / "start.pt", steps=args.pretrain_steps)
    model = ["--model", config, "--pretrained", start]
    pairs = make_domain_pairs(work / "domain", args.images, seed=1)
    test = make_domain_pairs(work / "domain", args.test_images, seed=2, name="test.csv")
    common = ["--epochs", args.epochs, "--batch-size", args.batch_size, "--workers", args.workers, "--seed", 0]
    base = clipdex("eval", test, *model, "--workers", args.workers)
    rows = []
    for name, method in METHODS.items():
        t0 = time.perf_counter()
        out = clipdex("finetune", pairs, "--out", work / name.split()[0], *model, *method, *common)
        wall = time.perf_counter() - t0
        tuned = clipdex("eval", test, "--model", config, "--pretrained", out["checkpoint"], "--workers", args.workers)
        rows.append(
            {
                "method": name,
                "val t→i R@5 before": 100 * out["before"]["text_to_image"]["R@5"],
                "val t→i R@5 after": 100 * out["after"]["text_to_image"]["R@5"],
                "val i→t R@5 before": 100 * out["before"]["image_to_text"]["R@5"],
                "val i→t R@5 after": 100 * out["after"]["image_to_text"]["R@5"],
                "test t→i R@5 before": 100 * base["text_to_image"]["R@5"],
                "test t→i R@5 after": 100 * tuned["text_to_image"]["R@5"],
                "best epoch": out["best_epoch"],
                "trainable params": out["trainable_params"],
                "trainable %": 100 * out["trainable_params"] / out["total_params"],
                "pairs/s": out["pairs_per_s"],
                "peak RSS MiB": out["peak_memory_mib"]["cpu_rss"],
                "checkpoint KiB": out["checkpoint_bytes"] / 1024,
                "adapter KiB": out["adapter_bytes"] / 1024 if out["adapter_bytes"] else "-",
                "train s": out["train_seconds"],
                "wall s": wall,
                "report": out,
            }
        )
    return rows


def gpu_throughput(batch: int, steps: int) -> list[dict[str, Any]]:
    """ViT-B-32 contrastive steps on synthetic batches: pairs/s and peak memory, without and with checkpointing."""
    import open_clip

    from clipdex.retrieval.finetune.loop import Trainer, make_optimizer, make_schedule

    rows = []
    for checkpointing in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = open_clip.create_model("ViT-B-32", device="cuda")
        model.set_grad_checkpointing(checkpointing)
        opt = make_optimizer(list(model.named_parameters()), lr=1e-5, weight_decay=0.1)
        trainer = Trainer(model, opt, make_schedule(opt, warmup=1, total=steps), device=torch.device("cuda"))
        pixels = torch.randn(batch, 3, 224, 224, device="cuda")
        tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a thing"] * batch).cuda()
        model.train()
        trainer.epoch(0, [(pixels, tokens)] * 3, lambda s: None)  # warm-up
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.epoch(0, [(pixels, tokens)], lambda s: None)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "gradient checkpointing": checkpointing,
                "batch": batch,
                "pairs/s (median)": batch / statistics.median(times),
                "peak GPU MiB": torch.cuda.max_memory_allocated() / 2**20,
            }
        )
        del model, trainer, opt
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="training + validation images of the domain")
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps training the starting model")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_methods(Path(tmp), args)
    columns = [c for c in rows[0] if c != "report"]
    table = "### Fine-tuning methods on an unseen domain\n\n" + markdown_table(rows, columns)
    payload: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "methods": rows,
    }
    if torch.cuda.is_available():
        gpu = gpu_throughput(args.gpu_batch, args.gpu_steps)
        payload["gpu"] = gpu
        table += "\n\n### ViT-B-32 training throughput\n\n" + markdown_table(gpu, list(gpu[0]))
    else:
        table += "\n\n(no CUDA device: the ViT-B-32 gradient-checkpointing comparison was not run)"
    write_report(args.out, "finetune", payload, table)


if __name__ == "__main__":
    main()
