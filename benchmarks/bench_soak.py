"""A soak of `clipdex serve`: mixed concurrent load (text, image upload, similar, thumbnail) for minutes while
`clipdex index` runs publish again and again in the same index. Reports requests served and failed, latency per
kind (p50, p99), publishes seen, and the server's resident memory and open descriptors after warm-up and at the end.

    python benchmarks/bench_soak.py --seconds 180 --clients 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from _report import machine, markdown_table, write_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from corpus import make_images, train_tiny_model, write_tiny_config  # noqa: E402


def request(base: str, kind: str, state: dict) -> None:
    if kind == "text":
        url = f"{base}/api/search?q=a+red+circle&k=50"
    elif kind == "similar":
        url = f"{base}/api/items/{state['ids'][state['n'] % len(state['ids'])]}/similar?k=10"
    elif kind == "thumbnail":
        url = f"{base}/api/items/{state['ids'][state['n'] % len(state['ids'])]}/thumbnail"
    else:
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'.encode()
            + state["image"]
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        with urllib.request.urlopen(
            urllib.request.Request(f"{base}/api/search", data=body, headers=headers, method="POST"), timeout=60
        ) as r:
            r.read()
        return
    with urllib.request.urlopen(url, timeout=60) as r:
        data = r.read()
    if kind == "text":
        state["ids"] = [h["id"] for h in json.loads(data)["results"]] or state["ids"]


def usage(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipdex-soak-"))
    os.environ.setdefault("CLIPDEX_CACHE", str(work / "cache"))
    config = write_tiny_config(work)
    weights = train_tiny_model(config, work / "tiny-clip.pt")
    photos, index = work / "photos", work / "idx"
    made = make_images(photos, 48, seed=1)
    cli = [sys.executable, "-m", "clipdex"]
    subprocess.run([*cli, "index", str(photos), "--index", str(index), "--model", str(config), "--pretrained",
                    str(weights)], check=True, capture_output=True)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*cli, "serve", "--index", str(index), "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    server.stderr.readline()
    base = f"http://127.0.0.1:{port}"
    kinds = ("text", "upload", "similar", "thumbnail")
    latency: dict[str, list[float]] = {k: [] for k in kinds}
    failed: list[str] = []
    stop = threading.Event()
    publishes = [0]

    def client(n: int) -> None:
        state = {"ids": [], "n": n, "image": made[n][0].read_bytes()}
        request(base, "text", state)
        while not stop.is_set():
            state["n"] += 1
            kind = kinds[state["n"] % len(kinds)]
            t0 = time.perf_counter()
            try:
                request(base, kind, state)
                latency[kind].append(time.perf_counter() - t0)
            except Exception as e:
                failed.append(f"{kind}: {type(e).__name__}: {e}")

    def writer() -> None:
        round_ = 0
        while not stop.is_set():
            make_images(photos / f"new{round_}", 4, seed=100 + round_)
            subprocess.run([*cli, "index", str(photos), "--index", str(index), "--batch-size", "2", "--commit-every",
                            "1", "--publish-every", "0"], check=True, capture_output=True)  # fmt: skip
            publishes[0] += 2
            round_ += 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    indexing = threading.Thread(target=writer, daemon=True)
    for t in [*threads, indexing]:
        t.start()
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        samples.append((time.monotonic() - started, *usage(server.pid)))
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    indexing.join(timeout=300)
    generation = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=30).read())["generation"]
    server.send_signal(signal.SIGINT)
    server.wait(timeout=30)
    warm = next(s for s in samples if s[0] >= args.seconds / 3)
    rows = [
        {
            "kind": k,
            "requests": len(v),
            "p50_ms": 1000 * statistics.median(v) if v else None,
            "p99_ms": 1000 * sorted(v)[int(0.99 * (len(v) - 1))] if v else None,
        }
        for k, v in latency.items()
    ]
    payload = {
        "machine": machine(),
        "seconds": args.seconds,
        "clients": args.clients,
        "served": sum(len(v) for v in latency.values()),
        "failed": len(failed),
        "failures": failed[:10],
        "generations_published": generation,
        "rss_kib_warm": warm[1],
        "rss_kib_end": samples[-1][1],
        "fds_warm": warm[2],
        "fds_end": samples[-1][2],
        "rows": rows,
    }
    table = markdown_table(rows, ["kind", "requests", "p50_ms", "p99_ms"])
    summary = (
        f"\n\n{payload['served']} requests served, {payload['failed']} failed, {generation} generations published; "
        f"RSS {warm[1] / 1024:.0f} MiB after warm-up, {samples[-1][1] / 1024:.0f} MiB at the end; "
        f"open descriptors {warm[2]} → {samples[-1][2]}"
    )
    write_report(args.out, "bench_soak", payload, table + summary)


if __name__ == "__main__":
    main()
