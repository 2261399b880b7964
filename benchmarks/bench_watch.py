"""`clipdex watch`: how long from a photo appearing in a watched folder to its being searchable, how a burst is
gathered, and what an idle watcher costs.

A `clipdex watch --json` process (ViT-B-32 with random weights, exported to ONNX as `clipdex index` does; speed does
not depend on the weights) watches a folder of 640×480 JPEGs. Then:
  * single photos, one at a time: each is copied in (`shutil.copy`, as a file manager does), and the clock runs
    until a `Searcher` in this process sees it (its item count goes up after `refresh`); per `--settle` value;
  * a burst: `--burst` photos copied one after another; time until all are searchable, and how many runs it took;
  * idle: the watcher's CPU time over `--idle` seconds with nothing changing (from /proc).

    python benchmarks/bench_watch.py --singles 10 --burst 300 --idle 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _report import machine, markdown_table, write_report
from PIL import Image

from clipdex.retrieval.config import Kind
from clipdex.retrieval.search.searcher import Searcher

REPO = Path(__file__).resolve().parent.parent


def photos(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(0, 64, (480, 640, 3))
        path = folder / f"p{seed}_{i:05d}.jpg"
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path)
    return out


class Watch:
    """A `clipdex watch --json` process; its run lines are collected as they come."""

    def __init__(self, index: Path, settle: float):
        cmd = [sys.executable, "-m", "clipdex", "watch", "--index", str(index), "--json", "--settle", str(settle)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.runs: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.runs.append(json.loads(line))

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def wait_count(searcher: Searcher, want: int, t0: float, timeout: float = 600) -> float:
    """Seconds from `t0` until the searcher's published snapshot holds `want` images."""
    while True:
        searcher.refresh()
        if searcher.count(Kind.IMAGE) >= want:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{searcher.count(Kind.IMAGE)} of {want} images after {timeout} s")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=10)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--settle", type=float, nargs="+", default=[2.0, 0.5])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    import open_clip
    import torch

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), tmp / "vit-b-32.pt")
        library, index = tmp / "photos", tmp / "idx"
        photos(library, 20, seed=0)
        incoming = photos(tmp / "incoming", args.singles * len(args.settle) + args.burst, seed=1)
        subprocess.run(
            [sys.executable, "-m", "clipdex", "index", str(library), "--index", str(index), "--model", "ViT-B-32",
             "--pretrained", str(tmp / "vit-b-32.pt")],
            check=True, capture_output=True,
        )  # fmt: skip
        searcher = Searcher(index)
        have = searcher.count(Kind.IMAGE)
        rows = []
        for settle in args.settle:
            watch = Watch(index, settle)
            while not watch.runs:  # the catch-up run
                time.sleep(0.05)
            latencies = []
            for _ in range(args.singles):
                source = incoming.pop()
                t0 = time.perf_counter()
                shutil.copy(source, library / source.name)
                latencies.append(wait_count(searcher, have + 1, t0))
                have += 1
                time.sleep(0.5)
            watch.stop()
            rows.append(
                {
                    "what": f"one photo copied in → searchable (--settle {settle:g})",
                    "median_s": statistics.median(latencies),
                    "min_s": min(latencies),
                    "max_s": max(latencies),
                    "runs": len(watch.runs) - 1,
                }
            )
        watch = Watch(index, args.settle[0])
        while not watch.runs:
            time.sleep(0.05)
        burst = [incoming.pop() for _ in range(args.burst)]
        t0 = time.perf_counter()
        for source in burst:
            shutil.copy(source, library / source.name)
        copied = time.perf_counter() - t0
        total = wait_count(searcher, have + args.burst, t0)
        have += args.burst
        time.sleep(1.0)
        rows.append(
            {
                "what": f"a burst of {args.burst} photos copied in → all searchable (--settle {args.settle[0]:g})",
                "median_s": total,
                "min_s": copied,
                "max_s": total,
                "runs": len(watch.runs) - 1,
            }
        )
        time.sleep(2.0)
        c0 = watch.cpu_s()
        time.sleep(args.idle)
        idle_cpu = watch.cpu_s() - c0
        watch.stop()
        rows.append(
            {
                "what": f"idle for {args.idle:g} s: the watcher's CPU time",
                "median_s": idle_cpu,
                "min_s": "",
                "max_s": "",
                "runs": "",
            }
        )
    table = markdown_table(rows, ["what", "median_s", "min_s", "max_s", "runs"])
    note = (
        "\n\nA burst row: median_s and max_s are the time from the first copy to all searchable, min_s the time the "
        "copying itself took; runs is the number of indexing runs the watcher made for it."
    )
    write_report(args.out, "bench_watch", {"machine": machine(), "rows": rows}, table + note)


if __name__ == "__main__":
    main()
