"""Zero-shot labels: each class is the normalised mean of its normalised template embeddings, as open_clip and
CLIP_benchmark build their classifiers; an image's label is the class of highest cosine.

Default templates: the seven that OpenAI's CLIP prompt-engineering notebook found best as an ensemble on ImageNet.
A templates file holds one template a line, `{}` (or CLIP_benchmark's `{c}`) marking the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdex.retrieval.errors import InputError

if TYPE_CHECKING:
    from clipdex.retrieval.model.encoder import Encoder
    from clipdex.retrieval.search.searcher import Searcher

DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise InputError("give the classes with --labels 'cat,dog,car' or --labels-file FILE (one a line)")
    if labels_file is not None:
        try:
            text = labels_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read labels file {labels_file}: {e}") from None
        found = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        assert labels is not None
        found = [part.strip() for part in labels.split(",") if part.strip()]
    if len(found) < 2:
        raise InputError(f"zero-shot labelling needs at least two classes (got {found})")
    if len(set(found)) != len(found):
        raise InputError("a class is named twice: " + ", ".join(sorted({x for x in found if found.count(x) > 1})))
    return found


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read templates file {path}: {e}") from None
    bad = [t for t in lines if "{}" not in t and "{c}" not in t]
    if not lines or bad:
        raise InputError(f"every template needs {{}} where the label goes: {bad[:3] or 'the file is empty'}")
    return lines


def class_vectors(encoder: Encoder, labels: list[str], templates: list[str]) -> np.ndarray:
    """(classes, dim): per class, the normalised mean of its normalised template embeddings."""
    rows = []
    for label in labels:
        texts = [t.replace("{c}", label).replace("{}", label) for t in templates]
        mean = encoder.encode_texts(texts).astype(np.float64).mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.asarray(rows, dtype=np.float32)


@dataclass(frozen=True)
class Labels:
    labels: list[str]
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "items": self.items}


def label_images(searcher: Searcher, labels: list[str], templates: list[str], *, batch: int = 4096) -> Labels:
    """The top label and its cosine for every indexed image, from the stored vectors (no image is re-encoded)."""
    from clipdex.retrieval.config import Kind

    classes = class_vectors(searcher.encoder, labels, templates)
    ids = searcher.ids(Kind.IMAGE)
    items: list[dict[str, Any]] = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        scores = searcher.vectors(chunk) @ classes.T
        best = np.argmax(scores, axis=1)
        for row, b, s in zip(searcher.rows(chunk), best, scores, strict=True):
            items.append({"id": row["id"], "path": row["path"], "label": labels[b], "score": float(s[b])})
    return Labels(labels, items)


def store_labels(index_dir: Path, found: Labels) -> None:
    """Keep the labels in the catalog (`label`, `label_score`) and publish them, for `--where "label = 'cat'"`."""
    from clipdex.retrieval.ann.build import index_writer
    from clipdex.retrieval.store.manifest import read_manifest

    manifest = read_manifest(index_dir)
    writer = index_writer(index_dir, manifest.model, manifest.dim)
    try:
        writer.catalog.set_labels([(item["id"], item["label"], item["score"]) for item in found.items])
        writer.publish()
    finally:
        writer.close()


def evaluate_folder(
    encoder: Encoder, folder: Path, templates: list[str], *, batch_size: int = 64, workers: int = 0
) -> dict[str, Any]:
    """Zero-shot accuracy on a folder whose subfolders name the classes (torchvision's ImageFolder layout), with
    CLIP_benchmark's figures: top-1 and top-5 accuracy (top-5 only with 5 classes or more) and mean per-class
    recall."""
    from clipdex.retrieval.evaluation.evaluate import encode_image_files
    from clipdex.retrieval.imaging.files import is_image_file, skipped

    if not folder.is_dir():
        raise InputError(f"no such folder: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not skipped(p.name))
    files = [
        (f, c)
        for c, name in enumerate(classes)
        for f in sorted((folder / name).rglob("*"))
        if f.is_file() and is_image_file(f)
    ]
    if len(classes) < 2 or not files:
        raise InputError(f"{folder} needs at least two subfolders of images, one per class")
    vectors = encode_image_files(encoder, [f for f, _ in files], batch_size=batch_size, workers=workers)
    logits = vectors @ class_vectors(encoder, classes, templates).T
    target = np.array([c for _, c in files])
    order = np.argsort(-logits, axis=1, kind="stable")
    recalls = [float(np.mean(order[target == c, 0] == c)) for c in range(len(classes)) if np.any(target == c)]
    return {
        "classes": classes,
        "images": len(files),
        "acc1": float(np.mean(order[:, 0] == target)),
        "acc5": float(np.mean(np.any(order[:, :5] == target[:, None], axis=1))) if len(classes) >= 5 else float("nan"),
        "mean_per_class_recall": float(np.mean(recalls)),
    }
