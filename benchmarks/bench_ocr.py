"""Words in images: what `index --ocr` costs, how well it reads, and how each search mode finds photos by their words.

A library of photos of words (the tests' `draw_words`: two words of a 30-word pool in Debian's DejaVu fonts, on a
sign or painted on, turned up to 25° either way, on photo-like backgrounds; 480x360 JPEGs) and as many photo-like
backgrounds without words, indexed with ViT-B-32 (random weights, exported to ONNX Runtime as `clipdex index` does:
its speed is a real ViT-B-32's, its understanding nil) without and with `--ocr`, timed in-process
(`Summary.seconds`; the export is made before). The same for a few camera-sized photos of words (4032x3024, the
text the same share of the picture), which OCR reads at 1280 pixels.

Then each photo of words is searched for in each mode by one of its words (in any case), by both, and by the first
four letters of one (a prefix). The relevant images are those whose drawn text holds every query word (a word may
be on several photos); hit@k says a relevant one is in the top k, recall@10 what share of the relevant (at most 10)
is. A random-weight CLIP reads nothing, so semantic search here is chance: a trained CLIP reads some words
(its typographic ability), which no model can be downloaded here to measure.

    python benchmarks/bench_ocr.py --images 150 --distractors 150
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import machine, markdown_table, write_report

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from corpus import make_images, make_word_images, photo_background

MODES = ("semantic", "lexical", "hybrid")
TIMING_COLUMNS = ["photos", "index", "images", "seconds", "images/s", "OCR s/image", "OCR share of the run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150, help="photos of words")
    parser.add_argument("--distractors", type=int, default=150, help="photo-like pictures without words")
    parser.add_argument("--large", type=int, default=20, help="camera-sized (4032x3024) photos of words, timed apart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--fts", type=int, help="only time the full-text index: build, update, query, N documents")
    args = parser.parse_args()
    if args.fts:
        full_text(args.fts, args.out)
        return
    import open_clip
    import torch

    from clipdex.indexer.config import IndexConfig
    from clipdex.indexer.pipeline import run_index
    from clipdex.retrieval.config import EncoderConfig

    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as tmp:
        work = Path(tmp)
        torch.manual_seed(args.seed)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), work / "vit-b-32.pt")
        encoder = EncoderConfig(model="ViT-B-32", pretrained=str(work / "vit-b-32.pt"), device="cpu")
        made = make_word_images(work / "photos", args.images, seed=500 + args.seed)
        rng = np.random.default_rng(args.seed)
        for i in range(args.distractors):
            photo_background(rng, (480, 360)).save(work / "photos" / f"plain_{i:04d}.jpg", quality=90)
        large_made = make_word_images(work / "large", args.large, seed=700 + args.seed, size=(4032, 3024))
        make_images(work / "warm", 4, seed=1)
        run_index(IndexConfig(paths=(work / "warm",), index_dir=work / "warm-idx", encoder=encoder))  # the export
        timing = []
        for folder, n, what in ((work / "photos", args.images + args.distractors, "480x360"),
                                (work / "large", args.large, "4032x3024")):  # fmt: skip
            for ocr in (False, True):
                t0 = time.perf_counter()
                summary = run_index(
                    IndexConfig(paths=(folder,), index_dir=work / f"{folder.name}-{ocr}", encoder=encoder, ocr=ocr)
                )
                wall = time.perf_counter() - t0
                spent = summary.seconds.get("ocr", 0.0)
                timing.append({
                    "photos": what,
                    "index": "with --ocr" if ocr else "without --ocr",
                    "images": n,
                    "seconds": wall,
                    "images/s": n / wall,
                    "OCR s/image": spent / n if ocr else "-",
                    "OCR share of the run": spent / wall if ocr else "-",
                })  # fmt: skip
        large = reading(work / "large-True", large_made)
        index = work / "photos-True"
        read = reading(index, made)
        results = recall(index, made, random.Random(args.seed))
    md = "\n\n".join(
        [
            f"{args.images} photos of words and {args.distractors} pictures without, ViT-B-32 (random weights) on ONNX "
            f"Runtime, {machine()['cores']} cores",
            markdown_table(timing, TIMING_COLUMNS),
            f"OCR read every drawn word of {read['all_words']:.1%} of the 480x360 photos of words and of "
            f"{large['all_words']:.1%} of the 4032x3024 ones (spaces aside), and found words in "
            f"{read['distractors_with_words']} of the {args.distractors} pictures without any",
            markdown_table(results, ["query", "mode", "queries", "hit@1", "hit@5", "hit@10", "recall@10"]),
        ]
    )
    payload = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "timing": timing, "reading": read, "reading_large": large, "results": results}  # fmt: skip
    write_report(args.out, f"ocr_seed{args.seed}", payload, md)


def full_text(n: int, out: Path) -> None:
    """The snapshot's full-text index over `n` documents of eight random 3-9 letter words: built anew, brought up to
    date from the previous file with 20 documents changed, and queried by whole words and by 3-letter prefixes."""
    from clipdex.retrieval.store import words

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)]
    docs = [(i, "image", " ".join(rng.choice(vocab) for _ in range(8))) for i in range(n)]
    changed = docs[10:] + [(n + i, "image", "new words here") for i in range(10)]
    with tempfile.TemporaryDirectory(prefix="bench-fts-") as tmp:
        first, second = Path(tmp) / "a.sqlite", Path(tmp) / "b.sqlite"
        t0 = time.perf_counter()
        words.build(first, docs)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        words.build(second, changed, previous=first)
        updated = time.perf_counter() - t0
        index = words.WordIndex(second)
        timings = {}
        for name, queries in (("a word", vocab[:200]), ("a 3-letter prefix", [w[:3] for w in vocab[:200]])):
            t0 = time.perf_counter()
            for q in queries:
                index.match(q, "image", 100)
            timings[name] = (time.perf_counter() - t0) / len(queries) * 1000
        size = first.stat().st_size
    rows = [{"documents": n, "build s": built, "update s (20 changed)": updated, "MB": size / 1e6,
             **{f"query ms ({k})": v for k, v in timings.items()}}]  # fmt: skip
    columns = list(rows[0])
    write_report(out, f"fts_{n}", {"machine": machine(), "results": rows}, markdown_table(rows, columns))


def reading(index: Path, made: list[tuple[Path, str]]) -> dict[str, float]:
    from clipdex.retrieval.search.searcher import Searcher

    s = Searcher(index)
    rows = {r["path"]: r["ocr"] or "" for r in s._rows(s._snap).to_pylist() if r["kind"] == "image"}
    squash = lambda t: "".join(t.upper().split())  # noqa: E731
    drawn = {str(p.resolve()): t for p, t in made}
    ok = [all(w in squash(rows[p]) for w in t.upper().split()) for p, t in drawn.items()]
    others = [p for p in rows if p not in drawn]
    return {"all_words": float(np.mean(ok)), "distractors_with_words": sum(bool(rows[p].strip()) for p in others)}


def recall(index: Path, made: list[tuple[Path, str]], rng: random.Random) -> list[dict]:
    from clipdex.retrieval.search.query import Query
    from clipdex.retrieval.search.searcher import Searcher

    s = Searcher(index)
    drawn = {str(p.resolve()): t.upper() for p, t in made}
    kinds = {
        "one word": lambda t: rng.choice((str.lower, str.upper, str.title))(rng.choice(t.split())),
        "both words": lambda t: t.lower(),
        "a prefix (4 letters)": lambda t: rng.choice([w for w in t.split() if len(w) >= 4] or t.split())[:4].lower(),
    }
    rows = []
    for kind, make in kinds.items():
        queries = [make(t) for t in drawn.values()]
        for mode in MODES:
            hits = {1: [], 5: [], 10: []}
            recalls = []
            for q in queries:
                relevant = {p for p, t in drawn.items() if all(w.upper() in t for w in q.split())}
                top = [h.path for h in s.search(Query.build(text=q), k=10, mode=mode)]
                for k in hits:
                    hits[k].append(bool(relevant & set(top[:k])))
                recalls.append(len(relevant & set(top)) / min(len(relevant), 10))
            rows.append({"query": kind, "mode": mode, "queries": len(queries),
                         **{f"hit@{k}": float(np.mean(v)) for k, v in hits.items()},
                         "recall@10": float(np.mean(recalls))})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
