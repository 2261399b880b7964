"""clipdex beside rclip 4, the lightest peer, at rclip's own job (issue 18): the same architecture, the same random
weights, the same folders, whole processes, rounds interleaved, medians and ratios.

rclip runs in its own virtualenv (it needs Python >= 3.12): `--rclip /path/to/venv/bin/rclip`, e.g.

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/rclipvenv && /tmp/rclipvenv/bin/pip install 'rclip>=4'
    python benchmarks/bench_vs_rclip.py --rclip /tmp/rclipvenv/bin/rclip --photos 200 --camera 20 --rounds 3

The model is rclip's architecture, ViT-B-32-256, with random weights (speed does not depend on them), saved once as
a `.pt` for clipdex and exported for rclip the way rclip's conversion does (each tower wrapped, `torch.onnx.export`
with inputs `input`, outputs `output`, a dynamic batch, 77 tokens), laid out as rclip's model folder so that it
downloads nothing. Each tool's one-time model preparation (clipdex's export, rclip's download) is done before the
rounds and not timed. Measured per round and tool:

  * index a folder of photo-like JPEGs at 640x480 from scratch, and one of camera-sized ones (4032x3024) (rclip
    indexes the folder it is asked to search in, so its run includes one query);
  * one text search and one image search, cold, in the indexed 640x480 folder (rclip `--no-indexing`,
    clipdex `search --no-server`);
  * peak resident memory of each process (wait4's ru_maxrss, read by a small launcher: see `_LAUNCH`);
  * that both rank the same photos first for the same text (the two stacks compute the same model), and the
    image tower's throughput in FLOP/s against the machine's peak (a measured float32 GEMM, and AVX-512/AVX2 FMA
    units times the clock).

"clipdex int8" is clipdex with `--precision int8` (its agreement with fp32: bench_precision).
`--before REV` adds clipdex at an older revision (run from a tree of links), as bench_runtime does.
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
import time
from pathlib import Path

import numpy as np
from _report import machine, markdown_table, write_report
from bench_cli_start import links_tree
from bench_runtime import photo

REPO = Path(__file__).resolve().parent.parent
MODEL = "ViT-B-32-256"
RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 4 looks for its towers
RCLIP_LEGAL = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
QUERY = "a photo of a dog on the beach"


# A child's peak RSS (wait4's ru_maxrss) starts from its parent's resident size at fork: this benchmark's process
# holds 0.5 GB, which hid every peak below it (the first runs read 511 MiB for both tools' searches). So each tool
# is started by a small launcher (python -S: about 10 MB), which times it and reads its peak.
_LAUNCH = (
    "import os, sys, time\n"
    "t0 = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvpe(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(f'{time.perf_counter() - t0} {usage.ru_maxrss}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_peak(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of the process and its waited-for children, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        launched = [sys.executable, "-S", "-c", _LAUNCH, peak.name, *cmd]
        done = subprocess.run(launched, env=env, cwd=cwd, stdout=out, stderr=err)
        out.seek(0), err.seek(0)
        if done.returncode != 0:
            raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
        seconds, kib = Path(peak.name).read_text().split()
        return float(seconds), int(kib) / 1024, out.read().decode()


def prepare(weights: Path, folder: Path) -> None:
    """Random weights for clipdex (a .pt), and the same exported as rclip's model conversion writes them (visual.onnx
    and textual.onnx), with the files rclip checks for."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    torch.save(model.state_dict(), weights)
    model.eval()

    class Visual(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.encode_image(x)

    class Textual(Visual):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.encode_text(x)

    out = folder / RCLIP_MODEL_DIR
    out.mkdir(parents=True)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    probes = {
        "visual.onnx": (Visual(model), torch.randn(2, 3, size, size)),
        "textual.onnx": (Textual(model), open_clip.get_tokenizer(MODEL)(["a dog", "a cat"])),
    }
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX op for this exporter
    for name, (module, probe) in probes.items():
        with torch.no_grad():
            torch.onnx.export(
                module, (probe,), str(out / name), input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                do_constant_folding=True, dynamo=False,
            )  # fmt: skip
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (folder / "tokenizer").mkdir()
    shutil.copy(vocab, folder / "tokenizer" / vocab.name)
    for name in RCLIP_LEGAL:
        (folder / name).write_text("benchmark copy: random weights\n")


def rclip_datadir(template: Path, where: Path) -> Path:
    """A fresh rclip data folder (no database yet) whose model files link to the exported ones."""
    where.mkdir(parents=True)
    for item in template.iterdir():
        (where / item.name).symlink_to(item)
    return where


def image_tower_flops(model_name: str) -> float:
    """Floating-point operations (2 per multiply-add) of one image through a ViT image tower, counted from its
    open_clip config: patch embedding, then per layer the QKV and output projections, attention scores and values,
    and the MLP; then the projection."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    v = cfg["vision_cfg"]
    width, layers, patch, size = v["width"], v["layers"], v["patch_size"], v["image_size"]
    mlp = int(width * v.get("mlp_ratio", 4.0))
    patches = (size // patch) ** 2
    tokens = patches + 1
    macs = patches * 3 * patch * patch * width
    macs += layers * (4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp)
    macs += width * cfg["embed_dim"]
    return 2.0 * macs


def machine_peak() -> dict[str, float]:
    """float32 GFLOP/s: a measured large GEMM on all cores, and the nominal peak from the CPU's FMA width."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    measured = 2 * 2048**3 / best / 1e9
    flags, mhz = "", 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = line
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":")[1])
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    cores = len(os.sched_getaffinity(0))
    nominal = cores * mhz / 1e3 * lanes * 2 * 2  # two FMA units, a multiply and an add each
    return {"gemm GFLOP/s": round(measured, 1), "nominal GFLOP/s": round(nominal, 1), "cores": cores}


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def top_paths_clipdex(output: str) -> list[str]:
    return [Path(h["path"]).name for h in json.loads(output)["results"]]


def top_paths_rclip(output: str) -> list[str]:
    return [Path(line.strip()).name for line in output.splitlines() if line.strip()]


def main() -> None:
    if sys.argv[1:2] == ["--prepare"]:
        prepare(Path(sys.argv[2]), Path(sys.argv[3]))
        work, (photos, camera) = Path(sys.argv[2]).parent, map(int, sys.argv[4].split(","))
        rng = np.random.default_rng(0)
        for name, n, size in (("photos", photos, (640, 480)), ("camera", camera, (4032, 3024))):
            (work / name).mkdir()
            for i in range(n):
                photo(rng, size).save(work / name / f"{i:04d}.jpg", quality=90)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--rclip", required=True, help="the rclip executable in its own virtualenv")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--camera", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="also clipdex at this git revision (run from a tree of links)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rclip-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPDEX_", "RCLIP_"))}
    env = dict(base_env, CLIPDEX_CACHE=str(work / "cache"), PYTHONDONTWRITEBYTECODE="1")
    # the model and the photos are made in a child process: a child's peak RSS (wait4) starts from its parent's
    # high-water mark at fork, so this process stays small for the peaks measured below to be the tools' own
    weights = work / "vit-b-32-256-random.pt"
    rclip_model = work / "rclip-model"
    folders = {"640x480": work / "photos", "4032x3024": work / "camera"}
    counts = f"{args.photos},{args.camera}"
    subprocess.run([sys.executable, __file__, "--prepare", str(weights), str(rclip_model), counts], check=True)
    query_image = "0001.jpg"
    model_args = ["--model", MODEL, "--pretrained", str(weights)]
    clipdex = [sys.executable, "-m", "clipdex"]
    tools = ["clipdex", "rclip", "clipdex int8"] + (["before"] if args.before else [])
    before_env = env
    if args.before:
        tree = links_tree(args.before, work / "before")
        before_env = dict(env, PYTHONPATH=str(tree), CLIPDEX_CACHE=str(work / "cache-before"))

    # pip compiles a package's modules when it installs it (rclip's were); clipdex runs from source trees here, and
    # PYTHONDONTWRITEBYTECODE keeps a run from writing them, so they are compiled alike first: no tool pays for
    # compiling its own code at each start
    trees = [REPO / d for d in ("retrieval", "indexer", "cli")] + ([work / "before" / "tree"] if args.before else [])
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, trees)], check=True, stdout=subprocess.DEVNULL)

    # one-time preparation, not timed: clipdex exports its towers (and checks them) and quantises them for int8
    for precision in ("fp32", "int8"):
        warm = ["index", str(folders["640x480"] / "0000.jpg"), "--index", str(work / f"warm-{precision}")]
        run_peak([*clipdex, *warm, *model_args, "--precision", precision], env)

    def index(tool: str, size: str, r: int) -> tuple[float, float]:
        folder = folders[size]
        if tool == "rclip":
            data = rclip_datadir(rclip_model, work / f"rclip-{size}-{r}")
            s, m, _ = run_peak([args.rclip, "-f", "-t", "1", QUERY], dict(env, RCLIP_DATADIR=str(data)), cwd=folder)
            return s, m
        venv = before_env if tool == "before" else env
        precision = ["--precision", "int8"] if tool.endswith("int8") else []
        idx = str(work / f"{tool}-{size}-{r}")
        s, m, _ = run_peak([*clipdex, "index", str(folder), "--index", idx, *model_args, *precision], venv)
        return s, m

    def search(tool: str, r: int, query: list[str]) -> tuple[float, float, str]:
        folder = folders["640x480"]
        if tool == "rclip":
            data = work / f"rclip-640x480-{r}"
            rq = [f"./{query[1]}"] if query[0] == "--image" else query
            return run_peak([args.rclip, "-n", "-f", "-t", "10", *rq], dict(env, RCLIP_DATADIR=str(data)), cwd=folder)
        venv = before_env if tool == "before" else env
        cq = ["--image", str(folder / query[1])] if query[0] == "--image" else query
        idx = str(work / f"{tool}-640x480-{r}")
        return run_peak([*clipdex, "search", *cq, "--index", idx, "--no-server", "-k", "10", "--json"], venv)

    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[tuple[str, str], list[float]] = {}
    same_top: list[int] = []  # photos both put in the text query's top 10 (random weights: near-equal scores)
    tops: dict[str, list[str]] = {}
    for r in range(args.rounds):
        order = tools if r % 2 == 0 else tools[::-1]  # alternate who goes first (page cache, thermal)
        for tool in order:
            for size in folders:
                s, m = index(tool, size, r)
                times.setdefault((tool, f"index {size}"), []).append(s)
                peaks.setdefault((tool, f"index {size}"), []).append(m)
        for tool in order:
            for task, query in (("text search, cold", [QUERY]), ("image search, cold", ["--image", query_image])):
                s, m, out = search(tool, r, query)
                times.setdefault((tool, task), []).append(s)
                peaks.setdefault((tool, task), []).append(m)
                if task.startswith("text") and tool in ("clipdex", "rclip"):
                    tops[tool] = top_paths_rclip(out) if tool == "rclip" else top_paths_clipdex(out)
        same_top.append(len(set(tops["clipdex"]) & set(tops["rclip"])))

    rows = []
    for task in ["index 640x480", "index 4032x3024", "text search, cold", "image search, cold"]:
        row: dict[str, object] = {"task": task}
        for tool in tools:
            row[f"{tool} s"] = round(statistics.median(times[(tool, task)]), 3)
        row["rclip / clipdex"] = round(row["rclip s"] / row["clipdex s"], 2)  # type: ignore[operator]
        row["rclip / int8"] = round(row["rclip s"] / row["clipdex int8 s"], 2)  # type: ignore[operator]
        if args.before:
            row["before / clipdex"] = round(row["before s"] / row["clipdex s"], 2)  # type: ignore[operator]
        for tool in tools:
            row[f"{tool} MiB"] = round(statistics.median(peaks[(tool, task)]))
        rows.append(row)

    flops = image_tower_flops(MODEL)
    peak = machine_peak()
    throughput = []
    for tool in tools:
        for size in folders:
            n = len(list(folders[size].iterdir()))
            per_s = n / statistics.median(times[(tool, f"index {size}")])
            throughput.append({"tool": tool, "photos": size, "images/s": round(per_s, 2),
                               "image tower GFLOP/s": round(per_s * flops / 1e9, 1),
                               "of GEMM peak": f"{per_s * flops / 1e9 / peak['gemm GFLOP/s']:.0%}",
                               "of nominal peak": f"{per_s * flops / 1e9 / peak['nominal GFLOP/s']:.0%}"})  # fmt: skip
    columns = ["task", *(f"{t} s" for t in tools), "rclip / clipdex", "rclip / int8"] + (
        ["before / clipdex"] if args.before else []
    )
    columns += [f"{t} MiB" for t in tools]
    table = markdown_table(rows, columns)
    table += f"\n\n{MODEL} image tower: {flops / 1e9:.2f} GFLOP per image; machine: {peak}\n\n"
    table += markdown_table(throughput, list(throughput[0]))
    table += f"\n\nphotos in both tools' top 10 for the text query, per round: {same_top}"
    rclip_version = subprocess.run([args.rclip, "--version"], capture_output=True, text=True).stdout.strip()
    payload = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "rclip": rclip_version,
               "rows": rows, "throughput": throughput, "flops_per_image": flops, "peak": peak,
               "top10_overlap": same_top, "times": {f"{k[0]}|{k[1]}": v for k, v in times.items()},
               "peaks": {f"{k[0]}|{k[1]}": v for k, v in peaks.items()}}  # fmt: skip
    write_report(args.out, "vs_rclip", payload, table)
    print(table)
    if args.before:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before" / "worktree")])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
