"""A new user's mistakes (issue 21): how long each takes to be answered, with what, now and at an older revision.

Each mistake is a whole `clipdex` process; the time is until it exits. The model is the tests' tiny CLIP config
with random weights (what fails here fails before the weights matter). `--before REV` runs the same mistakes with
clipdex at that revision (a tree of links), in the same run.

    python benchmarks/bench_mistakes.py --before 35f1b42
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine, markdown_table, write_report
from bench_cli_start import links_tree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from corpus import make_images, write_tiny_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="also clipdex at this git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-mistakes-"))
    config = write_tiny_config(work)
    weights = work / "tiny.pt"
    subprocess.run(
        [sys.executable, "-c", f"import open_clip, torch; open_clip.add_model_config({str(config)!r}); "
         f"torch.save(open_clip.create_model('tiny-clip').state_dict(), {str(weights)!r})"],
        check=True, capture_output=True,
    )  # fmt: skip
    photos = work / "photos"
    make_images(photos, 6, seed=1)
    model = ["--model", str(config), "--pretrained", str(weights)]
    env = dict(os.environ, CLIPDEX_CACHE=str(work / "cache"))
    clipdex = [sys.executable, "-m", "clipdex"]
    index = work / "idx"
    subprocess.run([*clipdex, "index", str(photos), "--index", str(index), *model], env=env, check=True,
                   capture_output=True)  # fmt: skip
    jpg = next(photos.iterdir())
    mistakes = {
        "index a folder that does not exist": ["index", str(work / "nope"), "--index", str(work / "i1"), *model],
        "index a photo folder into itself": ["index", str(photos), "--index", str(photos), *model],
        "a second indexer on a locked index": ["index", str(photos), "--index", str(index)],
        "--pretrained a photo": [
            "index",
            str(photos),
            "--index",
            str(work / "i2"),
            "--model",
            str(config),
            "--pretrained",
            str(jpg),
        ],
        "index with every file excluded": ["index", str(photos), "--index", str(work / "i3"), "--exclude", "*", *model],
        "search unquoted words": ["search", "red", "circle", "--index", str(index), "--no-server"],
        "search a missing index": ["search", "red circle", "--index", str(work / "none"), "--no-server"],
        "eval flickr (typo)": ["eval", "flickr", "--root", str(work)],
        "reindex with a missing checkpoint": ["reindex", "--index", str(index), "--pretrained", str(work / "nope.pt")],
        "classify --eval a missing folder": ["classify", "--index", str(index), "--eval", str(work / "nope")],
    }
    variants = {"now": env}
    if args.before:
        tree = links_tree(args.before, work / "before")
        variants["before"] = dict(env, PYTHONPATH=str(tree))

    from clipdex.retrieval.store.lock import acquire_lock

    lock = acquire_lock(index)  # held for the whole run: the "second indexer" is always the second
    rows = []
    try:
        for name, argv in mistakes.items():
            row: dict[str, object] = {"mistake": name}
            for variant, venv in variants.items():
                times, said, code = [], "", 0
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    done = subprocess.run([*clipdex, *argv], env=venv, capture_output=True, text=True, timeout=600)
                    times.append(time.perf_counter() - t0)
                    code = done.returncode
                    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                    said = lines[-1] if lines else (done.stdout.strip().splitlines() or [""])[-1]
                row[f"{variant} s"] = round(statistics.median(times), 2)
                row[f"{variant} exit"] = code
                row[f"{variant} says"] = said[:160].replace("|", "/")
            rows.append(row)
    finally:
        lock.close()
    columns = [
        "mistake",
        *(f"{v} s" for v in variants),
        *(f"{v} exit" for v in variants),
        *(f"{v} says" for v in variants),
    ]
    table = markdown_table(rows, columns)
    write_report(args.out, "mistakes", {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "rows": rows},
                 table)  # fmt: skip
    print(table)
    if args.before:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before" / "worktree")])


if __name__ == "__main__":
    main()
