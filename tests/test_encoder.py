"""Model loading from config JSON and checkpoints; text trimming is exact; duplicates encode once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.model.encoder import EncoderConfig, _encode_text_trimmed, load_encoder

CAPTIONS = [
    "a dog",
    "a small red circle on a blue background",
    "two cats, one black and one white, sleeping on a very long green sofa next to an open window at sunset",
    "x",
    "a dog",
]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights), device="cpu"))


def test_trimmed_text_equals_full_context(encoder):
    assert encoder.trim_text
    tokens = encoder.tokenizer(CAPTIONS)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
        cut = torch.nn.functional.normalize(_encode_text_trimmed(encoder.model, tokens), dim=-1)
    cosine = (full * cut).sum(-1)
    assert cosine.min().item() >= 0.9999
    single = encoder.encode_texts(["x"])  # a one-token caption trims to three positions
    assert float(single[0] @ full[3].numpy()) >= 0.9999


def test_encode_texts_dedupes_and_keeps_order(encoder):
    out = encoder.encode_texts(CAPTIONS, batch_size=2)
    assert out.shape == (5, encoder.dim)
    assert np.array_equal(out[0], out[4])  # identical captions: bit-identical vectors
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([encoder.encode_texts([c])[0] for c in CAPTIONS])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, encoder.dim)


def test_checkpoint_formats_load_the_same_weights(tmp_path, tiny_model, encoder):
    state = torch.load(tiny_model.weights, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "train.pt")
    want = encoder.encode_texts(CAPTIONS[:2])
    for path in (tmp_path / "w.safetensors", tmp_path / "train.pt"):
        other = load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(path)))
        np.testing.assert_allclose(other.encode_texts(CAPTIONS[:2]), want, atol=1e-6)
        assert other.spec.checkpoint_sha256 and other.spec.pretrained == str(path.resolve())


def test_pickled_objects_are_refused(tmp_path, tiny_model):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="holds Python objects"):
        load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(tmp_path / "evil.pt")))


def test_changed_checkpoint_is_refused(tmp_path, tiny_model, encoder):
    import shutil

    copy = tmp_path / "w.pt"
    shutil.copy(tiny_model.weights, copy)
    spec = load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(copy))).spec
    state = torch.load(copy, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, copy)
    with pytest.raises(ModelError, match="is not the one the index was built with"):
        load_encoder(EncoderConfig(model=str(tiny_model.config), pretrained=str(copy)), expect=spec)


def test_bad_config_json(tmp_path):
    (tmp_path / "x.json").write_text('{"embed_dim": 8}')
    with pytest.raises(ModelError, match="missing vision_cfg, text_cfg"):
        load_encoder(EncoderConfig(model=str(tmp_path / "x.json"), pretrained=None))


def test_skipping_random_init_before_a_checkpoint_load_changes_no_tensor(tiny_model):
    """The model built without random fills, then loaded from the checkpoint, equals open_clip's own load."""
    import open_clip
    import torch

    from clipdex.retrieval.config import EncoderConfig
    from clipdex.retrieval.model.encoder import load_model

    loaded = load_model(EncoderConfig(model=str(tiny_model.config), pretrained=str(tiny_model.weights), device="cpu"))
    open_clip.add_model_config(tiny_model.config)
    reference = open_clip.create_model(tiny_model.name, pretrained=str(tiny_model.weights))
    got, want = loaded.model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.nn.init.normal_.__module__ == "torch.nn.init"  # put back after the load


def test_a_checkpoints_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """A checkpoint is hashed once; the cache remembers it per file while inode, size, mtime and ctime hold. Content
    rewritten in place, even at the same size with its old mtime put back, is hashed again."""
    import hashlib
    import os
    import time

    from clipdex.retrieval.model import weights

    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_RACY_NS", 0)  # the file was written just now: remember it all the same
    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 1000)
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    first = weights.checkpoint_sha(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(calls) == 1
    assert weights.checkpoint_sha(path) == first and len(calls) == 1  # remembered
    st = path.stat()
    time.sleep(0.05)  # past the clock's tick, so that the rewrite's ctime differs
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    assert weights.checkpoint_sha(path) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2
