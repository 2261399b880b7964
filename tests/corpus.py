"""Seeded synthetic corpora and a tiny CLIP model for the tests.

Images are coloured shapes on coloured backgrounds; captions say what is drawn, so a model
trained on them for a few seconds retrieves them better than chance but far from perfectly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    dx: int
    dy: int

    def captions(self, rng: random.Random, n: int) -> list[str]:
        forms = [
            f"a {self.size} {self.colour} {self.shape} on a {self.background} background",
            f"a {self.colour} {self.shape} drawn on {self.background}",
            f"{self.background} background with a {self.size} {self.colour} {self.shape}",
            f"the {self.shape} is {self.colour} and the background is {self.background}",
            f"a picture of a {self.colour} {self.shape}",
            f"one {self.size} {self.shape}, {self.colour}, over {self.background}",
        ]
        rng.shuffle(forms)
        return forms[:n]


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(sorted(COLOURS), 2)
    return Scene(rng.choice(SHAPES), colour, background, rng.choice(SIZES), rng.randint(-6, 6), rng.randint(-6, 6))


def draw(scene: Scene, size: tuple[int, int] = (64, 64), noise_seed: int = 0) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, COLOURS[scene.background])
    d = ImageDraw.Draw(img)
    r = w // 3 if scene.size == "large" else w // 6
    cx, cy = w // 2 + scene.dx, h // 2 + scene.dy
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        t = max(2, r // 3)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    arr = np.asarray(img).astype(np.int16)
    arr += np.random.default_rng(noise_seed).integers(-6, 7, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, *, seed: int, ext: str = ".png", start: int = 0) -> list[tuple[Path, Scene]]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        scene = random_scene(rng)
        path = folder / f"{scene.colour}_{scene.shape}_{i:04d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(scene, noise_seed=seed * 100_000 + i).save(path)
        out.append((path, scene))
    return out


def write_tiny_config(folder: Path, name: str = "tiny-clip") -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def train_tiny_model(config_path: Path, out: Path, *, steps: int = 150, seed: int = 0) -> Path:
    """A few seconds of contrastive training on synthetic scenes; saves a weights-only state dict."""
    import open_clip

    torch.manual_seed(seed)
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(config_path.stem)
    tokenizer = open_clip.get_tokenizer(config_path.stem)
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(512)]
    images = torch.stack([preprocess(draw(s, noise_seed=i)) for i, s in enumerate(scenes)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = open_clip.ClipLoss()
    model.train()
    for _ in range(steps):
        idx = rng.sample(range(len(scenes)), 64)
        texts = tokenizer([scenes[i].captions(rng, 1)[0] for i in idx])
        img_f = model.encode_image(images[idx], normalize=True)
        txt_f = model.encode_text(texts, normalize=True)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), out)
    return out


def _dataset_scenes(n: int, seed: int) -> list[tuple[Scene, list[str]]]:
    """Scenes with 5 captions each, every seventh with 6, some captions holding commas."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        caps = scene.captions(rng, 6 if i % 7 == 3 else 5)
        out.append((scene, caps))
    return out


def make_flickr_fixture(root: Path, n: int, *, seed: int = 0) -> Path:
    """CLIP_benchmark's Flickr30k layout: images in root, flickr30k_test_karpathy.txt beside them."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for i, (scene, caps) in enumerate(_dataset_scenes(n, seed)):
        name = f"{1000 + i * 37}.jpg"
        draw(scene, noise_seed=seed + i).save(root / name, quality=92)
        lines += [f"{name},{c}" for c in caps]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def make_coco_fixture(root: Path, n: int, *, seed: int = 0) -> Path:
    """CLIP_benchmark's COCO layout: coco_test_karpathy.json (COCO captions format), images in val2014/."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations = [], []
    ids = rng.sample(range(1, 600_000), n)  # not sorted: readers must order by id like pycocotools users do
    for image_id, (scene, caps) in zip(ids, _dataset_scenes(n, seed), strict=True):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        draw(scene, noise_seed=image_id).save(root / "val2014" / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
        first = len(annotations) + 1
        annotations += [{"image_id": image_id, "id": first + j, "caption": c} for j, c in enumerate(caps)]
    rng.shuffle(annotations)
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def make_karpathy_fixture(root: Path, dataset: str, n: int, *, seed: int = 0) -> Path:
    """Karpathy's dataset_{flickr30k,coco}.json, with test images mixed among other splits."""
    splits = ["train", "test", "val", "restval", "test"]
    entries = []
    for i, (scene, caps) in enumerate(_dataset_scenes(n, seed)):
        filename = f"{i:05d}.jpg"
        folder = root / ("flickr30k-images" if dataset == "flickr30k" else "val2014")
        folder.mkdir(parents=True, exist_ok=True)
        draw(scene, noise_seed=seed + i).save(folder / filename, quality=92)
        entry = {
            "filename": filename,
            "imgid": i,
            "split": splits[i % len(splits)],
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
        }
        if dataset == "coco":
            entry["filepath"] = "val2014"
        entries.append(entry)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": entries, "dataset": dataset}))
    return root


# -- a domain the tiny model has never seen: other colours, other shapes, catalogue wording ----------------

DOMAIN_COLOURS = {
    "teal": (0, 128, 128),
    "magenta": (255, 0, 200),
    "brown": (120, 70, 20),
    "navy": (10, 20, 90),
    "olive": (120, 130, 20),
    "pink": (255, 170, 190),
}
DOMAIN_SHAPES = ("star", "hexagon", "diamond", "ring")


def draw_domain(shape: str, colour: str, background: str, seed: int, size: int = 64) -> Image.Image:
    import math

    img = Image.new("RGB", (size, size), DOMAIN_COLOURS[background])
    d = ImageDraw.Draw(img)
    rng = random.Random(seed)
    cx, cy, r = size // 2 + rng.randint(-5, 5), size // 2 + rng.randint(-5, 5), size // 3
    fill = DOMAIN_COLOURS[colour]
    if shape == "star":
        pts = [
            (
                cx + (r if i % 2 == 0 else r // 2.5) * math.cos(math.pi * i / 5),
                cy + (r if i % 2 == 0 else r // 2.5) * math.sin(math.pi * i / 5),
            )
            for i in range(10)
        ]
        d.polygon(pts, fill=fill)
    elif shape == "hexagon":
        d.polygon(
            [(cx + r * math.cos(math.pi * i / 3), cy + r * math.sin(math.pi * i / 3)) for i in range(6)], fill=fill
        )
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r // 2, cy), (cx, cy + r), (cx - r // 2, cy)], fill=fill)
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, r // 3))
    arr = np.asarray(img).astype(np.int16)
    arr += np.random.default_rng(seed).integers(-8, 9, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@contextlib.contextmanager
def pairs_csv(path: Path) -> Iterator[Any]:
    """A caption file of (image, caption) rows: its csv writer, the header written."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        yield w


def _one_image_pairs(
    folder: Path, n: int, name: str, seed: int, make: Callable[[random.Random, int], tuple[Image.Image, str, list[str]]]
) -> Path:
    """`folder/images/*.png` and a caption file `name` of (image, caption) rows: `make(rng, i)` gives image i, its
    file name and its captions, drawing from one seeded `rng` in order."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / name
    with pairs_csv(path) as w:
        for i in range(n):
            image, file_name, captions = make(rng, i)
            image.save(folder / "images" / file_name)
            for caption in captions:
                w.writerow([f"images/{file_name}", caption])
    return path


def make_domain_pairs(folder: Path, n: int, *, seed: int, captions_per_image: int = 2, name: str = "pairs.csv") -> Path:
    """Product-catalogue pairs in the unseen domain: `folder/images/*.png` and a CSV of (image, caption)."""

    def make(rng: random.Random, i: int) -> tuple[Image.Image, str, list[str]]:
        colour, background = rng.sample(sorted(DOMAIN_COLOURS), 2)
        shape = rng.choice(DOMAIN_SHAPES)
        forms = [
            f"SKU {shape} in {colour}, {background} backdrop",
            f"{colour} {shape} item on {background}",
            f"catalogue photo: {shape}, colour {colour}, background {background}",
        ]
        rng.shuffle(forms)
        image = draw_domain(shape, colour, background, seed * 10_000 + i)
        return image, f"{seed}_{i:04d}.png", forms[:captions_per_image]

    return _one_image_pairs(folder, n, name, seed, make)


def make_shape_pairs(folder: Path, n: int, *, seed: int, captions_per_image: int = 2, name: str = "pairs.csv") -> Path:
    """Pairs in the shapes domain the tiny model was trained on: one coloured shape per image, its captions."""

    def make(rng: random.Random, i: int) -> tuple[Image.Image, str, list[str]]:
        scene = random_scene(rng)
        captions = scene.captions(rng, captions_per_image)
        return draw(scene, noise_seed=seed * 100_003 + i), f"shape_{seed}_{i:05d}.png", captions

    return _one_image_pairs(folder, n, name, seed, make)


def make_captioned_library(root: Path, n: int, captioned: int, *, seed: int) -> list[tuple[Path, Scene]]:
    """`root/photos` with n drawn images and `root/captions.csv` linking the first `captioned` to one caption each."""
    made = make_images(root / "photos", n, seed=seed)
    rng = random.Random(seed + 1)
    with pairs_csv(root / "captions.csv") as w:
        for path, scene in made[:captioned]:
            w.writerow([f"photos/{path.name}", scene.captions(rng, 1)[0]])
    return made


def edit(path: Path, seed: int) -> None:
    """Draw something else into the same file, with a later mtime."""
    draw(random_scene(random.Random(seed)), noise_seed=seed).save(path)
    later = time.time() + 5 + seed % 7
    os.utime(path, (later, later))


# -- a compositional domain: two objects per image, each with its own colour; twins swap the colours ----------


def _two_objects(first: tuple[str, str], second: tuple[str, str], background: str, seed: int) -> Image.Image:
    """(shape, colour) on the left and on the right, jittered and noised."""
    rng = random.Random(seed)
    img = Image.new("RGB", (64, 64), COLOURS[background])
    d = ImageDraw.Draw(img)
    for (shape, colour), cx in ((first, 16), (second, 48)):
        x, y, r, fill = cx + rng.randint(-2, 2), 32 + rng.randint(-8, 8), 11, COLOURS[colour]
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "triangle":
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            d.rectangle([x - r, y - r // 3, x + r, y + r // 3], fill=fill)
            d.rectangle([x - r // 3, y - r, x + r // 3, y + r], fill=fill)
    arr = np.asarray(img).astype(np.int16) + np.random.default_rng(seed).integers(-6, 7, (64, 64, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_compositional_pairs(folder: Path, n: int, *, seed: int, twins: bool, name: str) -> Path:
    """Two coloured shapes per image, captions that say which colour goes with which shape. With `twins`, each
    image comes with its attribute-swapped twin (the same shapes and places, the colours exchanged), one caption
    each: a gallery where only binding tells the two apart. Without, two captions per image (training pairs)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / name
    with pairs_csv(path) as w:
        for i in range(n):
            (s1, s2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(sorted(COLOURS), 2)
            background = rng.choice([c for c in sorted(COLOURS) if c not in (c1, c2)])
            variants = [((s1, c1), (s2, c2)), ((s1, c2), (s2, c1))] if twins else [((s1, c1), (s2, c2))]
            for j, ((sa, ca), (sb, cb)) in enumerate(variants):
                image = folder / "images" / f"{name.split('.')[0]}_{seed}_{i:05d}_{j}.png"
                _two_objects((sa, ca), (sb, cb), background, seed * 1_000_003 + 2 * i + j).save(image)
                forms = [
                    f"a {ca} {sa} and a {cb} {sb}",
                    f"a {ca} {sa} on the left, a {cb} {sb} on the right",
                    f"a {cb} {sb} to the right of a {ca} {sa}",
                ]
                for caption in rng.sample(forms, 1 if twins else 2):
                    w.writerow([f"images/{image.name}", caption])
    return path


# -- images of words (OCR) ---------------------------------------------------------------------------------------

FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
)
# Made-up and real words, some sharing parts (substring and prefix matches must tell them apart)
WORD_POOL = (
    "INVOICE", "RECEIPT", "HARBOUR", "BAKERY", "MUSEUM", "PHARMACY", "PLATFORM", "EXIT", "PARKING", "LIBRARY",
    "GARDEN", "STATION", "HOTEL", "CINEMA", "BOOKSHOP", "ZURICH", "KRAKOW", "LISBON", "OSLO", "VALENCIA",
    "QUARTERLY", "BUDGET", "MEETING", "AGENDA", "TICKET", "BOARDING", "GATE", "SALE", "CLOSED", "OPEN",
)  # fmt: skip


def photo_background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like backdrop: smooth colour gradients (coarse noise, upscaled) and a few soft blobs."""
    from PIL import ImageFilter

    w, h = size
    coarse = (rng.random((4, 5, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 60))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(3))
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def draw_words(text: str, seed: int, *, size: tuple[int, int] = (480, 360), angle: float | None = None) -> Image.Image:
    """`text` written on a sign (a light panel) or straight onto a photo-like background, in one of Debian's
    DejaVu fonts, turned by `angle` degrees (random within ±25° when None)."""
    from PIL import ImageFont

    rng = np.random.default_rng(seed)
    image = photo_background(rng, size)
    scale = size[0] / 480  # the same share of the picture at any size
    font = ImageFont.truetype(FONTS[int(rng.integers(0, len(FONTS)))], int(rng.integers(34, 46) * scale))
    left, top, right, bottom = font.getbbox(text)
    pad = int(12 * scale)
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.6:  # a sign: dark letters on a light panel
        draw.rectangle([0, 0, layer.width - 1, layer.height - 1], fill=(245, 240, 225, 235))
        ink = (20, 20, 30, 255)
    else:  # painted straight on: white letters with a dark outline
        ink = (255, 255, 255, 255)
    draw.text((pad - left, pad - top), text, font=font, fill=ink, stroke_width=0 if ink[0] < 100 else 2,
              stroke_fill=(0, 0, 0, 255))  # fmt: skip
    turn = float(rng.uniform(-25, 25)) if angle is None else angle
    layer = layer.rotate(turn, expand=True, resample=Image.BICUBIC)
    scale = min(1.0, 0.9 * size[0] / layer.width, 0.9 * size[1] / layer.height)
    if scale < 1.0:
        layer = layer.resize((int(layer.width * scale), int(layer.height * scale)), Image.BICUBIC)
    x = int(rng.integers(0, size[0] - layer.width + 1))
    y = int(rng.integers(0, size[1] - layer.height + 1))
    image.paste(layer, (x, y), layer)
    return image


def make_word_images(
    folder: Path, n: int, *, seed: int, words_per_image: int = 2, size: tuple[int, int] = (480, 360)
) -> list[tuple[Path, str]]:
    """`n` JPEGs, each showing `words_per_image` words of WORD_POOL (no two images the same words); (path, text)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        text = " ".join(rng.sample(WORD_POOL, words_per_image))
        text = rng.choice((str.upper, str.title, str.lower))(text)  # found whatever case it is written in
        if text.upper() in seen:
            continue
        seen.add(text.upper())
        path = folder / f"words_{seed}_{len(out):04d}.jpg"
        draw_words(text, seed * 100_003 + len(out), size=size).save(path, quality=90)
        out.append((path, text))
    return out
