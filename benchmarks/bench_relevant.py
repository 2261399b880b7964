"""`search --relevant`: how well a per-query cut-off finds the relevant set, against the best fixed threshold.

A library of the tests' drawn shapes (one coloured shape per image, on a coloured background) is indexed with the
tests' tiny CLIP. Each query "a {colour} {shape}" has a known relevant set: every image of that colour and shape.
For each query, every item's cosine is computed from the stored vectors; then the returned set of each rule is scored
by precision, recall and F1 (means over the queries):
- the robust z cut-off (`retrieval.search.relevant.cutoff`) at several z;
- the largest gap among the top 100 sorted scores;
- one fixed threshold for every query, the best in hindsight (chosen on these very queries: an upper bound for any
  fixed threshold).

    python benchmarks/bench_relevant.py --images 600
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import machine, markdown_table, write_report

from clipdex.retrieval.search.relevant import cutoff

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from corpus import COLOURS, SHAPES, make_images, train_tiny_model, write_tiny_config

TEMPLATES = (
    "a {colour} {shape}",
    "{colour} {shape}",
    "a photo of a {colour} {shape} on a plain background",
    "there is a {shape} and it is {colour}",
)


def ids_of(searcher) -> np.ndarray:
    from clipdex.retrieval.config import Kind

    return searcher.ids(Kind.IMAGE)


def scores_of(searcher, query: str) -> tuple[np.ndarray, np.ndarray]:
    from clipdex.retrieval.config import Kind

    ids = searcher.ids(Kind.IMAGE)
    return ids, searcher.vectors(ids) @ searcher.embed_text(query)[0]


def prf(returned: set[int], relevant: set[int]) -> tuple[float, float, float]:
    hit = len(returned & relevant)
    p = hit / len(returned) if returned else 1.0
    r = hit / len(relevant) if relevant else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def largest_gap(scores: np.ndarray, top: int = 100) -> float:
    s = np.sort(scores)[::-1][:top]
    i = int(np.argmax(s[:-1] - s[1:]))
    return float(s[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the tiny CLIP")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's training and the images")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dump", type=Path, help="also save each query's ids, scores and labels (.npz)")
    args = parser.parse_args()
    from clipdex.retrieval.search.searcher import Searcher

    with tempfile.TemporaryDirectory(prefix="bench-relevant-") as tmp:
        work = Path(tmp)
        config = write_tiny_config(work)
        weights = train_tiny_model(config, work / "tiny.pt", steps=args.steps, seed=args.seed)
        made = make_images(work / "photos", args.images, seed=31 + args.seed)
        subprocess.run([sys.executable, "-m", "clipdex", "index", str(work / "photos"), "--index", str(work / "idx"),
                        "--model", str(config), "--pretrained", str(weights), "--json"], check=True,
                       capture_output=True)  # fmt: skip
        searcher = Searcher(work / "idx")
        by_path = {str(p.resolve()): scene for p, scene in made}
        rows = {r["id"]: by_path[r["path"]] for r in searcher.rows(searcher.ids(__import__("clipdex.retrieval.config",
                fromlist=["Kind"]).Kind.IMAGE))}  # fmt: skip
        queries = sorted({(s.colour, s.shape) for s in rows.values()})
        per_query = []
        for colour, shape in queries:
            relevant = {
                int(i) for i in ids_of(searcher) if rows[int(i)].colour == colour and rows[int(i)].shape == shape
            }
            for template in TEMPLATES:  # people word the same need differently: each wording is a query
                ids, scores = scores_of(searcher, template.format(colour=colour, shape=shape))
                per_query.append((ids, scores, relevant))
    if args.dump:
        np.savez(args.dump, *[np.stack([ids, s, np.isin(ids, list(rel))]) for ids, s, rel in per_query])
    results = evaluate(per_query)
    sizes = [len(rel) for _, _, rel in per_query]
    md = "\n\n".join([
        f"{args.images} images, {len(per_query)} queries, relevant sets of {min(sizes)}-{max(sizes)} "
        f"(median {int(np.median(sizes))})",
        markdown_table(results, ["rule", "chosen on the other half", "precision", "recall", "F1"]),
    ])  # fmt: skip
    write_report(args.out, f"relevant_seed{args.seed}", {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                        "results": results, "colours": len(COLOURS), "shapes": len(SHAPES)}, md)  # fmt: skip


def robust_z(scores: np.ndarray, z: float) -> float:
    """The median plus z robust standard deviations (MAD) of the query's scores."""
    centre = float(np.median(scores))
    return centre + z * 1.4826 * float(np.median(np.abs(scores - centre)))


RULES = {
    "clipdex: a fraction of the way from the median to the best three (per query)": (
        lambda s, a: cutoff(s, s, a).threshold,
        (0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9),
    ),
    "robust z above the median (per query)": (robust_z, (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)),
    "largest gap in the top 100 (per query)": (lambda s, _: largest_gap(s), (0,)),
    "one fixed threshold": (lambda s, t: t, tuple(np.round(np.linspace(-0.2, 1.0, 121), 3))),
}


def _score(rule, queries: list, param: float) -> dict[str, float]:
    return _means([prf({int(i) for i in ids[s >= rule(s, param)]}, rel) for ids, s, rel in queries])


def evaluate(per_query: list) -> list[dict]:
    """Each rule with its parameter chosen on half of the needs (all wordings of a need on one side) and scored on
    the other half, both ways (the mean of the two), and the fixed threshold chosen in hindsight on all of them (an
    upper bound for any one threshold)."""
    needs = sorted({id(rel) for _, _, rel in per_query})
    first = set(needs[0::2])
    halves = [[q for q in per_query if id(q[2]) in first], [q for q in per_query if id(q[2]) not in first]]
    rows = []
    for name, (rule, params) in RULES.items():
        held_out = []
        for train, test in (halves, halves[::-1]):
            best = max(params, key=lambda p, r=rule, t=train: _score(r, t, p)["F1"])
            held_out.append((best, _score(rule, test, best)))
        mean = {k: float(np.mean([m[k] for _, m in held_out])) for k in ("precision", "recall", "F1")}
        chosen = ", ".join(f"{b:g}" for b, _ in held_out) if len(params) > 1 else "-"
        rows.append({"rule": name, "chosen on the other half": chosen, **mean})
        if name == "one fixed threshold":
            best = max(params, key=lambda p, r=rule: _score(r, per_query, p)["F1"])
            rows.append({"rule": "one fixed threshold, best in hindsight (an upper bound)",
                         "chosen on the other half": f"{best:g} (on all)", **_score(rule, per_query, best)})  # fmt: skip
    return rows


def _means(got: list[tuple[float, float, float]]) -> dict[str, float]:
    a = np.array(got)
    return {"precision": float(a[:, 0].mean()), "recall": float(a[:, 1].mean()), "F1": float(a[:, 2].mean())}


if __name__ == "__main__":
    main()
