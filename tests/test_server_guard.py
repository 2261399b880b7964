"""No web page can read a library through `clipdex serve`: foreign `Host`s (DNS rebinding), foreign `Origin`s and
cross-site fetches are refused on every route before it runs; every answer carries the headers a local web app
should send. Checked through the ASGI app, then against a real `clipdex serve` process with raw sockets."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from conftest import clipdex_serve, run, serving
from corpus import make_images
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipdex.retrieval.config import Kind
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app
from clipdex.retrieval.serve.guard import CONTENT_SECURITY_POLICY, split_host
from clipdex.retrieval.serve.routes_info import PAGE_FILES

PORT = 8765
OWN = f"localhost:{PORT}"
FOREIGN_HOSTS = [
    f"evil.example:{PORT}",
    "evil.example",
    f"localhost.evil.example:{PORT}",
    f"127.0.0.1.nip.io:{PORT}",
    f"[::2]:{PORT}",
    f"[2001:db8::1]:{PORT}",
    f"192.168.1.10:{PORT}",
    "localhost:1",  # the right name on another port
    "localhost",  # no port: port 80, not this server's
    f"[::1]:{PORT + 1}",
    "::1",  # an IPv6 literal without brackets is not a Host
    f"localhost:{PORT}@evil.example",
    "",
]
OWN_HOSTS = [OWN, f"127.0.0.1:{PORT}", f"[::1]:{PORT}", f"127.0.0.2:{PORT}", f"LOCALHOST:{PORT}"]


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("guarded")
    make_images(root / "photos", 4, seed=90)
    (root / "captions.txt").write_text("a red circle\n")
    run(CliRunner(), "index", root / "photos", "--texts", root / "captions.txt", "--index", root / "idx",
        *tiny_model.cli_args())  # fmt: skip
    return root / "idx"


@pytest.fixture(scope="module")
def app(index):
    return create_app(Searcher(index), ServeConfig(index, port=PORT))


def routes(index: Path) -> list[tuple[str, str]]:
    """Every route the app has, as (method, path) with a real image id: the API (from its own schema), the page's
    files and the schema itself."""
    image = Searcher(index).ids(Kind.IMAGE)[0]
    app = create_app(Searcher(index), ServeConfig(index, port=PORT))
    schema = TestClient(app, base_url=f"http://{OWN}").get("/api/openapi.json").json()
    found = [("GET", path) for path in (*PAGE_FILES, "/api/openapi.json")]
    for path, operations in schema["paths"].items():
        found += [(method.upper(), path.replace("{item}", str(image))) for method in operations]
    assert {p for _, p in found} >= {"/", "/api/search", "/api/info", "/healthz", f"/api/items/{image}/image"}
    return found


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> object:
    params = {"q": "a red circle"} if path == "/api/search" and method == "GET" else None
    body = {"json": {"q": "a red circle"}} if method == "POST" else {}
    return client.request(method, path, params=params, headers=headers, **body)


def test_own_hosts_are_answered_on_every_route(app, index):
    client = TestClient(app, base_url=f"http://{OWN}")
    for host in OWN_HOSTS:
        for method, path in routes(index):
            r = _call(client, method, path, {"host": host})
            assert r.status_code == 200, (host, method, path, r.status_code, r.text[:200])


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_foreign_host_is_refused_on_every_route_before_it_runs(app, index, host):
    client = TestClient(app, base_url=f"http://{OWN}")
    for method, path in routes(index):
        r = _call(client, method, path, {"host": host})
        assert r.status_code == 400, (host, method, path, r.status_code)
        assert set(r.json()) == {"error"} and "host" in r.json()["error"].lower()
        assert "red" not in r.text and str(index) not in r.text  # nothing of the library


def test_cross_site_requests_are_refused_on_the_api(app, index):
    client = TestClient(app, base_url=f"http://{OWN}")
    for method, path in routes(index):
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": f"http://localhost:{PORT + 1}"},  # another local app is another site
            {"origin": "null"},  # a sandboxed frame or a file:// page
            {"origin": f"https://{OWN}"},
            {"sec-fetch-site": "cross-site"},
        ):
            r = _call(client, method, path, headers)
            if path.startswith("/api/"):
                assert r.status_code == 403, (method, path, headers, r.status_code)
                assert "another site" in r.json()["error"]
            else:  # the page itself may be opened from a link on another site
                assert r.status_code == 200, (method, path, headers)
        same = _call(client, method, path, {"origin": f"http://{OWN}", "sec-fetch-site": "same-origin"})
        assert same.status_code == 200, (method, path)


def test_every_answer_carries_the_headers(app, index):
    client = TestClient(app, base_url=f"http://{OWN}")
    for method, path in [*routes(index), ("GET", "/nothing"), ("GET", "/api/items/999999")]:
        r = _call(client, method, path, {})
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cross-origin-resource-policy"] == "same-origin"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers.get_list("x-content-type-options") == ["nosniff"]  # once, though the image route sets it
    refused = client.get("/api/info", headers={"host": "evil.example"})
    assert refused.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_the_csp_allows_what_the_page_loads():
    """The page loads its own script, style and icon, makes blob: previews and nothing else: no inline code."""
    web = Path(__file__).resolve().parent.parent / "retrieval/serve/web"
    html = (web / "index.html").read_text()
    assert not re.search(r"<script>|<style|\sstyle=|\son[a-z]+=|javascript:", html)
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["/favicon.svg", "/style.css", "/", "/favicon.svg", "/app.js"]
    cookie = re.search(r"document\.cookie = `([^`]*)`", (web / "app.js").read_text())
    assert cookie is not None and "path=/" in cookie.group(1) and "SameSite=Strict" in cookie.group(1)


def test_a_non_loopback_bind_answers_its_address_or_the_names_given(index):
    searcher = Searcher(index)
    bound = TestClient(
        create_app(searcher, ServeConfig(index, host="192.0.2.10", port=PORT)), base_url=f"http://x:{PORT}"
    )
    assert bound.get("/healthz", headers={"host": f"192.0.2.10:{PORT}"}).status_code == 200
    assert bound.get("/healthz", headers={"host": f"localhost:{PORT}"}).status_code == 400
    named = ServeConfig(index, host="0.0.0.0", port=PORT, allowed_hosts=("photos.lan",))
    client = TestClient(create_app(searcher, named), base_url=f"http://x:{PORT}")
    assert client.get("/healthz", headers={"host": f"photos.lan:{PORT}"}).status_code == 200
    assert client.get("/healthz", headers={"host": f"PHOTOS.LAN:{PORT}"}).status_code == 200
    assert client.get("/healthz", headers={"host": f"0.0.0.0:{PORT}"}).status_code == 400
    loop = TestClient(
        create_app(searcher, ServeConfig(index, port=PORT, allowed_hosts=("pics",))), base_url=f"http://x:{PORT}"
    )
    assert loop.get("/healthz", headers={"host": f"pics:{PORT}"}).status_code == 200
    assert loop.get("/healthz", headers={"host": f"localhost:{PORT}"}).status_code == 200


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost:8000", ("localhost", 8000)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::1]", ("::1", None)),
        ("Example.COM", ("example.com", None)),
        ("::1", None),
        ("[::1", None),
        ("[::1]x", None),
        ("host:0", None),
        ("host:99999", None),
        ("host:8a", None),
        (":80", None),
    ],
)
def test_host_values_are_read_as_browsers_send_them(value, parsed):
    assert split_host(value) == parsed


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _probe(port: int) -> None:
    """Raw HTTP from outside the process: foreign and absent Hosts refused, the own one answered."""
    get = "GET /api/search?q=a+red+circle HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n"
    status, headers, body = _raw(port, get.format(f"evil.example:{port}").encode())
    assert status == 400 and "error" in json.loads(body) and headers["content-security-policy"]
    status, _, body = _raw(port, b"GET /api/items/0/image HTTP/1.0\r\n\r\n")  # HTTP/1.0: no Host at all
    assert status == 400 and "Host" in json.loads(body)["error"]
    status, _, _ = _raw(port, get.format(f"[::1]:{port}").encode())
    assert status == 200
    cross = "GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n"
    status, _, _ = _raw(port, cross.format(port).encode())
    assert status == 403
    status, headers, body = _raw(port, get.format(f"127.0.0.1:{port}").encode())
    assert status == 200 and json.loads(body)["results"] and headers["referrer-policy"] == "no-referrer"


def test_an_app_on_uvicorn_is_guarded_on_the_wire(index):
    with serving(create_app(Searcher(index), ServeConfig(index, port=0))) as base:
        _probe(int(base.rsplit(":", 1)[1]))


def test_a_real_clipdex_serve_process_probed_with_raw_sockets(index):
    with clipdex_serve(index) as (_, port):
        _probe(port)
