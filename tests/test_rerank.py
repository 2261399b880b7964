"""The cross-attention re-ranker's parts: frozen token features, the head, mined hard negatives, the ITM loss."""

from __future__ import annotations

import random
from pathlib import Path

import open_clip
import pytest
import torch
from corpus import draw, random_scene
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdex.retrieval.finetune.rerank import itm_loss, mine_negatives
from clipdex.retrieval.search.rerank import HeadConfig, RerankHead, token_features


@pytest.fixture(scope="module")
def tiny(tiny_model):
    open_clip.add_model_config(tiny_model.config)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model.config.stem)
    model.load_state_dict(torch.load(tiny_model.weights, weights_only=True))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(tiny_model.config.stem)


def batch(tiny, n: int, seed: int):
    _, preprocess, tokenizer = tiny
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = torch.stack([preprocess(draw(s, noise_seed=seed * 1000 + i)) for i, s in enumerate(scenes)])
    ids = tokenizer([s.captions(rng, 1)[0] for s in scenes])
    return images, ids


def head_for(model) -> RerankHead:
    return RerankHead(HeadConfig(vision_width=model.visual.transformer.width, text_width=model.transformer.width,
                                 width=32, layers=2, heads=2))  # fmt: skip


def test_token_features_shapes_and_mask(tiny):
    model, _, _ = tiny
    images, ids = batch(tiny, 4, seed=1)
    f = token_features(model, images, ids)
    grid = (32 // 8) ** 2  # the tiny config: 32 px, 8 px patches
    assert f.image.shape == (4, grid, 64)
    assert f.text.shape == (4, 77, 64)
    # real tokens: start, the words, end; nothing after the end-of-text token
    assert f.text_mask.sum(dim=1).tolist() == [int((row != 0).sum()) for row in ids]
    assert not f.image.requires_grad and not f.text.requires_grad
    # the text tokens are ln_final's output of the one encode_text pass (here by hand), the embedding encode_text's
    from clipdex.retrieval.search.rerank import text_features

    pooled, tokens, _ = text_features(model, ids)
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        torch.testing.assert_close(pooled, model.encode_text(ids), rtol=0, atol=0)
    torch.testing.assert_close(tokens, x, rtol=1e-6, atol=1e-6)


def test_image_features_are_the_last_blocks_input_and_the_embedding(tiny):
    """image_features: the embedding equals encode_image's; the tokens are what enters the last block (computed
    here by running the blocks by hand), without the class token."""
    from clipdex.retrieval.search.rerank import image_features

    model, _, _ = tiny
    images, _ = batch(tiny, 3, seed=5)
    pooled, tokens = image_features(model, images)
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.encode_image(images), rtol=0, atol=0)
        visual = model.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    torch.testing.assert_close(tokens, x[:, 1:], rtol=1e-5, atol=1e-5)


def test_padding_changes_no_score(tiny):
    """The head reads the text up to its longest real token: the logits equal a run over the full context with the
    padding masked, and a text scores the same whatever the batch it shares (and so its longest text) is."""
    model, _, tokenizer = tiny
    torch.manual_seed(0)
    head = head_for(model).eval()
    images, _ = batch(tiny, 3, seed=4)
    ids = tokenizer(["a red circle", "a small blue square on a green background, drawn", "a cross"])
    f = token_features(model, images, ids)
    with torch.no_grad():
        together = head(f.image, f.text, f.text_mask)
        alone = torch.cat([head(f.image[i : i + 1], f.text[i : i + 1], f.text_mask[i : i + 1]) for i in range(3)])
        w = head.config.width
        x = torch.cat([head.match_token.expand(3, -1, -1), head.text_in(f.text)], dim=1)
        real = torch.cat([torch.ones_like(f.text_mask[:, :1]), f.text_mask], dim=1)
        image = head.project_image(f.image)
        for block in head.blocks:
            x = block(x, ~real, image)
        full = head.out(head.norm_out(x[:, 0])).squeeze(-1)
    assert x.shape[-1] == w
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, full, atol=1e-5, rtol=1e-5)


def test_the_head_trains_and_the_encoders_stay_frozen_bit_for_bit(tiny):
    """A few ITM steps change the head (its loss falls on the batch it sees) and leave every tower weight exactly as
    it was, with no gradient reaching it."""
    import numpy as np

    from clipdex.retrieval.search.rerank import Features

    model, _, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    head = head_for(model)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    images, ids = batch(tiny, 24, seed=2)
    f = token_features(model, images, ids)
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)
    train = Features(f.image.half(), image_emb, f.text.half(), f.text_mask, text_emb, np.arange(24))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = itm_loss(head, train, torch.arange(8), 10.0, n=3, generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in head.state_dict().items())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=24).filter(lambda ids: len(set(ids)) > 1), st.integers(0, 99))
def test_mined_negatives_never_include_a_positive(owner, seed):
    """Whatever the similarities (a caption of the same image scoring highest included), the captions mined for an
    image belong to other images, each at most once."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor(owner)
    images = owner.unique()
    matches = owner[None, :] == images[:, None]  # [images, texts]: an image's own captions
    n = int((~matches).sum(dim=1).min())
    sim = torch.randn(len(images), len(owner), generator=g) * 5
    sim[matches] = 100.0  # its own captions the most similar: still never drawn
    drawn = mine_negatives(sim, matches, n, g)
    assert drawn.shape == (len(images), n)
    assert (owner[drawn] != images[:, None]).all()
    assert all(len(set(row.tolist())) == n for row in drawn)


def test_mined_negatives_follow_the_contrastive_similarity():
    """Drawn in proportion to softmax(similarity): the hardest negative is drawn about as often as it should be."""
    sim = torch.tensor([[9.0, 2.0, 1.0, 0.0]])  # candidate 0 matches; 1 is the hardest negative
    matches = torch.tensor([[True, False, False, False]])
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([mine_negatives(sim, matches, 1, g)[0, 0] for _ in range(4000)])
    share = (drawn == 1).float().mean().item()
    expect = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)[0].item()
    assert abs(share - expect) < 0.03, (share, expect)
    assert (drawn != 0).all()


def test_too_few_other_candidates_is_an_error():
    with pytest.raises(ValueError, match="non-matching"):
        mine_negatives(torch.zeros(2, 3), torch.tensor([[True, False, True], [False, False, False]]), 2)


def test_head_size_for_vit_b_32():
    """Under 5 M parameters over ViT-B-32's towers (768-wide image tokens, 512-wide text tokens)."""
    head = RerankHead(HeadConfig(vision_width=768, text_width=512))
    assert sum(p.numel() for p in head.parameters()) < 5_000_000


def test_finetune_rerank_trains_a_head_over_the_frozen_model(cli, tmp_path, tiny_model):
    """`finetune --method rerank`: a content-addressed head naming its encoder, validation recall before
    (contrastive) and after (re-ranked) equal to a recomputation from the saved head, the encoder's checkpoint
    untouched; options that do not apply are refused in one line."""
    import hashlib
    import json

    from corpus import make_domain_pairs
    from safetensors import safe_open

    from clipdex.cli.main import app
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.evaluation.datasets import Skipped, read_pairs
    from clipdex.retrieval.finetune.pairs import split_by_image
    from clipdex.retrieval.model.encoder import load_model
    from clipdex.retrieval.search.rerank import dataset_features, reranked_recall

    pairs = make_domain_pairs(tmp_path / "pairs", 60, seed=3)
    weights_before = hashlib.sha256(tiny_model.weights.read_bytes()).hexdigest()
    args = ["finetune", str(pairs), "--method", "rerank", *tiny_model.cli_args(), "--out", str(tmp_path / "out"),
            "--epochs", "3", "--batch-size", "16", "--workers", "0", "--json"]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    head = Path(report["head"])
    assert head.name == f"rerank-{hashlib.sha256(head.read_bytes()).hexdigest()[:16]}.safetensors"
    with safe_open(str(head), "pt") as f:
        meta = f.metadata()
    assert meta["checkpoint_sha256"] == weights_before and meta["model"] == "tiny-clip"
    assert hashlib.sha256(tiny_model.weights.read_bytes()).hexdigest() == weights_before
    assert set(report["before"]) == set(report["after"]) == {"text_to_image", "image_to_text"}
    assert report["epochs"] == 3 and report["rerank_k"] == 16
    assert Path(report["plot"]).is_file() and Path(report["report"]).is_file()

    # the reported "after" is what the saved head gives on the same validation split
    loaded = load_model(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)))
    loaded.model.eval()
    _, val = split_by_image(read_pairs(pairs, text_column=None, image_column=None, skipped=Skipped()), 0.1, 0)
    features = dataset_features(loaded, val, batch_size=16, workers=0, options=loaded.encoder().decode_options())
    saved = RerankHead(HeadConfig(**json.loads(meta["config"])))
    from safetensors.torch import load_file

    saved.load_state_dict(load_file(str(head)))
    saved.contrastive_weight = float(meta["contrastive_weight"])  # chosen on the validation split, among a few
    scale = float(loaded.model.logit_scale.detach().exp())
    assert any(saved.contrastive_weight == pytest.approx(w * scale) for w in (0, 0.5, 1, 2, 4))
    assert report["contrastive_weight"] == saved.contrastive_weight
    assert reranked_recall(None, features, 16) == report["before"]
    assert reranked_recall(saved, features, 16) == report["after"]

    refused = cli.invoke(app, [*args[:-1], "--wise", "0.5", "--overwrite"])
    assert refused.exit_code == 2 and "--wise do not apply" in refused.stderr


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory, tiny_model):
    """A head trained briefly on the unseen domain's pairs, and held-out test pairs."""
    import json

    from corpus import make_domain_pairs
    from typer.testing import CliRunner

    from clipdex.cli.main import app

    root = tmp_path_factory.mktemp("rerank")
    pairs = make_domain_pairs(root, 60, seed=3)
    test = make_domain_pairs(root, 24, seed=4, name="test.csv")
    result = CliRunner().invoke(app, ["finetune", str(pairs), "--method", "rerank", *tiny_model.cli_args(),
                                      "--out", str(root / "out"), "--epochs", "2", "--batch-size", "16",
                                      "--workers", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return Path(json.loads(result.stdout)["head"]), test


def test_eval_rerank_equals_brute_force(cli, tiny_model, trained_head):
    """`eval --rerank HEAD --rerank-k K`: the contrastive recall as before, and "reranked" equal to a loop that
    scores every (caption, image) pair with the head and orders each query's contrastive top-K by it."""
    import json

    import numpy as np

    from clipdex.cli.main import app
    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.evaluation.datasets import Skipped, read_pairs
    from clipdex.retrieval.model.encoder import load_model
    from clipdex.retrieval.search.rerank import dataset_features, load_head

    head_path, test = trained_head
    k_rerank = 5
    base = ["eval", str(test), *tiny_model.cli_args(), "--workers", "0", "--json"]
    plain = json.loads(cli.invoke(app, base).stdout)
    result = cli.invoke(app, [*base, "--rerank", str(head_path), "--rerank-k", str(k_rerank)])
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    assert {k: got[k] for k in ("text_to_image", "image_to_text")} == {
        k: plain[k] for k in ("text_to_image", "image_to_text")
    }
    assert got["reranked"]["k"] == k_rerank

    loaded = load_model(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights)))
    loaded.model.eval()
    ds = read_pairs(test, text_column=None, image_column=None, skipped=Skipped())
    f = dataset_features(loaded, ds, batch_size=16, workers=0, options=loaded.encoder().decode_options())
    head = load_head(head_path, loaded.spec)
    n_images, n_texts = len(ds.images), len(f.owner)
    with torch.no_grad():  # the head's score for every (image, text) pair
        itm = np.array([[float(head(f.image_tokens[i : i + 1].float(), f.text_tokens[t : t + 1].float(),
                                    f.text_mask[t : t + 1])) for t in range(n_texts)] for i in range(n_images)])  # fmt: skip
    contrastive = (f.text_emb @ f.image_emb.T).numpy()  # [texts, images]
    itm = itm + head.contrastive_weight * contrastive.T  # the head's score: its logit and its share of the cosine
    for direction, scores, new in (("text_to_image", contrastive, itm.T), ("image_to_text", contrastive.T, itm)):
        for k in (1, 5, 10):
            hits = 0
            for q in range(scores.shape[0]):
                order = np.argsort(-scores[q], kind="stable")
                top = order[:k_rerank]
                ranked = [*top[np.argsort(-new[q, top], kind="stable")], *order[k_rerank:]][:k]
                hits += f.owner[q] in ranked if direction == "text_to_image" else any(f.owner[t] == q for t in ranked)
            assert got["reranked"][direction][f"R@{k}"] == pytest.approx(hits / scores.shape[0], abs=1e-9)


def test_a_head_is_refused_for_another_encoder(cli, tmp_path, tiny_model, trained_head):
    """Weights that differ in one value are another encoder: the head is refused in one line, naming both."""
    from clipdex.cli.main import app

    head_path, test = trained_head
    weights = torch.load(tiny_model.weights, weights_only=True)
    weights["logit_scale"] = weights["logit_scale"] + 0.01
    other = tmp_path / "other.pt"
    torch.save(weights, other)
    result = cli.invoke(app, ["eval", str(test), "--model", str(tiny_model.config), "--pretrained", str(other),
                              "--rerank", str(head_path), "--workers", "0"])  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert "was trained over tiny-clip" in result.stderr and "not this model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = cli.invoke(app, ["eval", str(test), *tiny_model.cli_args(), "--rerank", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "re-ranking head not found" in missing.stderr
