"""`clipdex duplicates`: exactly the connected components of the graph of pairs at or above the threshold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run
from corpus import make_images
from PIL import Image


def _components(paths: list[str], vectors: np.ndarray, threshold: float) -> set[frozenset[str]]:
    """Brute force: every pair's cosine, then components by repeated merging."""
    sims = vectors @ vectors.T
    groups = [{p} for p in paths]
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            if sims[i, j] >= threshold:
                a = next(g for g in groups if paths[i] in g)
                b = next(g for g in groups if paths[j] in g)
                if a is not b:
                    a |= b
                    groups.remove(b)
    return {frozenset(g) for g in groups if len(g) > 1}


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    made = [p for p, _ in make_images(photos, 24, seed=131)]
    shutil.copy(made[0], photos / "copy_a.png")
    shutil.copy(made[0], photos / "copy_b.png")
    Image.open(made[1]).resize((60, 60)).save(photos / "resized.png")
    Image.open(made[2]).save(photos / "as_jpeg.jpg", quality=70)
    run(CliRunner(), "index", photos, "--index", root / "idx", *tiny_model.cli_args())
    return root, sorted(str(p) for p in photos.iterdir())


@pytest.mark.parametrize("threshold", [0.999, 0.99, 0.95])
def test_groups_equal_brute_force_components(cli, library, reference, threshold):
    from pathlib import Path

    root, paths = library
    vectors = reference.images([Path(p) for p in paths])
    want = _components(paths, vectors, threshold)
    found = json.loads(run(cli, "duplicates", "--index", root / "idx", "--threshold", threshold, "--json"))
    assert found["threshold"] == threshold and found["method"] == "exact"
    assert {frozenset(m["path"] for m in g) for g in found["groups"]} == want
    sizes = [len(g) for g in found["groups"]]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    by_path = dict(zip(paths, vectors, strict=True))
    for group in found["groups"]:
        first = by_path[group[0]["path"]]
        np.testing.assert_allclose(
            [m["score"] for m in group], [float(by_path[m["path"]] @ first) for m in group], atol=2e-5
        )
        assert [m["bytes"] for m in group] == sorted((m["bytes"] for m in group), reverse=True)
    if threshold == 0.999:  # identical files always group together
        assert (
            frozenset(
                [
                    paths[paths.index(str(root / "photos" / "copy_a.png"))],
                    str(root / "photos" / "copy_b.png"),
                    min(p for p in paths if "_0000" in p),
                ]
            )
            in want
        )


def test_an_ivf_index_finds_only_true_pairs(cli, library, reference, tmp_path):
    from pathlib import Path

    root, paths = library
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    run(cli, "build", "--index", idx, "--index-type", "IVF2,Flat")
    found = json.loads(run(cli, "duplicates", "--index", idx, "--threshold", 0.99, "--json"))
    assert found["method"] == "ann"
    vectors = dict(zip(paths, reference.images([Path(p) for p in paths]), strict=True))
    want = _components(paths, np.stack(list(vectors.values())), 0.99)
    for group in found["groups"]:
        assert any(frozenset(m["path"] for m in group) <= w for w in want)  # never joins what brute force splits
    copies = {str(root / "photos" / "copy_a.png"), str(root / "photos" / "copy_b.png")}
    assert any(copies <= {m["path"] for m in g} for g in found["groups"])  # identical vectors share their list
    piped = run(cli, "duplicates", "--index", idx, "--threshold", 0.99).splitlines()
    assert len(piped) == sum(len(g) for g in found["groups"]) and all(len(line.split("\t")) == 4 for line in piped)
