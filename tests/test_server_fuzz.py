"""Fuzz `clipdex serve` from its own OpenAPI schema (schemathesis): no input, valid or not, gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import run
from corpus import make_images
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from typer.testing import CliRunner

from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fuzzed")
    make_images(root / "photos", 6, seed=81)
    (root / "captions.txt").write_text("a red circle\na blue square on green\n")
    run(
        CliRunner(),
        "index",
        root / "photos",
        "--texts",
        root / "captions.txt",
        "--index",
        root / "idx",
        *tiny_model.cli_args(),
    )
    # schemathesis's ASGI client sends `Host: testserver`: allowed, as `--allowed-host testserver` would allow it
    config = ServeConfig(root / "idx", max_upload_bytes=100_000, allowed_hosts=("testserver",))
    app = create_app(Searcher(root / "idx"), config)
    return schemathesis.openapi.from_asgi("/api/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(api_schema, mode):
    """Every operation, with data that fits its schema and data that breaks it (hypothesis, bounded examples)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    fuzzed = 0
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )  # the same examples every run: the count of 200s below is not left to chance
        def check(case):
            response = case.call_and_validate(checks=[not_a_server_error])
            statuses.append(response.status_code)
            if response.status_code >= 400:
                assert isinstance(response.json()["error"], str), (case, response.text)

        try:
            check()
            fuzzed += 1
        except Unsatisfiable:  # nothing to break in an operation without parameters (/healthz, /api/info)
            assert mode is GenerationMode.NEGATIVE
    assert fuzzed >= (len(operations) if mode is GenerationMode.POSITIVE else 3)  # searches and similar break
    if mode is GenerationMode.POSITIVE:  # the fuzzer reached the routes (its requests were not all refused)
        assert statuses.count(200) >= len(operations)
