"""Text encoding: full 77-token context vs. batches cut to their longest caption (clipdex's path).

Runs both on the same captions side by side, several rounds, and reports median texts/s, the ratio,
and the worst cosine between the two embeddings. Weights do not change speed, so with no network the
architecture is built with random weights (`--pretrained` to use real ones).

    python benchmarks/bench_text_trim.py --model ViT-B-32 --texts 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from _report import machine, markdown_table, write_report

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.model.encoder import Encoder

WORDS = """a man woman child dog cat red blue green small large old young wooden street beach park table
walks sits runs holds looks plays stands near under beside with on in at the of and""".split()


def captions(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words - 3, words + 3))) + f" {i}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--words", type=int, default=10, help="mean words per caption (Flickr30k: about 12)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
    model.eval()
    encoder = Encoder(
        model,
        preprocess,
        open_clip.get_tokenizer(args.model),
        torch.device("cpu"),
        ModelSpec(args.model, args.pretrained),
    )
    texts = captions(args.texts, args.words)
    runs: dict[str, list[float]] = {"full": [], "trimmed": []}
    outputs = {}
    for _ in range(args.rounds):
        for mode in ("full", "trimmed"):  # interleaved so both see the same machine load
            start = time.perf_counter()
            chunks = [
                encoder._encode_text_batch(texts[i : i + args.batch_size], trim=mode == "trimmed")
                for i in range(0, len(texts), args.batch_size)
            ]
            runs[mode].append(len(texts) / (time.perf_counter() - start))
            outputs[mode] = np.concatenate(chunks)
    cosine = float(np.min(np.sum(outputs["full"] * outputs["trimmed"], axis=1)))
    full, cut = statistics.median(runs["full"]), statistics.median(runs["trimmed"])
    rows = [
        {"mode": "full context (77)", "median texts/s": full, "runs": ", ".join(f"{r:.0f}" for r in runs["full"])},
        {"mode": "trimmed (clipdex)", "median texts/s": cut, "runs": ", ".join(f"{r:.0f}" for r in runs["trimmed"])},
    ]
    table = markdown_table(rows, ["mode", "median texts/s", "runs"])
    table += f"\n\nspeed-up (median ratio): {cut / full:.2f}x; min cosine(full, trimmed) = {cosine:.6f}"
    table += (
        f"\n{args.model}, {args.texts} captions of ~{args.words} words, batch {args.batch_size}, {args.rounds} rounds"
    )
    write_report(
        args.out,
        "text_trim",
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine(),
            "runs": runs,
            "speedup": cut / full,
            "min_cosine": cosine,
        },
        table,
    )


if __name__ == "__main__":
    main()
