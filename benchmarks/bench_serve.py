"""Serving latency and throughput: `clipdex serve` vs. clip-retrieval's `back`, same embeddings, same queries.

One run, both servers up side by side on loopback, levels interleaved (for each concurrency: clipdex, then
clip-retrieval), so that both see the same machine:
  * a corpus of N synthetic unit vectors (clustered, like image embeddings) in clip-retrieval's layout, imported
    with `clipdex import`; clip-retrieval gets the same vectors in the FAISS index type clipdex chose, with the
    same nprobe;
  * queries encoded by the real model (ViT-B-32; random weights, since speed does not depend on them), sent by a
    load generator in this process at concurrency 1, 8 and 32: text queries never seen before (`--requests`), the
    same 18 texts again (which clipdex answers from its query cache), and 640x480 JPEG images.
Reports p50/p99 latency (ms) and QPS per server, query kind and concurrency.

    python benchmarks/bench_serve.py --n 100000 --clip-retrieval-python /tmp/cr/bin/python
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _report import machine, markdown_table, write_report
from PIL import Image

TEXTS = [
    "a dog running on the beach",
    "two people riding bicycles in the city",
    "a bowl of fruit on a wooden table",
    "snow covered mountains at sunrise",
    "a red car parked next to a house",
    "children playing football in a park",
    "a cat sleeping on a sofa",
    "a plate of pasta with tomato sauce",
    "an old church in a small village",
    "a man reading a newspaper on a train",
    "fireworks over a river at night",
    "a sailing boat on a calm lake",
    "a woman holding an umbrella in the rain",
    "a birthday cake with candles",
    "a busy market street in summer",
    "a laptop and a cup of coffee on a desk",
    "a horse grazing in a green field",
    "a bridge over a foggy bay",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_corpus(folder: Path, n: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
    table = pa.table(
        {"image_path": [f"/photos/{i:07d}.jpg" for i in range(n)], "caption": [f"photo number {i}" for i in range(n)]}
    )
    pq.write_table(table, folder / "metadata" / "metadata_0.parquet")
    return x


def query_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def wait_until(url: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def start_clipdex(index: Path, port: int) -> subprocess.Popen[Any]:
    cmd = [sys.executable, "-m", "clipdex", "serve", "--index", str(index), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    wait_until(f"http://127.0.0.1:{port}/healthz", proc, 300)
    return proc


_CLIP_BACK = """
import sys, flask
run = flask.Flask.run
flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host="127.0.0.1", port=port, **kw)  # loopback only
from clip_retrieval.clip_back import clip_back
clip_back(indices_paths=sys.argv[1], port=int(sys.argv[2]), clip_model=sys.argv[3], enable_hdf5=True,
          enable_mclip_option=False, use_jit=False, provide_aesthetic_embeddings=False,
          columns_to_return=["image_path", "caption"])
"""


def start_clip_retrieval(
    python: str, folder: Path, index_file: Path, checkpoint: Path, port: int
) -> subprocess.Popen[Any]:
    indice = folder / "cr_index"
    (indice / "metadata").mkdir(parents=True)
    os.link(folder / "emb" / "metadata" / "metadata_0.parquet", indice / "metadata" / "0.parquet")
    os.link(index_file, indice / "image.index")
    paths = folder / "indices.json"
    paths.write_text(json.dumps({"bench": str(indice)}))
    model = f"open_clip:ViT-B-32/{checkpoint}"  # all_clip splits the name at the first "/": the rest is the file
    proc = subprocess.Popen(
        [python, "-c", _CLIP_BACK, str(paths), str(port), model], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(f"http://127.0.0.1:{port}/indices-list", proc, 600)
    return proc


def load(send: Any, payloads: list[Any], concurrency: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                ok = send(client, payloads[i % len(payloads)])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += 0 if ok else 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(1000 * x for x in latencies)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        "qps": len(ms) / wall,
        "errors": errors[0],
        "requests": len(ms),
    }


def clipdex_senders(base: str) -> dict[str, Any]:
    def text(client: httpx.Client, q: str) -> bool:
        r = client.get(f"{base}/api/search", params={"q": q, "k": 10})
        return r.status_code == 200 and len(r.json()["results"]) == 10

    def image(client: httpx.Client, data: bytes) -> bool:
        r = client.post(f"{base}/api/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "10"})
        return r.status_code == 200 and len(r.json()["results"]) == 10

    return {"text": text, "image": image}


def clip_retrieval_senders(base: str) -> dict[str, Any]:
    def post(client: httpx.Client, body: dict[str, Any]) -> bool:
        body = {"modality": "image", "num_images": 10, "indice_name": "bench", "deduplicate": False, **body}
        r = client.post(f"{base}/knn-service", json=body)
        return r.status_code == 200 and len(r.json()) == 10

    return {
        "text": lambda client, q: post(client, {"text": q}),
        "image": lambda client, data: post(client, {"image": base64.b64encode(data).decode()}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--requests", type=int, default=160, help="requests per server, query kind and concurrency")
    ap.add_argument("--image-requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--clip-retrieval-python", help="python of a virtualenv with clip-retrieval installed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import faiss
    import open_clip
    import torch

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        vectors = make_corpus(tmp / "emb", args.n, args.dim)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        checkpoint = tmp / "vit-b-32-random.pt"
        torch.save(model.state_dict(), checkpoint)
        del model
        index = tmp / "idx"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "clipdex",
                "import",
                str(tmp / "emb"),
                "--index",
                str(index),
                "--model",
                "ViT-B-32",
                "--pretrained",
                str(checkpoint),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        manifest = json.loads((index / "manifest.json").read_text())
        chosen = manifest["ann"]["images"]
        factory, params = chosen["factory"], chosen.get("params", "")
        print(f"clipdex chose {factory} {params} for {args.n} vectors", flush=True)

        servers: dict[str, tuple[subprocess.Popen[Any], dict[str, Any]]] = {}
        port = free_port()
        servers["clipdex"] = (start_clipdex(index, port), clipdex_senders(f"http://127.0.0.1:{port}"))
        if args.clip_retrieval_python:
            same = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
            same.train(
                vectors[np.random.default_rng(2).choice(len(vectors), min(len(vectors), 64 * 1024), replace=False)]
            )
            same.add(vectors)
            if params:
                faiss.ParameterSpace().set_index_parameters(same, params)
            faiss.write_index(same, str(tmp / "same.index"))
            port = free_port()
            proc = start_clip_retrieval(args.clip_retrieval_python, tmp, tmp / "same.index", checkpoint, port)
            servers["clip-retrieval back"] = (proc, clip_retrieval_senders(f"http://127.0.0.1:{port}"))
        images = query_images(8)
        rows = []
        try:
            for _, senders in servers.values():  # warm-up: first requests compile kernels and fill caches
                load(senders["text"], TEXTS, 2, 8)
                load(senders["image"], images, 2, 4)
            for c in args.concurrency:
                # every text query new (no cache can answer it), then the same few again (clipdex caches them)
                unique = [f"{TEXTS[i % len(TEXTS)]}, take {c}-{i}" for i in range(max(args.requests, c))]
                levels = (
                    ("text", unique, args.requests),
                    ("text, repeated", TEXTS, args.requests),
                    ("image", images, args.image_requests),
                )
                for kind, payloads, count in levels:
                    for name, (_, senders) in servers.items():
                        result = load(senders[kind.split(",")[0]], payloads, c, max(count, c))
                        rows.append({"server": name, "query": kind, "concurrency": c, **result})
                        print(rows[-1], flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    for row in rows:
        peer = next(
            (
                r
                for r in rows
                if r["server"] != row["server"]
                and r["query"] == row["query"]
                and r["concurrency"] == row["concurrency"]
            ),
            None,
        )
        if row["server"] == "clipdex" and peer:
            row["qps_ratio"] = row["qps"] / peer["qps"]
    table = markdown_table(
        rows, ["server", "query", "concurrency", "p50_ms", "p99_ms", "qps", "qps_ratio", "errors", "requests"]
    )
    payload = {"machine": machine(), "n": args.n, "dim": args.dim, "factory": factory, "params": params, "rows": rows}
    write_report(args.out, "serve", payload, table)


if __name__ == "__main__":
    main()
