"""The runtimes side by side (issue 18): the ONNX export on ONNX Runtime against open_clip on torch, and clipdex
before the change (`--before REV`, run from a tree of links), as a user runs them: whole processes, rounds
interleaved, medians and ratios. ViT-B-32 with random weights (speed does not depend on them), saved once as a .pt.

  * index a folder of photo-like JPEGs at 640x480 from scratch, and one of camera-sized ones (4032x3024);
  * one text search and one image search, cold (`clipdex search --no-server`);
  * peak resident memory of each process (wait4's ru_maxrss);
  * JPEGs decoded at full size against DCT-scaled to the model's input (Pillow's `draft`): time per photo, and the
    cosine between the vectors the two give.

    python benchmarks/bench_runtime.py --photos 120 --camera 12 --rounds 3 --before f899ab7
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

import numpy as np
from _report import machine, markdown_table, write_report
from bench_cli_start import links_tree
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour fields with some texture: compresses and decodes like a photo, unlike white noise."""
    w, h = size
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--camera", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a git revision to compare against (run from a tree of links)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--draft-only", action="store_true", help="only the decoding comparison")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    env = dict(os.environ, CLIPDEX_CACHE=str(work / "cache"), PYTHONDONTWRITEBYTECODE="1")
    import open_clip
    import torch

    model = open_clip.create_model("ViT-B-32")
    weights = work / "vit-b-32-random.pt"
    torch.save(model.state_dict(), weights)
    del model
    rng = np.random.default_rng(0)
    folders = {"640x480": work / "photos", "4032x3024": work / "camera"}
    for name, (n, size) in {"640x480": (args.photos, (640, 480)), "4032x3024": (args.camera, (4032, 3024))}.items():
        folders[name].mkdir()
        for i in range(n):
            photo(rng, size).save(folders[name] / f"{i:04d}.jpg", quality=90)
    query_image = folders["640x480"] / "0000.jpg"
    if args.draft_only:
        draft = draft_decoding(folders["4032x3024"], weights, work)
        write_report(
            args.out, "runtime_draft", {"machine": machine(), "draft": draft}, markdown_table([draft], list(draft))
        )
        return

    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "onnx": ([sys.executable, "-m", "clipdex"], {**env, "CLIPDEX_RUNTIME": "onnx"}),
        "torch": ([sys.executable, "-m", "clipdex"], {**env, "CLIPDEX_RUNTIME": "torch"}),
    }
    if args.before:
        tree = links_tree(args.before, work / "before")
        variants["before"] = ([sys.executable, "-m", "clipdex"], {**env, "PYTHONPATH": str(tree)})
    model_args = ["--model", "ViT-B-32", "--pretrained", str(weights)]

    # the export, once (what the first index run of a model pays)
    t0 = time.perf_counter()
    run(
        [
            *variants["onnx"][0],
            "index",
            str(folders["640x480"] / "0000.jpg"),
            "--index",
            str(work / "warm"),
            *model_args,
        ],
        variants["onnx"][1],
    )
    export_seconds = time.perf_counter() - t0

    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, (cmd, venv) in variants.items():
            for size, folder in folders.items():
                index = work / f"idx-{name}-{size}-{r}"
                s, m = run([*cmd, "index", str(folder), "--index", str(index), *model_args], venv)
                times.setdefault((name, f"index {size}"), []).append(s)
                peaks.setdefault((name, f"index {size}"), []).append(m)
            index = work / f"idx-{name}-640x480-{r}"
            for task, query in (("text search", ["a photo of a dog"]), ("image search", ["--image", str(query_image)])):
                s, m = run([*cmd, "search", *query, "--index", str(index), "--no-server", "-k", "10"], venv)
                times.setdefault((name, task), []).append(s)
                peaks.setdefault((name, task), []).append(m)

    tasks = sorted({t for _, t in times})
    rows = []
    for task in tasks:
        row: dict[str, object] = {"task": task}
        for name in variants:
            row[f"{name} s"] = statistics.median(times[(name, task)])
            row[f"{name} MiB"] = statistics.median(peaks[(name, task)])
        row["torch / onnx"] = row["torch s"] / row["onnx s"]  # type: ignore[operator]
        if "before" in variants:
            row["before / onnx"] = row["before s"] / row["onnx s"]  # type: ignore[operator]
        rows.append(row)

    draft = draft_decoding(folders["4032x3024"], weights, work)
    columns = ["task", *(f"{n} s" for n in variants), "torch / onnx"] + (["before / onnx"] if args.before else [])
    columns += [f"{n} MiB" for n in variants]
    table = markdown_table(rows, columns)
    table += f"\n\nexport of ViT-B-32 (once per model, with its check against torch): {export_seconds:.1f} s (a whole `index` of one photo)"
    table += "\n\n" + markdown_table([draft], list(draft))
    payload = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "rows": rows, "draft": draft,
               "export_seconds": export_seconds, "times": {f"{k[0]}|{k[1]}": v for k, v in times.items()}}  # fmt: skip
    write_report(args.out, "runtime", payload, table)
    if args.before:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before" / "worktree")])


def draft_decoding(folder: Path, weights: Path, work: Path) -> dict[str, object]:
    """Full decode against DCT-scaled decode of camera-sized JPEGs: seconds per photo (decode and preprocess) and
    the cosine between the vectors (ONNX encoder) of the two."""
    os.environ["CLIPDEX_CACHE"] = str(work / "cache")
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.imaging.decode import decode_image
    from clipdex.retrieval.model.choose import onnx_or_torch
    from clipdex.retrieval.model.encoder import load_encoder

    encoder = onnx_or_torch(load_encoder(EncoderConfig("ViT-B-32", str(weights), device="cpu")))
    files = sorted(folder.glob("*.jpg"))
    out: dict[str, object] = {"photos": len(files)}
    vectors, pixels = {}, {}
    for name, draft in (("full", None), ("draft", encoder.preprocess.draft)):
        t0 = time.perf_counter()
        pixels[name] = [encoder.preprocess(decode_image(f.read_bytes(), draft=draft).image) for f in files]
        out[f"{name} decode s/photo"] = (time.perf_counter() - t0) / len(files)
        vectors[name] = encoder.encode_pixels(pixels[name])
    cosines = np.sum(vectors["full"] * vectors["draft"], axis=1)
    # what does not depend on the weights: the model's input itself (normalised pixels, std about 1)
    diff = np.stack(pixels["full"]) - np.stack(pixels["draft"])
    out["input RMS diff"] = float(np.sqrt(np.mean(diff**2)))
    out["input max |diff|"] = float(np.abs(diff).max())
    out["decode speed-up"] = out["full decode s/photo"] / out["draft decode s/photo"]  # type: ignore[operator]
    out["min cosine"] = float(cosines.min())
    out["median cosine"] = float(np.median(cosines))
    return out


if __name__ == "__main__":
    main()
