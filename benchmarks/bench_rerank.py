"""The cross-attention re-ranker against the contrastive space it re-ranks, on a compositional domain with twins.

The domain (tests/corpus.make_compositional_pairs): two coloured shapes per image, captions that say which colour
goes with which shape ("a red circle and a blue square"). The test gallery holds every image with its
attribute-swapped twin (the same shapes and places, the colours exchanged), so a caption's image and its twin
differ only in binding. The starting model is the tests' tiny CLIP, briefly trained on single objects.

Every step is a `clipdex` command in its own process, as a user runs them:
1. `eval` of the starting model (the contrastive space, untuned);
2. `finetune --method full` on the training pairs, then `eval` (the contrastive space, tuned); the same with
   `--hard-negatives 8` (batches of groups of 8 images the starting model finds similar: the NegCLIP-style
   two-tower baseline, its negatives mined, not crafted);
3. `finetune --method rerank` over the tuned model, then `eval --rerank HEAD --rerank-k K` (the head's score: its
   logit plus the share of the cosine it chose on validation recall).
Then, in this process: the head's logit alone on the same features; the head's latency per query at K = 16, 32, 128
(the head alone on kept token features, and with the K images' token features recomputed at query time: decode and
image tower); head size; training time. Then the single-object domains (shapes, and the unseen product catalogue:
re-ranking must not lose there), and ViT-B-32's cost (random weights).

    python benchmarks/bench_rerank.py --train 1500 --test 100 --head-epochs 40
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
from corpus import make_compositional_pairs, make_domain_pairs, make_shape_pairs, train_tiny_model, write_tiny_config


def clipdex(*args: Any) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "clipdex", *map(str, args), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clipdex {args[0]} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def t2i(result: dict[str, Any], key: str | None = None) -> dict[str, float]:
    return (result[key] if key else result)["text_to_image"]


def itm_alone(tuned: list[Any], head_path: Path, test: Path, ks: list[int]) -> tuple[list[dict[str, Any]], Any]:
    """The head's logit alone (no share of the cosine) over the top-K, on the test set; and the features, for
    latency."""
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.evaluation.datasets import Skipped, read_pairs
    from clipdex.retrieval.model.encoder import load_model
    from clipdex.retrieval.search.rerank import dataset_features, load_head, reranked_recall

    loaded = load_model(EncoderConfig(model=str(tuned[1]), pretrained=str(tuned[3])))
    loaded.model.eval()
    ds = read_pairs(test, text_column=None, image_column=None, skipped=Skipped())
    f = dataset_features(loaded, ds, batch_size=64, workers=0, options=loaded.encoder().decode_options())
    head = load_head(head_path, loaded.spec)
    chosen, head.contrastive_weight = head.contrastive_weight, 0.0
    rows = [{"system": f"re-ranked top-{k}: ITM logit alone", **reranked_recall(head, f, k)["text_to_image"]}
            for k in ks]  # fmt: skip
    head.contrastive_weight = chosen
    return rows, (loaded, head, f, ds)


def single_object(work: Path, config: Path, start: Path, n_train: int, n_test: int, epochs: int) -> list[dict]:
    """Re-ranking where one object has one colour (nothing to bind): the shapes the model was trained on, and the
    unseen product-catalogue domain; the head trained over the model as it is, `eval` with and without it."""
    rows = []
    for name in ("shapes", "catalogue"):
        folder = work / name
        if name == "shapes":
            train = make_shape_pairs(folder, n_train, seed=11, name="train.csv")
            test = make_shape_pairs(folder, n_test, seed=12, captions_per_image=1, name="test.csv")
        else:
            train = make_domain_pairs(folder, n_train, seed=11, name="train.csv")
            test = make_domain_pairs(folder, n_test, seed=12, captions_per_image=1, name="test.csv")
        model = ["--model", config, "--pretrained", start]
        rr = clipdex("finetune", train, *model, "--out", folder / "rr", "--method", "rerank", "--epochs", epochs,
                     "--batch-size", 64, "--workers", 1)  # fmt: skip
        ev = clipdex("eval", test, *model, "--workers", 1, "--rerank", rr["head"])
        rows.append({"domain": name, "contrastive R@1": ev["text_to_image"]["R@1"],
                     "re-ranked R@1": ev["reranked"]["text_to_image"]["R@1"],
                     "contrastive R@5": ev["text_to_image"]["R@5"], "re-ranked R@5": ev["reranked"]["text_to_image"]["R@5"],
                     "weight": rr["contrastive_weight"]})  # fmt: skip
    return rows


def vit_b_32_cost(ks: list[int], rounds: int) -> list[dict[str, Any]]:
    """ViT-B-32 (random weights: the cost does not depend on them) with a head at its default size: milliseconds to
    re-score K candidates from kept (projected) tokens, and with their tokens recomputed (image tower) first."""
    import open_clip

    from clipdex.retrieval.search.rerank import RerankHead, head_config_for, image_tokens, text_tokens

    model = open_clip.create_model("ViT-B-32").eval()
    head = RerankHead(head_config_for(model)).eval()
    ids = open_clip.get_tokenizer("ViT-B-32")(["a red circle on the left and a blue square on the right"])
    rows = []
    for k in ks:
        pixels = torch.randn(k, 3, 224, 224)
        kept, recomputed = [], []
        with torch.no_grad():
            tokens, mask = text_tokens(model, ids)
            projected = head.project_image(image_tokens(model, pixels))
            for _ in range(rounds):
                t0 = time.perf_counter()
                head(projected, tokens.expand(k, -1, -1), mask.expand(k, -1), projected=True)
                kept.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                head(image_tokens(model, pixels), tokens.expand(k, -1, -1), mask.expand(k, -1))
                recomputed.append(1000 * (time.perf_counter() - t0))
        rows.append({"K": k, "kept features ms": statistics.median(kept),
                     "recomputed features ms": statistics.median(recomputed),
                     "kept bytes per image (fp16, head width)": int(projected[0].numel() * 2)})  # fmt: skip
    return rows


def latency(state: Any, ks: list[int], rounds: int) -> list[dict[str, Any]]:
    """Milliseconds per query to re-score K candidates: the head on kept token features, and with the candidates'
    token features recomputed (decode + image tower) at query time; medians of `rounds`."""
    from clipdex.retrieval.search.rerank import image_tokens

    loaded, head, f, ds = state
    options = loaded.encoder().decode_options()
    rows = []
    for k in ks:
        k_eff = min(k, len(ds.images))
        kept, recomputed = [], []
        for r in range(rounds):
            cand = torch.arange(k_eff)
            text = torch.full((k_eff,), r % len(f.owner))
            with torch.no_grad():
                t0 = time.perf_counter()
                p = f.pairs(cand, text)
                head(p.image, p.text, p.text_mask)
                kept.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                pixels = torch.stack(
                    [loaded.preprocess(options.decode(ds.images[i].read_bytes()).image) for i in range(k_eff)]
                )
                tokens = image_tokens(loaded.model, pixels)
                head(tokens, p.text, p.text_mask)
                recomputed.append(1000 * (time.perf_counter() - t0))
        rows.append({"K": k_eff, "kept features ms": statistics.median(kept),
                     "recomputed features ms": statistics.median(recomputed)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1500, help="training images (two captions each)")
    parser.add_argument("--test", type=int, default=100, help="test images, each with its twin")
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--head-epochs", type=int, default=80)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--single-train", type=int, default=400, help="training images of each single-object domain")
    parser.add_argument("--single-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="another starting model and domain sample (0: as before)")
    parser.add_argument("--skip-extras", action="store_true", help="only the compositional domain and its latency")
    parser.add_argument("--only-single", action="store_true", help="only the single-object domains")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ks = [16, 32]
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
        work = Path(tmp)
        config = write_tiny_config(work)
        start = train_tiny_model(config, work / "start.pt", seed=args.seed)
        if args.only_single:
            single = single_object(work, config, start, args.single_train, args.single_test, args.head_epochs)
            md = "single-object domains: R@1 with and without the head (over the starting model)\n\n"
            write_report(args.out, "rerank_single", {"machine": machine(), "args": vars(args) | {"out": str(args.out)},
                                                     "single_object": single},
                         md + markdown_table(single, list(single[0])))  # fmt: skip
            return
        data_seed = 1 + 10 * args.seed
        train = make_compositional_pairs(work / "domain", args.train, seed=data_seed, twins=False, name="train.csv")
        test = make_compositional_pairs(work / "domain", args.test, seed=data_seed + 1, twins=True, name="test.csv")
        common = ["--batch-size", 64, "--workers", 1, "--seed", 0]
        rows = [{"system": "contrastive, untuned", **t2i(clipdex("eval", test, "--model", config, "--pretrained", start,
                                                                 "--workers", 1))}]  # fmt: skip
        t0 = time.perf_counter()
        ft = clipdex("finetune", train, "--model", config, "--pretrained", start, "--out", work / "ft", "--method",
                     "full", "--lr", "5e-4", "--epochs", args.ft_epochs, *common)  # fmt: skip
        ft_s = time.perf_counter() - t0
        tuned = ["--model", config, "--pretrained", ft["checkpoint"]]
        rows.append({"system": "contrastive, fine-tuned (full)", **t2i(clipdex("eval", test, *tuned, "--workers", 1))})
        hard = clipdex("finetune", train, "--model", config, "--pretrained", start, "--out", work / "hard", "--method",
                       "full", "--lr", "5e-4", "--epochs", args.ft_epochs, "--hard-negatives", 8, *common)  # fmt: skip
        rows.append({"system": "contrastive, fine-tuned (full) with hard-negative batches (NegCLIP-style)",
                     **t2i(clipdex("eval", test, "--model", config, "--pretrained", hard["checkpoint"],
                                   "--workers", 1))})  # fmt: skip
        t0 = time.perf_counter()
        rr = clipdex("finetune", train, *tuned, "--out", work / "rr", "--method", "rerank", "--lr", args.head_lr,
                     "--epochs", args.head_epochs, *common)  # fmt: skip
        head_s = time.perf_counter() - t0
        for k in ks:
            ev = clipdex("eval", test, *tuned, "--workers", 1, "--rerank", rr["head"], "--rerank-k", k)
            rows.append({"system": f"re-ranked top-{k} (clipdex eval --rerank)", **t2i(ev, "reranked")})
        more, state = itm_alone(tuned, Path(rr["head"]), test, ks)
        rows += more
        timing = latency(state, [16, 32, 128], args.rounds)
        single = (
            []
            if args.skip_extras
            else single_object(work, config, start, args.single_train, args.single_test, args.head_epochs)
        )
    big = [] if args.skip_extras else vit_b_32_cost([16, 32], max(3, args.rounds // 4))
    columns = ["system", "R@1", "R@5", "R@10"]
    summary = {
        "head_params": rr["head_params"],
        "head_bytes": rr["head_bytes"],
        "head_train_s": head_s,
        "head_best_epoch": rr["best_epoch"],
        "contrastive_weight": rr["contrastive_weight"],
        "finetune_s": ft_s,
    }
    md = "\n\n".join([
        f"text→image recall on {args.test} test images and their {args.test} twins "
        f"({2 * args.test} captions, one each); trained on {args.train} images",
        markdown_table(rows, columns),
        "re-ranking latency per query (tiny model, 2 cores)",
        markdown_table(timing, ["K", "kept features ms", "recomputed features ms"]),
        markdown_table([summary], list(summary)),
        *(["single-object domains: R@1 with and without the head (over the starting model)",
           markdown_table(single, list(single[0]))] if single else []),
        *(["ViT-B-32 (random weights) with a default head, 2 cores", markdown_table(big, list(big[0]))] if big else []),
    ])  # fmt: skip
    write_report(args.out, "rerank", {"machine": machine(), "args": vars(args) | {"out": str(args.out)},
                                      "recall": rows, "latency": timing,
                                      "single_object": single, "vit_b_32": big, **summary}, md)  # fmt: skip


if __name__ == "__main__":
    main()
