"""Broken and odd files: each is indexed correctly or recorded as failed with a reason; none stops the run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyModel, counts
from corpus import draw, make_images, random_scene
from PIL import Image

from clipdex.cli.main import app
from clipdex.retrieval.errors import ImageDecodeError
from clipdex.retrieval.imaging.decode import decode_image


def scene_image(seed: int) -> Image.Image:
    import random

    return draw(random_scene(random.Random(seed)), size=(80, 60), noise_seed=seed)


def build_zoo(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good files (should be indexed) and bad ones (should fail, with the expected reason)."""
    good: list[Path] = []
    bad: dict[Path, str] = {}
    root.mkdir(parents=True)

    def save(name: str, img: Image.Image, **kw) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        good.append(path)

    save("rgb.jpg", scene_image(1), quality=90)
    save("cmyk.jpg", scene_image(2).convert("CMYK"))
    save("palette.png", scene_image(3).convert("P"))
    transparent = scene_image(4).convert("P")
    transparent.info["transparency"] = 0
    save("palette_transparent.gif", transparent)
    rgba = scene_image(5).convert("RGBA")
    rgba.putalpha(128)
    save("alpha.png", rgba)
    save("gray.png", scene_image(6).convert("L"))
    gradient = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    save("gray16.png", Image.fromarray(gradient))
    save("bilevel.bmp", scene_image(7).convert("1"))
    save("scan.tif", scene_image(8))
    save("photo.webp", scene_image(9))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    save("rotated.jpg", scene_image(10), exif=exif.tobytes(), quality=95)
    frames = [scene_image(11), scene_image(12)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good.append(root / "animated.gif")
    save("wide.png", Image.new("RGB", (40_000, 1), (200, 10, 10)))
    save("tall.png", Image.new("RGB", (1, 3_000), (10, 200, 10)))
    save("one_pixel.png", Image.new("RGB", (1, 1), (10, 10, 200)))
    save("ünïcode dir/a photo with spaces.JPG", scene_image(13))
    save("UPPER.PNG", scene_image(14))
    os.symlink(root / "rgb.jpg", root / "link_to_rgb.jpg")  # the same file as rgb.jpg: one item
    os.symlink(root, root / "ünïcode dir" / "loop")  # a folder link back up: its real folder is walked once

    def broken(name: str, data: bytes, reason: str) -> None:
        (root / name).write_bytes(data)
        bad[root / name] = reason

    buf = io.BytesIO()
    scene_image(20).save(buf, "JPEG", quality=90)
    broken("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 2], "not a readable image")
    broken("empty.jpg", b"", "empty file")
    broken("text.png", b"this is not an image at all\n" * 20, "not a readable image")
    broken("random.jpeg", np.random.default_rng(0).bytes(5000), "not a readable image")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpixel, a few hundred KB on disk
    broken("bomb.png", bomb.getvalue(), "over the limit")
    return good, bad


def test_zoo_of_odd_files(cli, tmp_path, tiny_model: TinyModel):
    good, bad = build_zoo(tmp_path / "zoo")
    index = tmp_path / "idx"
    result = cli.invoke(
        app, ["index", str(tmp_path / "zoo"), "--index", str(index), *tiny_model.cli_args(), "--json", "--workers", "1"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert counts(summary) == {"added": len(good), "updated": 0, "removed": 0, "unchanged": 0, "failed": len(bad)}

    failed = json.loads(cli.invoke(app, ["info", "--index", str(index), "--failed", "--json"]).stdout)["failures"]
    assert {f["path"]: f["error"] for f in failed}.keys() == {str(p) for p in bad}
    for item in failed:
        assert bad[Path(item["path"])] in item["error"], item

    # every good file is findable: queried with itself, it comes first
    paths = {
        h["path"]
        for h in json.loads(cli.invoke(app, ["search", "x", "--index", str(index), "-k", "100", "--json"]).stdout)[
            "results"
        ]
    }
    assert paths == {str(p) for p in good}  # each file once, under its canonical path: no link, no loop copy
    for path in good:
        hits = json.loads(
            cli.invoke(
                app, ["search", "--image", str(path), "--index", str(index), "-k", "3", "--json", "--include-self"]
            ).stdout
        )["results"]
        assert str(path) in {h["path"] for h in hits[:2]}, path  # duplicates of rgb.jpg may tie with it
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    strict = cli.invoke(app, ["index", str(tmp_path / "zoo"), "--index", str(index), "--strict", "--json"])
    assert strict.exit_code == 1 and json.loads(strict.stdout)["failed"] == len(bad)


def test_decode_conversions():
    gradient = Image.fromarray(np.linspace(0, 65535, 256 * 4).reshape(4, 256).astype(np.uint16))
    buf = io.BytesIO()
    gradient.save(buf, "PNG")
    rgb = np.asarray(decode_image(buf.getvalue()).image)
    assert rgb.shape == (4, 256, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb.mean() < 155  # scaled, not clipped to white

    base = scene_image(30)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    base.save(buf, "PNG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue())
    assert decoded.image.size == (60, 80)  # rotated to how a viewer shows it
    assert decoded.width == 80  # the stored size is what the file says
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(base.transpose(Image.Transpose.ROTATE_270)))
    assert decode_image(buf.getvalue(), exif_transpose=False).image.size == (80, 60)

    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        decode_image(buf.getvalue(), max_pixels=100)
    wide = io.BytesIO()
    Image.new("RGB", (10_000, 2)).save(wide, "PNG")
    assert decode_image(wide.getvalue(), max_aspect=32).image.size == (64, 2)


def test_caption_file_bad_rows_are_reported_not_fatal(cli, tmp_path, tiny_model: TinyModel):
    items = make_images(tmp_path / "p", 3, seed=2)
    captions = tmp_path / "caps.csv"
    rows = [
        b"image,caption",
        f"p/{items[0][0].name},a fine caption".encode(),
        f"p/{items[1][0].name},".encode(),
        b"p/missing.png,a caption for nothing",
        f"p/{items[2][0].name},bad ".encode() + b"\xff\xfe bytes",
        f"p/{items[2][0].name},another fine caption".encode(),
    ]
    captions.write_bytes(b"\n".join(rows) + b"\n")
    result = cli.invoke(
        app, ["index", "--texts", str(captions), "--index", str(tmp_path / "idx"), *tiny_model.cli_args(), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    # three linked images (one row's caption is empty), two good captions, and the caption of a missing image,
    # which is kept as a text without an image
    assert summary["failed"] == 2 and summary["added"] == 3 + 3
    assert "1 captions in caps.csv name an image that does not exist" in result.stderr
    info = json.loads(cli.invoke(app, ["info", "--index", str(tmp_path / "idx"), "--failed", "--json"]).stdout)
    reasons = sorted(f["error"] for f in info["failures"])
    assert reasons == ["line 3: empty text", "line 5: not valid UTF-8"]
    assert info["counts"]["unlinked_texts"] == 1
    hits = json.loads(
        cli.invoke(
            app, ["search", "a caption for nothing", "--target", "texts", "--index", str(tmp_path / "idx"), "--json"]
        ).stdout
    )["results"]
    orphan = next(h for h in hits if h["text"] == "a caption for nothing")
    assert orphan["path"] is None


def test_files_vanishing_mid_run(cli, tmp_path, tiny_model: TinyModel, monkeypatch):
    import clipdex.indexer.run as indexing_run
    from clipdex.indexer.sources import FileEntry

    items = make_images(tmp_path / "p", 4, seed=4)
    index = tmp_path / "idx"
    assert cli.invoke(app, ["index", str(tmp_path / "p"), "--index", str(index), *tiny_model.cli_args()]).exit_code == 0
    real_scan = indexing_run.scan_root
    doomed = items[0][0]
    listing = list(real_scan(tmp_path / "p"))
    ghost = FileEntry(tmp_path / "p" / "ghost.png", 10, 1.0, str(tmp_path / "p"))
    doomed.unlink()  # listed by the scan, gone by the time a worker reads it
    listing = [FileEntry(e.path, e.size, e.mtime + 1, e.source) if e.path == doomed else e for e in listing]
    monkeypatch.setattr(indexing_run, "scan_root", lambda root, exclude=(), unreadable=None: iter([*listing, ghost]))
    result = cli.invoke(app, ["index", str(tmp_path / "p"), "--index", str(index), "--json"])
    assert counts(json.loads(result.stdout)) == {"added": 0, "updated": 0, "removed": 1, "unchanged": 3, "failed": 0}


@pytest.mark.parametrize("which", ["sub", "root"])
def test_a_folder_that_cannot_be_listed_keeps_its_items(
    cli, tmp_path, tiny_model: TinyModel, monkeypatch, caplog, which
):
    """A folder whose listing fails (EIO, permission: real for a failing disk; root ignores permissions, so the
    failure is injected) is skipped with a warning; its items are kept, not removed as deleted."""
    make_images(tmp_path / "p", 3, seed=7)
    make_images(tmp_path / "p" / "sub", 4, seed=8)
    index = tmp_path / "idx"
    assert cli.invoke(app, ["index", str(tmp_path / "p"), "--index", str(index), *tiny_model.cli_args()]).exit_code == 0
    broken = (tmp_path / "p" / "sub") if which == "sub" else (tmp_path / "p")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == broken:
            raise OSError(5, "Input/output error", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = cli.invoke(app, ["index", str(tmp_path / "p"), "--index", str(index), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["removed"] == 0 and summary["unchanged"] == (3 if which == "sub" else 0), summary
    assert f"skipping folder {broken}: Input/output error" in caplog.text
    offline = json.loads(cli.invoke(app, ["info", "--index", str(index), "--json"]).stdout)["offline"]
    assert offline == {"folders": [str(broken)], "items": 4 if which == "sub" else 7}  # kept, and said to be
    monkeypatch.setattr(os, "scandir", real_scandir)
    again = json.loads(cli.invoke(app, ["index", str(tmp_path / "p"), "--index", str(index), "--json"]).stdout)
    assert counts(again) == {"added": 0, "updated": 0, "removed": 0, "unchanged": 7, "failed": 0}
    offline = json.loads(cli.invoke(app, ["info", "--index", str(index), "--json"]).stdout)["offline"]
    assert offline == {"folders": [], "items": 0}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(cli, tmp_path, tiny_model: TinyModel):
    make_images(tmp_path / "p", 2, seed=6)
    locked = next((tmp_path / "p").iterdir())
    locked.chmod(0)
    result = cli.invoke(
        app, ["index", str(tmp_path / "p"), "--index", str(tmp_path / "idx"), *tiny_model.cli_args(), "--json"]
    )
    assert json.loads(result.stdout)["failed"] == 1


def test_peak_memory_bounded_on_bombs_and_strips(tmp_path, tiny_model: TinyModel):
    root = tmp_path / "zoo"
    root.mkdir()
    Image.new("1", (30_000, 30_000)).save(root / "bomb.png")
    Image.new("RGB", (400_000, 1), (1, 2, 3)).save(root / "strip.png")  # naive resize to 224 high: ~80 GB
    scene_image(1).save(root / "ok.png")
    cmd = [
        sys.executable,
        "-m",
        "clipdex",
        "index",
        str(root),
        "--index",
        str(tmp_path / "idx"),
        *tiny_model.cli_args(),
        "--json",
        "--workers",
        "1",
    ]
    # a fresh parent, so that the peak covers this run's processes only (RUSAGE_CHILDREN is cumulative)
    wrapper = (
        "import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps([p.returncode, p.stdout, p.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    code, stdout, stderr, peak_kib = json.loads(proc.stdout)
    assert code == 0, stderr
    assert counts(json.loads(stdout)) == {"added": 2, "updated": 0, "removed": 0, "unchanged": 0, "failed": 1}
    assert peak_kib / 1024 < 2048, f"peak RSS {peak_kib / 1024:.0f} MiB"
