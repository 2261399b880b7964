"""One search request (`retrieval.search.request`): every interface that carries a search is derived from it or
checked against it here — the HTTP API's OpenAPI schema (GET, JSON, multipart), the query string and form fields a
client sends, the page's refinements, and the CLI's options."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import LOCAL
from hypothesis import given
from hypothesis import strategies as st

from clipdex.retrieval.config import Kind
from clipdex.retrieval.search.request import SearchRequest, Wire, params, wire_name

ROOT = Path(__file__).resolve().parent.parent
PARAM_NAMES = {wire_name(f) for f in params(Wire.PARAM)}
FILE_NAMES = {f.name for f in params(Wire.FILE)}

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(lambda t: t.strip() == t)
requests = st.builds(
    SearchRequest,
    q=st.none() | texts,
    like=st.none() | st.integers(0, 10**12),
    add=st.lists(texts, max_size=3).map(tuple),
    subtract=st.lists(texts, max_size=3).map(tuple),
    k=st.integers(1, 1000),
    target=st.sampled_from(list(Kind)),
    include_self=st.booleans(),
    dedup=st.none() | st.floats(-1, 1),
    in_folder=st.none() | texts,
    after=st.none() | st.just("2024-05-01"),
    before=st.none() | st.just("2025-01-31T18:30"),
    min_score=st.none() | st.floats(-1, 1),
)


@given(requests)
def test_a_request_sent_as_fields_is_parsed_back_the_same(asked):
    sent = asked.wire_fields()
    back = SearchRequest.from_fields(lambda name: [v for n, v in sent if n == name])
    assert back == asked


@given(requests)
def test_a_request_sent_as_json_is_parsed_back_the_same(asked):
    body = {}
    for f in params(Wire.PARAM):
        value = getattr(asked, f.name)
        body[wire_name(f)] = (
            list(value) if isinstance(value, tuple) else value.plural if isinstance(value, Kind) else value
        )
    assert SearchRequest.from_json(body) == asked


def test_the_openapi_schema_is_the_request(tmp_path):
    from fastapi.testclient import TestClient

    from clipdex.retrieval.serve.app import ServeConfig, create_app

    class _Stub:  # the schema needs no index
        pass

    schema = TestClient(create_app(_Stub(), ServeConfig(tmp_path)), base_url=LOCAL).get("/api/openapi.json").json()  # type: ignore[arg-type]
    search = schema["paths"]["/api/search"]
    assert {p["name"] for p in search["get"]["parameters"]} == PARAM_NAMES
    content = search["post"]["requestBody"]["content"]
    assert set(content["application/json"]["schema"]["properties"]) == PARAM_NAMES
    assert set(content["multipart/form-data"]["schema"]["properties"]) == PARAM_NAMES | FILE_NAMES


def test_the_page_sends_only_request_fields():
    html = (ROOT / "retrieval/serve/web/index.html").read_text()
    script = (ROOT / "retrieval/serve/web/app.js").read_text()
    refinements = re.findall(r'<(?:input|select) id="[^"]+" name="([^"]+)" data-refine', html)
    assert len(refinements) == html.count("data-refine") >= 5
    sent = (
        set(refinements)
        | set(re.findall(r'\[\s*"([a-z_]+)",', script))
        | set(re.findall(r'form\.append\("([a-z_]+)"', script))
    )
    assert sent <= PARAM_NAMES | FILE_NAMES, sent - PARAM_NAMES - FILE_NAMES
    assert {"q", "like", "k", "target", "image"} <= sent


def test_the_cli_takes_every_field():
    import typer.main

    from clipdex.cli.main import app

    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "search")  # type: ignore[attr-defined]
    options = {p.name for p in command.params}
    for f in params():
        assert ("query" if f.name == "q" else f.name) in options, f.name
