"""Files a shared folder can hold that are not photos, and pictures whose pixels would not fit in memory: refused
at once, in one line, without blocking or allocating."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import LOCAL, run
from corpus import make_images
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.retrieval.errors import ImageDecodeError
from clipdex.retrieval.imaging.decode import DECODE_BUDGET, decode_bytes, decode_image
from clipdex.retrieval.imaging.files import NotRegularFile, open_regular, read_regular
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(NotRegularFile, match="a FIFO"):
        open_regular(fifo)
    with pytest.raises(NotRegularFile, match="a device"):
        read_regular("/dev/zero", 10)
    (tmp_path / "ok.bin").write_bytes(b"12345")
    data, st = read_regular(tmp_path / "ok.bin", 3)
    assert data == b"" and st.st_size == 5  # over the limit: nothing read
    assert read_regular(tmp_path / "ok.bin", 10)[0] == b"12345"


def test_a_fifo_where_an_indexed_photo_was_blocks_nothing(tmp_path, tiny_model, cli):
    photos = tmp_path / "photos"
    made = make_images(photos, 3, seed=81)
    index = tmp_path / "idx"
    run(cli, "index", photos, "--index", index, *tiny_model.cli_args())
    searcher = Searcher(index)
    ids = {h.path: h.id for h in searcher.search_text("a shape", k=3)}
    victim = made[0][0]
    victim.unlink()
    os.mkfifo(victim)
    client = TestClient(create_app(searcher, ServeConfig(index)), base_url=LOCAL)
    for what in ("image", "thumbnail"):
        r = client.get(f"/api/items/{ids[str(victim)]}/{what}", timeout=20)
        assert r.status_code == 404 and "not a regular file" in r.json()["error"], r.text
    summary = json.loads(run(cli, "index", photos, "--index", index, "--json"))  # the walk does not block on it
    assert summary["removed"] == 1 and summary["unchanged"] == 2  # a FIFO is no photo: the item it replaced goes


def test_decoding_is_bounded_by_memory_before_any_pixel_is_decoded():
    """A 16-bit PNG of 13000x13000 compresses to a few hundred KB; decoded it took 4.4 GB."""
    big = np.zeros((13000, 13000), dtype=np.uint16)
    big[::100] = 60000
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    del big
    data = buf.getvalue()
    assert len(data) < 2 << 20
    with Image.open(io.BytesIO(data)) as img:
        assert decode_bytes(img) > DECODE_BUDGET
    script = textwrap.dedent(
        """
        import resource, sys
        from clipdex.retrieval.errors import ImageDecodeError
        from clipdex.retrieval.imaging.decode import decode_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_image(sys.stdin.buffer.read())
        except ImageDecodeError as e:
            print(str(e))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, check=True)
    said, grew = out.stdout.decode().strip().splitlines()
    assert "MiB to decode, over the 512 MiB budget" in said
    assert int(grew) < 64  # MiB: refused from the header


def test_sixteen_bit_images_convert_as_before_band_by_band():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, size=(700, 33), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    got = np.asarray(decode_image(buf.getvalue()).image)[..., 0]
    want = np.clip(arr.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")


def test_a_request_whose_headers_never_end_is_dropped(monkeypatch):
    import socket
    import threading
    import time

    import uvicorn

    from clipdex.retrieval.serve import timeouts

    monkeypatch.setattr(timeouts, "HEADERS_S", 0.5)

    async def app(scope, receive, send):  # pragma: no cover - never reached by the slow client
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=timeouts.TimedHttpProtocol)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            start = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server, not by our 10 s timeout
            assert time.monotonic() - start < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_stopped_server_exits_past_a_thread_stuck_in_the_kernel():
    script = textwrap.dedent(
        """
        import os, threading
        from clipdex.cli.serve import leave_stuck_threads
        r, w = os.pipe()
        threading.Thread(target=os.read, args=(r, 1)).start()  # blocks for good: nothing is ever written
        leave_stuck_threads(130, wait_s=0.5)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert out.returncode == 130, out.stderr
