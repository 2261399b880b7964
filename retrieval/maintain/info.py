"""What `clipdex info` reports, read from the manifest and the published snapshot only."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from clipdex.retrieval.errors import IndexFormatError
from clipdex.retrieval.model.runtime import runtime_of
from clipdex.retrieval.search.request import DEFAULT_RERANK_K
from clipdex.retrieval.store.manifest import Manifest, read_manifest
from clipdex.retrieval.store.snapshot import parquet_columns, read_parquet


def index_info(index_dir: Path, *, with_failures: bool = False) -> dict[str, Any]:
    manifest = read_manifest(index_dir)
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    data: dict[str, Any] = {
        "index": str(index_dir),
        "format_version": manifest.format_version,
        "model": {
            "name": manifest.model.name,
            "pretrained": manifest.model.pretrained,
            "checkpoint_sha256": manifest.model.checkpoint_sha256,
            "runtime": runtime_of(manifest.model, manifest.precision),
            "precision": manifest.precision,
        },
        "dim": manifest.dim,
        "counts": manifest.counts,
        "index_types": manifest.index_types,
        "ann": {
            kind: {k: getattr(record, k) for k in ("factory", "params", "recall_at_10", "reason")}
            for kind, record in manifest.ann.items()
        },
        "size_bytes": size,
        "generation": manifest.snapshot.generation,
        "roots": list(manifest.roots),
        "updated": _iso(manifest.snapshot.published),
        # the re-ranking head attached (`finetune --method rerank --index`), and the K `--rerank` takes by default
        "rerank": {"head": manifest.rerank, "k": DEFAULT_RERANK_K} if manifest.rerank else None,
        # roots and folders unreadable at the last run (an unplugged drive): their items are kept, hidden by search
        "offline": {"folders": list(manifest.offline), "items": _offline_items(index_dir, manifest)},
        # the OCR engine reading the words in new images (`index --ocr`), and how many images hold words
        "ocr": {"engine": manifest.ocr, "images_with_words": _with_words(index_dir, manifest)}
        if manifest.ocr
        else None,
    }
    if with_failures:
        data["failures"] = _failures(index_dir, manifest)
    return data


def _iso(timestamp: float | None) -> str | None:
    """When the last snapshot was published, as local time with its offset (ISO 8601)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _failures(index_dir: Path, manifest: Manifest) -> list[dict[str, Any]]:
    name = manifest.snapshot.files.get("items")
    if not name:
        return []
    try:
        table = read_parquet(index_dir / name, columns=["id", "kind", "path", "text", "status", "error"])
    except Exception as e:
        raise IndexFormatError(
            f"{index_dir / name} is damaged ({e}); repair it: `clipdex check --repair --index {index_dir}`"
        ) from e
    failed = table.filter(pc.equal(table["status"], "failed"))
    return [{k: row[k] for k in ("id", "kind", "path", "text", "error")} for row in failed.to_pylist()]


def _with_words(index_dir: Path, manifest: Manifest) -> int:
    """How many searchable images hold words that OCR read."""
    name = manifest.snapshot.files.get("items")
    if not name or "ocr" not in parquet_columns(index_dir / name):
        return 0
    table = read_parquet(index_dir / name, columns=["kind", "status", "ocr"])
    image = pc.and_(pc.equal(table["kind"], "image"), pc.equal(table["status"], "ok"))
    return int(pc.sum(pc.and_(image, pc.greater(pc.utf8_length(table["ocr"]), 0))).as_py() or 0)


def _offline_items(index_dir: Path, manifest: Manifest) -> int:
    """How many searchable items are offline (kept for a root or folder that could not be read)."""
    if not manifest.offline:
        return 0
    from clipdex.retrieval.store.reader import PublishedItems, ids_under

    return len(ids_under(PublishedItems.open(index_dir, manifest), manifest.offline))
