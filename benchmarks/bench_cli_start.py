"""`clipdex search` end to end, as a user runs it: before and after the start-up work, side by side.

Rounds interleave five commands on one small index (ViT-B-32, random weights: speed does not depend on them):
  * before: the code at `--before REV` (a git revision), run from a tree of links on PYTHONPATH, in-process
    (`--no-server`) and with `clipdex serve` running;
  * after, in-process: `clipdex search --no-server` (checks first, no transformers/timm, no checkpoint hashing);
  * after, with `clipdex serve` running for the index (the search is answered by it);
  * `clipdex --version`.
Also counts the modules each imports (`python -X importtime`) and whether transformers and timm are among them.

    python benchmarks/bench_cli_start.py --rounds 5 --before fb11997
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine, markdown_table, write_report
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def links_tree(revision: str, where: Path) -> Path:
    """The `clipdex` package as installed, from `revision`'s source folders (what .ci/mypy builds for mypy)."""
    work = where / "worktree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(work), revision], check=True, capture_output=True
    )
    tree = where / "tree"
    (tree / "clipdex").mkdir(parents=True)
    for f in (work / "retrieval" / "_clipdex").glob("*.py"):
        (tree / "clipdex" / f.name).symlink_to(f)
    for sub in ("retrieval", "indexer", "cli"):
        (tree / "clipdex" / sub).symlink_to(work / sub)
    return tree


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def imports(cmd: list[str], env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], capture_output=True, text=True, env=env)
    rows = [
        r
        for r in (line.split("|") for line in out.stderr.splitlines() if line.startswith("import time:"))
        if r[1].strip().isdigit()
    ]
    # a blocked import (sys.modules[name] = None) is listed too, at a few microseconds: count what really loaded
    loaded = {r[-1].strip() for r in rows if int(r[1]) >= 1000 or "." in r[-1].strip()}
    return {
        "modules": len(rows),
        "transformers": any(n.split(".")[0] == "transformers" for n in loaded),
        "timm": any(n.split(".")[0] == "timm" for n in loaded),
        "torch": "torch" in loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", default="fb11997", help="git revision to compare with")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import open_clip
    import torch

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), tmp / "vit-b-32.pt")
        (tmp / "photos").mkdir()
        for i in range(args.images):
            Image.new("RGB", (320, 240), (i * 12 % 256, 80, 160)).save(tmp / "photos" / f"{i:03d}.jpg")
        env = {**os.environ, "CLIPDEX_CACHE": str(tmp / "cache")}
        clipdex = [sys.executable, "-m", "clipdex"]
        index = tmp / "idx"
        subprocess.run(
            [
                *clipdex,
                "index",
                str(tmp / "photos"),
                "--index",
                str(index),
                "--model",
                "ViT-B-32",
                "--pretrained",
                str(tmp / "vit-b-32.pt"),
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        query = ["search", "a dog on a beach", "--index", str(index), "--json"]
        before_env = {**env, "PYTHONPATH": str(links_tree(args.before, tmp))}
        commands = {
            f"before ({args.before}), in-process": ([*clipdex, *query, "--no-server"], before_env),
            "after, in-process": ([*clipdex, *query, "--no-server"], env),
            f"before ({args.before}), clipdex serve running": ([*clipdex, *query], before_env),
            "after, clipdex serve running": ([*clipdex, *query], env),
            "clipdex --version": ([*clipdex, "--version"], env),
        }
        server = subprocess.Popen(
            [*clipdex, "serve", "--index", str(index), "--port", "8791"], stderr=subprocess.PIPE, env=env
        )
        assert server.stderr is not None
        server.stderr.readline()  # "clipdex: serving ...": listening and registered
        try:
            times: dict[str, list[float]] = {name: [] for name in commands}
            for cmd, e in commands.values():
                timed(cmd, e)  # one unmeasured run each: the page cache holds the files as in daily use
            for _ in range(args.rounds):
                for name, (cmd, e) in commands.items():
                    times[name].append(timed(cmd, e))
            counted = {name: imports(cmd, e) for name, (cmd, e) in commands.items()}
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "worktree")], check=False
            )

    # each "after" against the same path "before": >1 is faster
    against = {
        "after, in-process": f"before ({args.before}), in-process",
        "after, clipdex serve running": f"before ({args.before}), clipdex serve running",
    }
    rows = [
        {
            "command": name,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "vs_before": statistics.median(times[against[name]]) / statistics.median(t) if name in against else "",
            "runs": ", ".join(f"{x:.2f}" for x in t),
            **counted[name],
        }
        for name, t in times.items()
    ]
    table = markdown_table(
        rows, ["command", "median_s", "min_s", "vs_before", "modules", "torch", "transformers", "timm", "runs"]
    )
    write_report(args.out, "cli_start", {"machine": machine(), "rounds": args.rounds, "rows": rows}, table)


if __name__ == "__main__":
    main()
