"""Flickr30k and MS-COCO retrieval splits, read from CLIP_benchmark's or Karpathy's annotation files.

Image order and caption order follow CLIP_benchmark exactly (first appearance in the Flickr .txt; COCO
image ids ascending, captions in annotation order), so that recall@k is computed on the same pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from clipdex.retrieval.errors import DatasetError, InputError

SPLITS = ("train", "val", "test")


class DatasetName(str, Enum):
    FLICKR30K = "flickr30k"
    COCO = "coco"


@dataclass(frozen=True)
class RetrievalDataset:
    name: str
    split: str
    layout: str
    images: list[Path]
    captions: list[list[str]]  # captions[i] belong to images[i]

    @property
    def n_texts(self) -> int:
        return sum(len(c) for c in self.captions)

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions flattened in dataset order, and the image index of each."""
        flat, owner = [], []
        for i, caps in enumerate(self.captions):
            flat.extend(caps)
            owner.extend([i] * len(caps))
        return flat, owner

    def head(self, n: int) -> RetrievalDataset:
        return self.subset(range(min(n, len(self.images))))

    def subset(self, indices: Iterable[int]) -> RetrievalDataset:
        pick = list(indices)
        return RetrievalDataset(
            self.name, self.split, self.layout, [self.images[i] for i in pick], [self.captions[i] for i in pick]
        )


def load_dataset(
    name: DatasetName | str, root: Path, *, split: str = "test", limit: int | None = None
) -> RetrievalDataset:
    """Detect the layout under `root`, read the split, and check that every image file exists."""
    name = DatasetName(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    readers: list[tuple[Path, Callable[..., RetrievalDataset]]]
    if name is DatasetName.FLICKR30K:
        readers = [
            (root / f"flickr30k_{split}_karpathy.txt", _flickr_txt),
            (root / "dataset_flickr30k.json", _karpathy_flickr),
        ]
    else:
        readers = [(root / f"coco_{split}_karpathy.json", _coco_captions), (root / "dataset_coco.json", _karpathy_coco)]
    for annotation, reader in readers:
        if annotation.is_file():
            try:
                ds = reader(annotation, root, split)
            except DatasetError:
                raise
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DatasetError(f"cannot read {annotation}: {type(e).__name__}: {e}") from e
            break
    else:
        looked = " or ".join(str(a.relative_to(root)) for a, _ in readers)
        raise DatasetError(f"no {name.value} annotations in {root}: looked for {looked} (see data/README.md)")
    if not ds.images:
        raise DatasetError(f"{annotation} has no images in split {split!r}")
    if limit is not None:
        ds = ds.head(limit)
    _check_images(ds, root)
    return ds


def _check_images(ds: RetrievalDataset, root: Path) -> None:
    missing = [p for p in ds.images if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DatasetError(
            f"{len(missing)} of {len(ds.images)} {ds.name} {ds.split} images are missing under {root} (e.g. {shown}); "
            "see data/README.md for the expected layout"
        )


def _flickr_txt(annotation: Path, root: Path, split: str) -> RetrievalDataset:
    # CLIP_benchmark's format: a header line, then `image.jpg,caption` (captions may hold commas)
    captions: dict[str, list[str]] = {}
    with annotation.open(encoding="utf-8") as f:
        f.readline()
        for number, raw in enumerate(f, start=2):
            line = raw.strip()
            if not line:
                continue
            image, sep, caption = line.partition(".jpg,")
            if not sep:
                raise DatasetError(f"{annotation}:{number}: expected `image.jpg,caption`, got {line[:80]!r}")
            captions.setdefault(image + ".jpg", []).append(caption)
    return RetrievalDataset(
        "flickr30k", split, "clip_benchmark", [root / name for name in captions], list(captions.values())
    )


def _coco_captions(annotation: Path, root: Path, split: str) -> RetrievalDataset:
    data = _load_json(annotation)
    folder = root / ("train2014" if split == "train" else "val2014")
    files = {int(img["id"]): img["file_name"] for img in data["images"]}
    captions: dict[int, list[str]] = {i: [] for i in files}
    for ann in data["annotations"]:
        captions.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    ids = sorted(files)
    return RetrievalDataset(
        "coco", split, "clip_benchmark", [folder / files[i] for i in ids], [captions[i] for i in ids]
    )


def _karpathy(annotation: Path, split: str) -> list[dict[str, Any]]:
    wanted = {"train", "restval"} if split == "train" else {split}
    return [img for img in _load_json(annotation)["images"] if img.get("split") in wanted]


def _karpathy_flickr(annotation: Path, root: Path, split: str) -> RetrievalDataset:
    images = _karpathy(annotation, split)
    folders = [root / "flickr30k-images", root / "images", root]
    folder = next((d for d in folders if images and (d / images[0]["filename"]).is_file()), folders[0])
    return RetrievalDataset(
        "flickr30k",
        split,
        "karpathy",
        [folder / img["filename"] for img in images],
        [[s["raw"] for s in img["sentences"]] for img in images],
    )


def _karpathy_coco(annotation: Path, root: Path, split: str) -> RetrievalDataset:
    images = _karpathy(annotation, split)
    return RetrievalDataset(
        "coco",
        split,
        "karpathy",
        [root / img.get("filepath", "") / img["filename"] for img in images],
        [[s["raw"] for s in img["sentences"]] for img in images],
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from e


# -- a user's own pairs: any caption file with an image column -------------------------------------


@dataclass
class Skipped:
    """Rows and images left out, with why: reported like indexing failures, never fatal."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, why: str) -> None:
        self.items.append((what, why))


def read_pairs(path: Path, *, text_column: str | None, image_column: str | None, skipped: Skipped) -> RetrievalDataset:
    """Captions grouped by the image they describe, from any caption file `clipdex index --texts` reads."""
    from clipdex.retrieval.imaging.captions import open_texts
    from clipdex.retrieval.paths import canonical

    source = open_texts(canonical(path), text_column=text_column, image_column=image_column)
    if not source.image_column:
        raise InputError(
            f"{path} has no image column: fine-tuning needs image–caption pairs; name the column with --image-column"
        )
    captions: dict[Path, list[str]] = {}
    for row in source:
        if row.error is not None or row.image is None:
            skipped.add(f"{path.name} line {row.line}", row.error or "no image")
        elif not row.image.is_file():
            skipped.add(str(row.image), "image not found")
        elif row.text not in captions.setdefault(row.image, []):
            captions[row.image].append(row.text)
    return RetrievalDataset("pairs", path.name, "pairs", list(captions), list(captions.values()))
