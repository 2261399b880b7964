"""`clipdex eval` against CLIP_benchmark's own zeroshot_retrieval on the same model and images."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
from clip_benchmark.metrics import zeroshot_retrieval
from corpus import make_coco_fixture, make_flickr_fixture, make_karpathy_fixture

from clipdex.cli.main import app


def clip_benchmark_recalls(tiny_model, name: str, root) -> dict[str, float]:
    open_clip.add_model_config(tiny_model.config)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model.name, pretrained=str(tiny_model.weights))
    model.eval()
    ds = build_dataset(
        name, root=str(root), transform=preprocess, split="test", download=False, task="zeroshot_retrieval"
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=get_dataset_collate_fn(name))
    tokenizer = open_clip.get_tokenizer(tiny_model.name)
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])


def clipdex_eval(cli, tiny_model, dataset: str, root, *extra: str) -> dict:
    result = cli.invoke(
        app,
        [
            "eval",
            dataset,
            "--root",
            str(root),
            *tiny_model.cli_args(),
            "--json",
            "--workers",
            "0",
            "--batch-size",
            "16",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("dataset", "peer_name", "make"),
    [
        ("flickr30k", "flickr30k", make_flickr_fixture),
        ("coco", "mscoco_captions", make_coco_fixture),
    ],
)
def test_equals_clip_benchmark(cli, tmp_path, tiny_model, dataset, peer_name, make):
    root = make(tmp_path / dataset, 120, seed=5)
    ours = clipdex_eval(cli, tiny_model, dataset, root)
    peer = clip_benchmark_recalls(tiny_model, peer_name, root)
    assert ours["images"] == 120 and ours["texts"] == 120 * 5 + len(range(3, 120, 7))
    assert ours["dataset"] == dataset and ours["split"] == "test" and ours["model"] == "tiny-clip"
    for k in (1, 5, 10):
        assert ours["text_to_image"][f"R@{k}"] == pytest.approx(peer[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours["image_to_text"][f"R@{k}"] == pytest.approx(peer[f"text_retrieval_recall@{k}"], abs=1e-6)
    # a model that has learnt something but is far from perfect makes the comparison meaningful
    assert 0.05 < ours["text_to_image"]["R@1"] < 0.9 and 0.2 < ours["image_to_text"]["R@5"] < 0.95
    assert ours["images_per_s"] > 0 and ours["texts_per_s"] > 0


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_karpathy_json_layout(cli, tmp_path, tiny_model, dataset):
    root = make_karpathy_fixture(tmp_path / dataset, dataset, 50, seed=9)
    ours = clipdex_eval(cli, tiny_model, dataset, root)
    assert ours["images"] == 20  # indices 1 and 4 of every 5 are in the test split
    assert ours["texts"] == sum(6 if i % 7 == 3 else 5 for i in range(50) if i % 5 in (1, 4))
    quick = clipdex_eval(cli, tiny_model, dataset, root, "--limit", "7")
    assert quick["images"] == 7
