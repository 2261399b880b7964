"""A short soak: a real `clipdex serve` under mixed concurrent load (text, image upload, similar, thumbnails) while
`clipdex index` runs publish again and again in the same index. No request fails, every answer is whole (ranks in
order, no item twice, every image hit a file that exists), and the server's open files and memory stay flat.
`benchmarks/bench_soak.py` runs the same for minutes and reports the figures (RESULTS.md)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from conftest import clipdex_serve, run
from corpus import make_images
from typer.testing import CliRunner

LOAD_SECONDS = 20
CLIENTS = 4


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200, url
        return r.read()


def _upload(base: str, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n20\r\n--{boundary}--\r\n'.encode()
    )
    request = urllib.request.Request(
        f"{base}/api/search",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200
        return r.read()


def _whole(answer: dict) -> None:
    """One snapshot's answer: ranks 1..n, scores not increasing, no item twice, image hits that are files."""
    hits = answer["results"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all(a["score"] >= b["score"] - 1e-6 for a, b in itertools.pairwise(hits))
    assert len({h["id"] for h in hits}) == len(hits)
    assert all(h["kind"] != "image" or (h["path"] and Path(h["path"]).is_file()) for h in hits)


def _usage(pid: int) -> tuple[int, int]:
    """(resident KiB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_serving_under_load_while_an_index_run_publishes(tmp_path, tiny_model):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    made = make_images(photos, 24, seed=95)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    failures: list[str] = []
    served = [0]
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    with clipdex_serve(index) as (server, port):
        base = f"http://127.0.0.1:{port}"
        query_image = made[0][0].read_bytes()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    kind = (n + i) % 4
                    if kind == 0:
                        _whole(json.loads(_get(f"{base}/api/search?q=a+red+circle&k=50")))
                    elif kind == 1:
                        _whole(json.loads(_upload(base, query_image)))
                    else:
                        hits = json.loads(_get(f"{base}/api/search?q=a+shape&k=5"))["results"]
                        if kind == 2:
                            _whole(json.loads(_get(f"{base}/api/items/{hits[i % len(hits)]['id']}/similar?k=10")))
                        else:
                            assert _get(f"{base}/api/items/{hits[i % len(hits)]['id']}/thumbnail")[:2] == b"\xff\xd8"
                    served[0] += 1
                except Exception as e:  # every failed request is a finding, with its reason
                    failures.append(f"{type(e).__name__}: {e}")

        def writer() -> None:
            for round_ in range(4):
                make_images(photos / f"new{round_}", 6, seed=96 + round_)
                subprocess.run(
                    [sys.executable, "-m", "clipdex", "index", str(photos), "--index", str(index),
                     "--batch-size", "2", "--commit-every", "1", "--publish-every", "0"],
                    check=True, capture_output=True, timeout=300,
                )  # fmt: skip

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        indexing = threading.Thread(target=writer)
        for t in [*threads, indexing]:
            t.start()
        started = time.monotonic()
        while (time.monotonic() - started < LOAD_SECONDS or indexing.is_alive()) and time.monotonic() - started < 300:
            samples.append((time.monotonic() - started, *_usage(server.pid)))
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        indexing.join(timeout=300)
        final = json.loads(_get(f"{base}/api/info"))
    assert failures == [], failures[:5]
    assert served[0] > 50
    assert final["counts"]["images"] == 24 + 6 * 4  # the writer's runs all published
    warm = [s for s in samples if s[0] >= samples[-1][0] / 3]
    fds = [f for _, _, f in warm]
    assert max(fds) - min(fds) <= 16, fds  # no descriptor leak per request or per publish
    rss = [r for _, r, _ in warm]
    assert max(rss) <= 1.5 * rss[0], rss
