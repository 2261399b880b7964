"""Zero-shot labels against brute force with open_clip; --eval accuracy against CLIP_benchmark itself."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run
from corpus import make_images

TEMPLATES = ["a photo of a {} thing.", "a {} shape.", "something {}."]


def _reference_classes(reference, labels, templates):
    rows = []
    for label in labels:
        t = reference.texts([x.replace("{}", label) for x in templates]).astype(np.float64)
        m = t.mean(axis=0)
        rows.append(m / np.linalg.norm(m))
    return np.array(rows)


def test_labels_equal_brute_force(cli, tmp_path, tiny_model, reference):
    made = [p for p, _ in make_images(tmp_path / "photos", 16, seed=151)]
    run(cli, "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    labels = ["red", "blue", "green", "black", "white"]
    got = json.loads(
        run(
            cli,
            "classify",
            "--index",
            tmp_path / "idx",
            "--labels",
            ",".join(labels),
            "--templates",
            tmp_path / "t.txt",
            "--json",
        )
    )
    assert got["labels"] == labels and len(got["items"]) == 16
    classes = _reference_classes(reference, labels, TEMPLATES)
    scores = reference.images(sorted(made)) @ classes.T
    by_path = {item["path"]: item for item in got["items"]}
    for path, row in zip(sorted(made), scores, strict=True):
        item = by_path[str(path)]
        assert item["label"] == labels[int(np.argmax(row))]
        assert item["score"] == pytest.approx(float(row.max()), abs=2e-5)
    # the default templates and a labels file
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    default = json.loads(
        run(cli, "classify", "--index", tmp_path / "idx", "--labels-file", tmp_path / "labels.txt", "--json")
    )
    from clipdex.retrieval.search.classify import DEFAULT_TEMPLATES

    classes = _reference_classes(reference, ["circle", "square", "triangle", "cross"], list(DEFAULT_TEMPLATES))
    want = {
        str(p): ["circle", "square", "triangle", "cross"][int(np.argmax(v @ classes.T))]
        for p, v in zip(sorted(made), reference.images(sorted(made)), strict=True)
    }
    assert {i["path"]: i["label"] for i in default["items"]} == want


@pytest.mark.parametrize("n_classes", [4, 8])
def test_eval_equals_clip_benchmark(cli, tmp_path, tiny_model, reference, n_classes, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification
    from torchvision.datasets import ImageFolder

    made = make_images(tmp_path / "flat", 80, seed=152)
    key = (lambda s: s.colour) if n_classes == 8 else (lambda s: s.shape)
    for path, scene in made:
        (tmp_path / "data" / key(scene)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "data" / key(scene) / path.name)
    run(cli, "index", tmp_path / "flat", "--index", tmp_path / "idx", *tiny_model.cli_args())
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    ours = json.loads(
        run(
            cli,
            "classify",
            "--index",
            tmp_path / "idx",
            "--eval",
            tmp_path / "data",
            "--templates",
            tmp_path / "t.txt",
            "--json",
        )
    )

    def accuracy(output, target, topk=(1,)):  # CLIP_benchmark 1.6.2's, but for float() of a 1-element array,
        pred = output.topk(max(topk), 1, True, True)[1].t()  # which NumPy 2 refuses ("only 0-dimensional arrays")
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)
    dataset = ImageFolder(str(tmp_path / "data"), transform=reference.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    theirs = zeroshot_classification.evaluate(
        reference.model,
        loader,
        reference.tokenizer,
        dataset.classes,
        [t.replace("{}", "{c}") for t in TEMPLATES],
        "cpu",
        amp=False,
    )
    assert ours["classes"] == dataset.classes and ours["images"] == 80
    assert ours["acc1"] == pytest.approx(theirs["acc1"], abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-9)
    if n_classes >= 5:
        assert ours["acc5"] == pytest.approx(theirs["acc5"], abs=1e-9)
    else:
        assert math.isnan(ours["acc5"]) and math.isnan(theirs["acc5"])


def test_bad_labels_and_templates_are_one_line(cli, tmp_path, tiny_model):
    from clipdex.cli.main import app

    make_images(tmp_path / "photos", 2, seed=153)
    run(cli, "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    for args, needle in [
        ([], "--labels"),
        (["--labels", "cat"], "at least two"),
        (["--labels", "cat,cat"], "named twice"),
        (["--labels", "cat,dog", "--templates", str(tmp_path / "bad.txt")], "{}"),
        (["--eval", str(tmp_path / "photos")], "two subfolders"),
    ]:
        r = cli.invoke(app, ["classify", "--index", str(tmp_path / "idx"), *args])
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_stored_labels_filter_searches(cli, tmp_path, tiny_model, reference):
    made = sorted(p for p, _ in make_images(tmp_path / "photos", 16, seed=154))
    run(cli, "index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny_model.cli_args())
    labels = json.loads(
        run(cli, "classify", "--index", tmp_path / "idx", "--labels", "circle,square,triangle,cross", "--json")
    )
    circles = sorted(i["path"] for i in labels["items"] if i["label"] == "circle")
    assert circles, labels
    got = json.loads(
        run(
            cli, "search", "a red shape", "--index", tmp_path / "idx", "--where", "label = 'circle'", "--json", "-k", 50
        )
    )
    assert sorted(r["path"] for r in got["results"]) == circles and got["filter"]["matched"] == len(circles)
    scores = reference.images([p for p in made if str(p) in circles]) @ reference.texts(["a red shape"])[0]
    np.testing.assert_allclose(
        sorted((r["score"] for r in got["results"]), reverse=True), sorted(scores, reverse=True), atol=2e-5
    )
    best = max(i["score"] for i in labels["items"] if i["label"] == "circle")
    top = json.loads(
        run(cli, "search", "a shape", "--index", tmp_path / "idx", "--where", f"label_score >= {best - 1e-6}", "--json")
    )
    assert {r["path"] for r in top["results"]} == {i["path"] for i in labels["items"] if i["score"] >= best - 1e-6}
    # a second labelling replaces the first
    run(cli, "classify", "--index", tmp_path / "idx", "--labels", "red,blue")
    again = json.loads(
        run(cli, "search", "a shape", "--index", tmp_path / "idx", "--where", "label = 'circle'", "--json")
    )
    assert again["results"] == []
