"""Export an index in clip-retrieval's layout, which `clipdex import` (and clip-retrieval users' tools) read.

Images and texts are separate items in clipdex, not pairs, so each partition holds one kind: images in
`img_emb/img_emb_N.npy` with `metadata/metadata_N.parquet` (`image_path`, `caption`: its first caption), texts in
`text_emb/text_emb_M.npy` with `metadata/metadata_M.parquet` (`caption`, `image_path`: the image it names, or null).
Vectors are written as stored (float32, or float16 with `float16`), from the published snapshot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.search.searcher import Searcher
from clipdex.retrieval.store.atomic import atomic_file, replace_with
from clipdex.retrieval.store.writer import FreshIndexDir

PARTITION_ROWS = 100_000


@dataclass(frozen=True)
class ExportSummary:
    images: int
    texts: int
    partitions: int
    out: str

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "texts": self.texts, "partitions": self.partitions, "out": self.out}


def export_clip_retrieval(
    index_dir: Path, out: Path, *, float16: bool = False, partition_rows: int = PARTITION_ROWS
) -> ExportSummary:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; export into a new one")
    searcher = Searcher(index_dir, device="cpu")
    fresh = FreshIndexDir(out)
    try:
        counts, part = _export(searcher, out, float16=float16, partition_rows=partition_rows)
    except BaseException:
        fresh.undo()  # a failed export (a full disk) leaves no partial folder that a re-run would refuse
        raise
    return ExportSummary(counts[Kind.IMAGE], counts[Kind.TEXT], part, str(out))


def _export(searcher: Searcher, out: Path, *, float16: bool, partition_rows: int) -> tuple[dict[Kind, int], int]:
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    part = 0
    counts = {}
    for target, prefix in ((Kind.IMAGE, "img_emb"), (Kind.TEXT, "text_emb")):
        ids = searcher.ids(target)
        counts[target] = len(ids)
        for start in range(0, len(ids), partition_rows):
            chunk = ids[start : start + partition_rows]
            vectors = searcher.vectors(chunk)
            rows = searcher.rows(chunk)
            if target is Kind.IMAGE:
                meta = {"image_path": [r["path"] for r in rows], "caption": [r["text"] for r in rows]}
            else:
                meta = {"image_path": [r.get("link") or r["path"] for r in rows], "caption": [r["text"] for r in rows]}
            _save(out / prefix / f"{prefix}_{part}.npy", vectors.astype(np.float16 if float16 else np.float32))
            table = pa.table({k: pa.array(v, type=pa.string()) for k, v in meta.items()})
            replace_with(out / "metadata" / f"metadata_{part}.parquet", functools.partial(pq.write_table, table))
            part += 1
    return counts, part


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)
