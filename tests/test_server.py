"""`clipdex serve`: the API against the library it serves, its limits and errors, files only by id, reloads."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading

import numpy as np
import pytest
from conftest import LOCAL, brute_force, clipdex_serve, run, search_json, serving
from corpus import make_captioned_library, make_images
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.searcher import Searcher, Target
from clipdex.retrieval.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    """30 photos, a caption file linking 20 of them, and a secret file beside the library."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("served")
    made = make_captioned_library(root, 30, 20, seed=71)
    (root / "secret.txt").write_text("not for the web\n")
    index = root / "idx"
    cli = CliRunner()
    run(cli, "index", root / "photos", "--texts", root / "captions.csv", "--index", index, *tiny_model.cli_args())
    return root, index, made


@pytest.fixture(scope="module")
def searcher(library):
    return Searcher(library[1])


@pytest.fixture(scope="module")
def client(library, searcher):
    return TestClient(create_app(searcher, ServeConfig(library[1], max_upload_bytes=200_000)), base_url=LOCAL)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_api_answers_as_the_library_and_the_cli_do(client, searcher, library, cli):
    _, index, made = library
    for q, target in [("a red circle", "images"), ("a blue square on a green background", "texts")]:
        got = client.get("/api/search", params={"q": q, "k": 7, "target": target})
        assert got.status_code == 200
        want = searcher.search_text(q, k=7, target=Target(target))
        assert got.json()["results"] == [h.to_json() for h in want]
        assert got.json() == search_json(cli, index, q, "-k", 7, "--target", target)
        posted = client.post("/api/search", json={"q": q, "k": 7, "target": target})
        assert posted.json() == got.json()
    image = made[4][0]
    for target in ("images", "texts"):
        up = client.post(
            "/api/search",
            files={"image": (image.name, image.read_bytes(), "image/png")},
            data={"k": "5", "target": target},
        )
        assert up.status_code == 200, up.text
        want = searcher.search(Query.build(data=image.read_bytes()), k=5, target=Target(target))
        assert up.json()["results"] == [h.to_json() for h in want]
        raw = [
            h
            for h in searcher.search_image(image, k=6, target=Target(target))
            if h.kind == "text" or h.path != str(image)
        ]
        assert [h.id for h in want] == [h.id for h in raw[:5]]  # the uploaded image itself is left out
        cli_json = search_json(cli, index, "--image", image, "-k", 5, "--target", target)
        assert up.json()["results"] == cli_json["results"]


def test_items_and_similar_equal_brute_force(client, searcher, library, reference):
    _, _, made = library
    paths = [p for p, _ in made]
    vectors = reference.images(paths)
    hit = searcher.search_image(paths[0], k=1)[0]
    item = client.get(f"/api/items/{hit.id}").json()
    assert item == {"id": hit.id, "kind": "image", "path": str(paths[0]), "text": item["text"]}
    similar = client.get(f"/api/items/{hit.id}/similar", params={"k": 6}).json()
    order, scores = brute_force(vectors[0], vectors, 7)
    want = [str(paths[i]) for i in order if i != 0][:6]
    got = [r["path"] for r in similar["results"]]
    assert str(paths[0]) not in got
    assert got == want
    np.testing.assert_allclose(
        [r["score"] for r in similar["results"]],
        [s for i, s in zip(order, scores, strict=True) if i != 0][:6],
        atol=2e-5,
    )
    text_hit = searcher.search_text("a red circle", k=1, target=Target.TEXTS)[0]
    texts = client.get(f"/api/items/{text_hit.id}/similar", params={"k": 3}).json()
    assert texts["target"] == "texts" and all(r["kind"] == "text" and r["id"] != text_hit.id for r in texts["results"])


def test_thumbnails_are_bounded_cached_outside_the_index_and_revalidated(client, searcher, library, weights_cache):
    _, index, made = library
    big = made[5][0].parent / "big_photo.jpg"
    Image.new("RGB", (1600, 900), (200, 30, 30)).save(big, quality=90)
    from clipdex.retrieval.serve.thumbnails import thumbnail_dir

    hit = searcher.search_image(made[5][0], k=1)[0]
    r = client.get(f"/api/items/{hit.id}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) <= 320
    assert "max-age" in r.headers["cache-control"]
    again = client.get(f"/api/items/{hit.id}/thumbnail", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    cached = list(thumbnail_dir(index).rglob("*.jpg"))
    assert cached and all(weights_cache in p.parents for p in cached)
    assert not any(index in p.parents for p in cached)
    full = client.get(f"/api/items/{hit.id}/image")
    assert full.status_code == 200 and full.content == made[5][0].read_bytes()
    assert full.headers["content-type"] == "image/png"


def test_files_only_by_id_traversal_never_returns_a_file(client, searcher, library, tmp_path):
    root = library[0]
    secret = (root / "secret.txt").read_text()
    attempts = [
        "/api/items/..%2f..%2fsecret.txt/image",
        "/api/items/%2e%2e/image",
        "/api/items/%2e%2e%2f%2e%2e%2fsecret.txt/thumbnail",
        "/api/items/../../secret.txt",
        f"/api/items/{root}/secret.txt/image",
        f"/api/items/%2F{str(root / 'secret.txt').lstrip('/')}/image",
        "/api/items/1%00/image",
        "/api/items/-1/image",
        "/api/items/1e3/image",
        "/api/items/99999999/image",
        "/..%2fsecret.txt",
        "/static/../secret.txt",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/api/items/1/image/../../../secret.txt",
    ]
    for url in attempts:
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code, r.text[:200])
        assert secret not in r.text and r.json()["error"]
    text = searcher.search_text("a red circle", k=1, target=Target.TEXTS)[0]
    assert client.get(f"/api/items/{text.id}/image").status_code == 404  # texts have no file


def test_a_symlink_put_in_place_of_an_indexed_file_is_refused(tmp_path, tiny_model, cli):
    photos = tmp_path / "photos"
    made = make_images(photos, 3, seed=72)
    (tmp_path / "secret.png").write_bytes(_png(Image.new("RGB", (8, 8), (1, 2, 3))))
    run(cli, "index", photos, "--index", tmp_path / "idx", *tiny_model.cli_args())
    searcher = Searcher(tmp_path / "idx")
    client = TestClient(create_app(searcher, ServeConfig(tmp_path / "idx")), base_url=LOCAL)
    ids = {h.path: h.id for h in searcher.search_text("a shape", k=3)}
    victim, other = made[0][0], made[1][0]
    victim.unlink()
    victim.symlink_to(tmp_path / "secret.png")
    os.rename(photos, tmp_path / "real")  # the folder itself becomes a link elsewhere
    (tmp_path / "photos").symlink_to(tmp_path / "real")
    for path in (victim, other):
        for what in ("image", "thumbnail"):
            r = client.get(f"/api/items/{ids[str(path)]}/{what}")
            assert r.status_code == 404, (path, what, r.status_code)
            assert r.headers["content-type"].startswith("application/json")


def test_bad_requests_get_json_4xx_never_a_traceback(client, library):
    _, _, made = library
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpixel, a few KB: over the pixel limit
    cases = [
        client.get("/api/search"),
        client.get("/api/search", params={"q": ""}),
        client.get("/api/search", params={"q": "   "}),
        client.get("/api/search", params={"q": "x" * 1001}),
        client.get("/api/search", params={"q": "dog", "k": 0}),
        client.get("/api/search", params={"q": "dog", "k": 1001}),
        client.get("/api/search", params={"q": "dog", "k": "many"}),
        client.get("/api/search", params={"q": "dog", "target": "videos"}),
        client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/api/search", json={"k": 3}),
        client.post("/api/search", content=b"q=dog", headers={"content-type": "text/plain"}),
        client.post("/api/search", files={"image": ("a.png", b"not an image at all", "image/png")}),
        client.post("/api/search", files={"image": ("bomb.png", bomb.getvalue(), "image/png")}),
        client.post("/api/search", files={"image": ("a.png", os.urandom(300_000), "image/png")}),
        client.post("/api/search", files={"image": ("a.png", made[0][0].read_bytes(), "image/png")}, data={"k": "x"}),
        client.post(
            "/api/search", files={"image": ("a.png", made[0][0].read_bytes(), "image/png")}, data={"target": "z"}
        ),
        client.post("/api/search", data={"k": "3"}),
        client.get("/api/items/abc"),
        client.get("/api/items/12/similar", params={"k": -3}),
        client.delete("/api/search"),
        client.get("/nothing/here"),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:300])
        body = r.json()
        assert isinstance(body["error"], str) and body["error"] and "Traceback" not in body["error"]
    assert cases[13].status_code == 413  # over --max-upload
    assert "over the limit" in cases[12].json()["error"]  # the decompression-bomb guard of indexing


def test_token_guards_every_api_route(library, searcher):
    _, index, _ = library
    client = TestClient(create_app(searcher, ServeConfig(index, token="s3cret")), base_url=LOCAL)
    for url in ("/api/search?q=dog", "/api/info", "/api/items/1", "/api/items/1/thumbnail", "/api/openapi.json"):
        r = client.get(url)
        assert r.status_code == 401 and "token" in r.json()["error"], url
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/search?q=dog", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    client.cookies.set("clipdex_token", "s3cret")
    assert client.get("/api/search?q=dog").status_code == 200
    assert (
        TestClient(create_app(searcher, ServeConfig(index, token="s3cret")), base_url=LOCAL).get("/healthz").status_code
        == 200
    )


def test_a_publish_by_a_running_indexer_is_picked_up(tmp_path, tiny_model, cli):
    photos = tmp_path / "photos"
    make_images(photos, 4, seed=73)
    run(cli, "index", photos, "--index", tmp_path / "idx", *tiny_model.cli_args())
    client = TestClient(create_app(Searcher(tmp_path / "idx"), ServeConfig(tmp_path / "idx")), base_url=LOCAL)
    before = client.get("/api/search", params={"q": "a shape", "k": 50}).json()["results"]
    generation = client.get("/healthz").json()["generation"]
    make_images(photos, 3, seed=74, start=100)
    run(cli, "index", photos, "--index", tmp_path / "idx")
    after = client.get("/api/search", params={"q": "a shape", "k": 50}).json()["results"]
    assert (len(before), len(after)) == (4, 7)
    assert client.get("/healthz").json()["generation"] > generation
    assert client.get("/api/info").json()["counts"]["images"] == 7


def test_page_is_served_with_everything_it_needs_from_this_server(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/app.js", "/style.css", "/favicon.svg"):
        r = client.get(asset)
        text = r.text.replace("http://www.w3.org/2000/svg", "")  # an XML namespace name, never fetched
        assert r.status_code == 200 and "https://" not in text and "http://" not in text, asset
    schema = client.get("/api/openapi.json").json()
    assert {"/api/search", "/api/items/{item}", "/api/items/{item}/similar", "/api/info"} <= set(schema["paths"])


def test_concurrent_load_on_loopback_has_no_errors(library, searcher):
    """A real uvicorn on 127.0.0.1: 8 clients x 30 mixed requests, every answer right (bounded in count and time)."""
    import httpx

    _, index, made = library
    queries = ["a red circle", "a blue square", "a small green triangle", "a cross on white"]
    want = {q: [h.id for h in searcher.search_text(q, k=5)] for q in queries}
    image = made[2][0].read_bytes()
    want_image = [h.id for h in searcher.search(Query.build(data=image), k=5)]
    failures: list[str] = []

    def worker(n: int) -> None:
        with httpx.Client(base_url=base, timeout=20) as http:
            for i in range(30):
                try:
                    if i % 5 == 4:
                        r = http.post("/api/search", files={"image": ("q.png", image, "image/png")}, data={"k": "5"})
                        ok = r.status_code == 200 and [h["id"] for h in r.json()["results"]] == want_image
                    elif i % 5 == 3:
                        r = http.get(f"/api/items/{want_image[0]}/thumbnail")
                        ok = r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                    else:
                        q = queries[(n + i) % len(queries)]
                        r = http.get("/api/search", params={"q": q, "k": 5})
                        ok = r.status_code == 200 and [h["id"] for h in r.json()["results"]] == want[q]
                    if not ok:
                        failures.append(f"{r.request.url}: {r.status_code} {r.text[:100]}")
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    with serving(create_app(searcher, ServeConfig(index))) as base:
        workers = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
    assert failures == []


def test_serve_command_checks_before_loading(cli, tmp_path, library, monkeypatch):
    import socket

    from clipdex.cli import serve as serve_cli

    result = cli.invoke(serve_cli.app, ["serve", "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    _, index, _ = library
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli.invoke(serve_cli.app, ["serve", "--index", str(index), "--port", str(port)])
        assert result.exit_code == 2 and "pick another --port" in result.stderr
    started = []
    monkeypatch.setattr(serve_cli, "_check_port_free", lambda host, port: None)
    monkeypatch.setattr("clipdex.retrieval.serve.app.serve", lambda config, on_ready=None: started.append(config))
    result = cli.invoke(serve_cli.app, ["serve", "--index", str(index), "--host", "192.0.2.10"])
    assert result.exit_code == 0 and "without --token" in result.stderr
    result = cli.invoke(serve_cli.app, ["serve", "--index", str(index), "--host", "192.0.2.10", "--token", "t"])
    assert result.exit_code == 0 and "without --token" not in result.stderr
    assert [c.host for c in started] == ["192.0.2.10", "192.0.2.10"] and started[1].token == "t"
    assert started[0].is_loopback is False and ServeConfig(index).host == "127.0.0.1"


def test_info_reports_the_index(client, library):
    info = client.get("/api/info").json()
    assert info["counts"]["images"] == 30 and info["counts"]["texts"] == 20
    assert json.dumps(info)  # plain JSON all the way down


def test_cli_search_is_answered_by_a_running_server_with_the_same_output(library, searcher, cli, monkeypatch):
    from clipdex.retrieval.serve import remote

    _, index, made = library
    local_text = run(cli, "search", "a red circle", "--index", index, "--json", "--no-server", "-k", 6)
    local_image = run(
        cli, "search", "--image", made[1][0], "--index", index, "--json", "--no-server", "--target", "texts"
    )
    local_table = run(cli, "search", "a red circle", "--index", index, "--no-server")
    with serving(create_app(searcher, ServeConfig(index, token="tok"))) as base:
        registered = remote.register(index, base, "tok")
        assert registered.stat().st_mode & 0o077 == 0  # the token is for this user only
        monkeypatch.setattr(
            "clipdex.retrieval.search.searcher.Searcher.__init__", lambda *a, **kw: pytest.fail("loaded locally")
        )
        assert run(cli, "search", "a red circle", "--index", index, "--json", "-k", 6) == local_text
        assert run(cli, "search", "--image", made[1][0], "--index", index, "--json", "--target", "texts") == local_image
        assert run(cli, "search", "a red circle", "--index", index) == local_table
        monkeypatch.undo()
        # what the server refuses (k over its limit) is answered locally, as without a server
        assert len(json.loads(run(cli, "search", "a shape", "--index", index, "--json", "-k", 5000))["results"]) == 30
    # the server is gone but still registered: the search runs here
    assert run(cli, "search", "a red circle", "--index", index, "--json", "-k", 6) == local_text
    remote.unregister(registered)
    assert not registered.exists()


def test_a_dead_servers_registration_is_ignored(library, cli, monkeypatch):
    import subprocess

    from clipdex.retrieval.serve import remote

    _, index, _ = library
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = remote.registration_path(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"url": "http://127.0.0.1:9", "pid": gone.pid, "token": None, "index": str(index.resolve())})
    )
    calls = []
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **kw: calls.append(a))
    assert json.loads(run(cli, "search", "a red circle", "--index", index, "--json"))["results"]
    assert calls == []
    path.unlink()


def test_clipdex_serve_end_to_end(library, tmp_path):
    """The real command in its own process: it listens on loopback, registers for `clipdex search`, answers as
    the library does, and unregisters when stopped."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from clipdex.retrieval.serve import remote

    _, index, _ = library
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "clipdex"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--index", str(index), "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stderr.readline()  # "clipdex: serving ... at http://127.0.0.1:PORT/"
        assert f"http://127.0.0.1:{port}/" in line, line
        assert remote.registration_path(index).is_file()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=a+red+circle&k=4", timeout=30) as r:
            served = json.loads(r.read())
        out = subprocess.run(
            [*cmd, "search", "a red circle", "--index", str(index), "-k", "4", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(out.stdout) == served
        if shutil.which("ss"):  # iproute2: what the kernel says is listening on that port
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert listening and all("127.0.0.1:" in row for row in listening.strip().splitlines()), listening
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert not remote.registration_path(index).exists()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_serve_stopped_by_a_signal_cleans_up(library, signum):
    """Ctrl-C, and SIGTERM as systemd and `docker stop` send it: the server stops with the same exit code, and its
    registration file (what `clipdex search` looks for) is removed."""
    import signal

    from clipdex.retrieval.serve import remote

    _, index, _ = library
    with clipdex_serve(index) as (proc, _port):
        assert remote.registration_path(index).is_file()
        proc.send_signal(getattr(signal, signum))
        code = proc.wait(timeout=30)
    assert code == 130, (code, proc.stderr.read())
    assert not remote.registration_path(index).exists()
