"""`search --rerank`: a head attached to an index (`finetune --method rerank --index`) re-scores a query's contrastive
top K, in the library, the CLI and the HTTP API, equal to scoring the same candidates by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LOCAL, run, search_json
from corpus import make_captioned_library
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.store.manifest import MODEL_DIR, read_manifest


@pytest.fixture(scope="module")
def reranked(tmp_path_factory, tiny_model):
    """An index of 30 photos and 20 captions, and a head trained on its caption file and attached to it."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("reranked")
    make_captioned_library(root, 30, 20, seed=91)
    index = root / "idx"
    cli = CliRunner()
    run(cli, "index", root / "photos", "--texts", root / "captions.csv", "--index", index, *tiny_model.cli_args())
    out = run(cli, "finetune", root / "captions.csv", "--method", "rerank", "--index", index, "--out", root / "head",
              "--epochs", "2", "--batch-size", "8", "--workers", "0", "--json")  # fmt: skip
    return root, index, json.loads(out)


def by_hand(index: Path, text: str, paths: list[str], cosines: list[float]) -> np.ndarray:
    """The attached head's scores for (text, image file) pairs: the files opened with PIL, the torch model's
    token features, the head's logit plus its weight times the cosine."""
    from clipdex.retrieval.model.encoder import load_model
    from clipdex.retrieval.model.weights import index_encoder_config
    from clipdex.retrieval.search.rerank import image_tokens, load_head, text_tokens

    config, spec = index_encoder_config(index, device="cpu")
    loaded = load_model(config, expect=spec)
    loaded.model.eval()
    head = load_head(index / MODEL_DIR / read_manifest(index).rerank, loaded.spec)
    pixels = torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in paths])
    tokens, mask = text_tokens(loaded.model, loaded.tokenizer([text]))
    n = len(paths)
    with torch.no_grad():
        logits = head(image_tokens(loaded.model, pixels), tokens.expand(n, -1, -1), mask.expand(n, -1))
    return logits.double().numpy() + head.contrastive_weight * np.asarray(cosines)


def test_finetune_index_attaches_the_head(reranked, cli):
    root, index, report = reranked
    manifest = read_manifest(index)
    kept = index / MODEL_DIR / manifest.rerank
    assert report["index"] == str(kept) and kept.read_bytes() == Path(report["head"]).read_bytes()
    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["rerank"] == {"head": kept.name, "k": 16}
    # a head is only for rerank, and only over the index's model
    from clipdex.cli.main import app

    refused = cli.invoke(app, ["finetune", str(root / "captions.csv"), "--method", "full", "--index", str(index),
                          "--out", str(root / "nope")])  # fmt: skip
    assert refused.exit_code == 2 and "--method rerank" in refused.stderr


def test_search_rerank_reorders_the_contrastive_top_k_by_the_heads_score(reranked, cli):
    """The re-ranked top K is a permutation of the contrastive top K, ordered by the head's score computed by hand;
    the hits after K are the contrastive ones, unchanged; CLI and library answer alike."""
    _, index, _ = reranked
    searcher = Searcher(index)
    for q, k_rerank, k in (("a red circle", 8, 12), ("a large blue square on a white background", 5, 5)):
        plain = searcher.search(Query.build(text=q), k=k)
        got = searcher.search(Query.build(text=q), k=k, rerank=k_rerank)
        top = plain[:k_rerank]
        assert sorted(h.id for h in got[:k_rerank]) == sorted(h.id for h in top)
        assert [h.id for h in got[k_rerank:]] == [h.id for h in plain[k_rerank:]]
        assert all(h.rerank is None for h in got[k_rerank:])
        want = by_hand(index, q, [h.path for h in top], [h.score for h in top])
        order = np.argsort(-want, kind="stable")
        assert [h.id for h in got[:k_rerank]] == [top[i].id for i in order]
        assert [h.rerank for h in got[:k_rerank]] == pytest.approx(list(want[order]), rel=1e-4, abs=1e-4)
        assert [h.rank for h in got] == list(range(1, len(got) + 1))
        answer = search_json(cli, index, q, "-k", k, "--rerank", k_rerank, "--no-server")
        assert [(h["id"], h.get("rerank")) for h in answer["results"]] == [
            (h.id, pytest.approx(h.rerank, rel=1e-6) if h.rerank is not None else None) for h in got
        ]
        assert all(h["score"] == pytest.approx(p.score) for h, p in zip(answer["results"], got, strict=True))


def test_search_rerank_takes_k_by_default_and_reads_an_image_query_against_texts(reranked, cli, tmp_path):
    _, index, _ = reranked
    answer = search_json(cli, index, "a green triangle", "-k", 20, "--rerank", "--no-server")
    assert sum("rerank" in h for h in answer["results"]) == 16  # the default K
    query = sorted((reranked[0] / "photos").iterdir())[0]
    texts = search_json(cli, index, "--image", query, "--target", "texts", "-k", 6, "--rerank", 4, "--no-server")
    plain = search_json(cli, index, "--image", query, "--target", "texts", "-k", 6, "--no-server")
    assert sorted(h["id"] for h in texts["results"][:4]) == sorted(h["id"] for h in plain["results"][:4])
    assert [h["id"] for h in texts["results"][4:]] == [h["id"] for h in plain["results"][4:]]
    assert all("rerank" in h for h in texts["results"][:4])


def test_search_rerank_refusals_are_one_line(reranked, cli, tmp_path):
    from clipdex.cli.main import app

    root, index, _ = reranked
    like = cli.invoke(app, ["search", "--like", "1", "--index", str(index), "--rerank", "--no-server"])
    assert like.exit_code == 2 and "--rerank re-scores image-text pairs" in like.stderr
    assert len(like.stderr.strip().splitlines()) == 1
    bare = tmp_path / "bare"
    run(cli, "index", root / "photos", "--index", bare, *reranked_model_args(index))
    none = cli.invoke(app, ["search", "a red circle", "--index", str(bare), "--rerank", "--no-server"])
    assert none.exit_code == 2 and "has no re-ranking head" in none.stderr and "--index" in none.stderr


def reranked_model_args(index: Path) -> list[str]:
    from clipdex.retrieval.model.weights import index_encoder_config

    config, _ = index_encoder_config(index)
    return ["--model", config.model, "--pretrained", str(config.pretrained)]


def test_the_http_api_reranks_as_the_library_does(reranked):
    from clipdex.retrieval.serve.app import ServeConfig, create_app

    _, index, _ = reranked
    searcher = Searcher(index)
    client = TestClient(create_app(searcher, ServeConfig(index)), base_url=LOCAL)
    got = client.get("/api/search", params={"q": "a red circle", "k": 10, "rerank": 6})
    assert got.status_code == 200, got.text
    want = searcher.search(Query.build(text="a red circle"), k=10, rerank=6)
    assert got.json()["results"] == [h.to_json() for h in want]
    assert client.get("/api/info").json()["rerank"]["k"] == 16
    too_many = client.get("/api/search", params={"q": "a red circle", "rerank": 100_000})
    assert too_many.status_code == 400 and "rerank must be between 1 and" in too_many.json()["error"]
    wrong = client.get("/api/search", params={"like": 1, "rerank": 4})
    assert wrong.status_code == 400 and "image-text pairs" in wrong.json()["error"]


def test_a_head_over_another_model_is_not_attached(reranked, tmp_path, tiny_model):
    """attach_head refuses a head whose encoder is not the index's, and leaves the manifest as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from clipdex.retrieval.errors import ModelError
    from clipdex.retrieval.store.heads import attach_head

    _, index, report = reranked
    with safe_open(report["head"], "pt") as f:
        meta = dict(f.metadata())
    meta["checkpoint_sha256"] = "0" * 64
    other = tmp_path / "other.safetensors"
    save_file(load_file(report["head"]), str(other), metadata=meta)
    before = (index / "manifest.json").read_bytes()
    with pytest.raises(ModelError, match="was trained over"):
        attach_head(index, other)
    assert (index / "manifest.json").read_bytes() == before


def test_reindex_to_another_model_detaches_the_head(reranked, cli, tmp_path, tiny_model):
    """A head reads the model it was trained over: after `reindex` to other weights the index has none, and
    `--rerank` says how to train one."""
    import shutil

    from clipdex.cli.main import app

    _, index, _ = reranked
    copy = tmp_path / "copy.idx"
    shutil.copytree(index, copy)
    weights = torch.load(tiny_model.weights, weights_only=True)
    weights["logit_scale"] = weights["logit_scale"] + 0.01
    other = tmp_path / "other.pt"
    torch.save(weights, other)
    run(cli, "reindex", "--index", copy, "--model", tiny_model.config, "--pretrained", other)
    assert read_manifest(copy).rerank is None
    refused = cli.invoke(app, ["search", "a red circle", "--index", str(copy), "--rerank", "--no-server"])
    assert refused.exit_code == 2 and "has no re-ranking head" in refused.stderr
