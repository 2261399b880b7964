"""Phone formats (HEIC/HEIF, AVIF) in indexing, queries and thumbnails; what the walk skips and excludes."""

from __future__ import annotations

import json

import numpy as np
from conftest import LOCAL, run, search_json
from corpus import make_images
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.serve.app import ServeConfig, create_app


def test_heic_and_avif_are_indexed_searched_and_thumbnailed(cli, tmp_path, tiny_model, reference):
    import pillow_heif

    pillow_heif.register_heif_opener()
    photos = tmp_path / "photos"
    made = make_images(tmp_path / "src", 3, seed=121)
    photos.mkdir()
    converted = []
    for (src, _), (name, fmt) in zip(made, [("a.heic", "HEIF"), ("b.HEIC", "HEIF"), ("c.avif", "AVIF")], strict=True):
        Image.open(src).save(photos / name, fmt, quality=95)
        converted.append(photos / name)
    summary = json.loads(run(cli, "index", photos, "--index", tmp_path / "idx", "--json", *tiny_model.cli_args()))
    assert (summary["added"], summary["failed"]) == (3, 0), summary
    # what clipdex stored equals open_clip on the same decoded pixels
    searcher = Searcher(tmp_path / "idx")
    want = reference.images(converted)
    for path, vector in zip(converted, want, strict=True):
        hit = search_json(cli, tmp_path / "idx", "--image", path, "--include-self", "-k", 1)["results"][0]
        assert hit["path"] == str(path) and hit["score"] > 0.9999
        got = searcher.search_vectors(vector[None, :].astype(np.float32), k=1)[0][0]
        assert got.path == str(path) and abs(got.score - 1.0) < 1e-4
    client = TestClient(create_app(searcher, ServeConfig(tmp_path / "idx")), base_url=LOCAL)
    for path in converted:
        hit = searcher.search_image(path, k=1)[0]
        r = client.get(f"/api/items/{hit.id}/thumbnail")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8", path
        full = client.get(f"/api/items/{hit.id}/image")
        assert full.status_code == 200 and full.headers["content-type"] in ("image/heif", "image/avif"), full.headers


def test_hidden_system_excluded_and_ignored_files_are_not_indexed(cli, tmp_path, tiny_model):
    root = tmp_path / "library"
    keep = [p for p, _ in make_images(root / "2024", 2, seed=122)] + [p for p, _ in make_images(root, 1, seed=123)]
    skip = []
    for folder in (".git/objects", ".thumbnails", "@eaDir", "#recycle", "raw", "2024/drafts"):
        skip += [p for p, _ in make_images(root / folder, 1, seed=124)]
    skip += [p for p, _ in make_images(root / "2024", 1, seed=125, start=50)]
    hidden = root / "2024" / "._apple_double.png"
    hidden.write_bytes(keep[0].read_bytes())
    skip.append(hidden)
    tmp = root / "2024" / "photo.tmp.png"
    tmp.write_bytes(keep[0].read_bytes())
    skip.append(tmp)
    (root / "2024" / ".clipdexignore").write_text(f"# scratch\n*.tmp.png\ndrafts/\n{skip[-3].name}\n")
    run(cli, "index", root, "--index", tmp_path / "idx", "--exclude", "raw", *tiny_model.cli_args())
    indexed = {r["path"] for r in search_json(cli, tmp_path / "idx", "a shape", "-k", 100)["results"]}
    assert indexed == {str(p) for p in keep}
    # the same rules on a re-run: a newly excluded folder's items leave the index
    run(cli, "index", root, "--index", tmp_path / "idx", "--exclude", "raw", "--exclude", "2024/*.png")
    indexed = {r["path"] for r in search_json(cli, tmp_path / "idx", "a shape", "-k", 100)["results"]}
    assert indexed == {str(keep[2])}
    # a hidden folder given by name is indexed
    run(cli, "index", root / ".thumbnails", "--index", tmp_path / "idx2", *tiny_model.cli_args())
    assert len(search_json(cli, tmp_path / "idx2", "a shape")["results"]) == 1
