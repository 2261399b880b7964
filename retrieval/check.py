"""`clipdex check`: do manifest, snapshot, catalog and vector shards agree? Reports exactly what is wrong."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipdex.retrieval import ann
from clipdex.retrieval.catalog import CATALOG
from clipdex.retrieval.config import sha256_file
from clipdex.retrieval.errors import IndexFormatError
from clipdex.retrieval.items import Kind
from clipdex.retrieval.manifest import Manifest, read_manifest
from clipdex.retrieval.shards import shard_path

log = logging.getLogger(__name__)

_NORM_TOLERANCE = 2e-3  # float16 shards round each component
_RECONSTRUCT_SAMPLE = 2000


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "counts": self.counts}


def check_index(index_dir: Path) -> CheckReport:
    report = CheckReport()
    try:
        manifest = read_manifest(index_dir)
    except IndexFormatError as e:
        report.problems.append(str(e))
        return report
    dim = manifest.dim
    published = _check_snapshot(index_dir, manifest, dim, report)
    _check_catalog(index_dir, dim, published, report)
    return report


def _check_snapshot(index_dir: Path, manifest: Manifest, dim: int, report: CheckReport) -> dict[str, np.ndarray]:
    """Verify the published files; return the searchable ids per kind as the snapshot has them."""
    files = manifest.snapshot.files
    checksums = manifest.snapshot.sha256
    counts = manifest.counts
    ids: dict[str, np.ndarray] = {}
    for key, name in files.items():
        path = index_dir / name
        if not path.is_file():
            report.problems.append(f"snapshot file {name} named in manifest.json is missing")
            continue
        if key in checksums and sha256_file(path) != checksums[key]:
            report.problems.append(f"snapshot file {name} does not match its checksum in manifest.json (damaged)")
    meta_ok: dict[str, np.ndarray] = {}
    if "items" in files and (index_dir / files["items"]).is_file():
        try:
            table = pq.read_table(index_dir / files["items"], columns=["id", "kind", "status"])
            for kind in Kind:
                rows = table.filter(pc.and_(pc.equal(table["kind"], kind.value), pc.equal(table["status"], "ok")))
                meta_ok[kind.plural] = np.sort(rows["id"].to_numpy())
            failed = int(pc.sum(pc.equal(table["status"], "failed")).as_py() or 0)
            if failed != counts.get("failed", 0):
                report.problems.append(
                    f"manifest counts {counts.get('failed', 0)} failed items, the item table {failed}"
                )
        except Exception as e:
            report.problems.append(f"item table {files['items']} cannot be read: {e}")
    for kind in Kind:
        name = files.get(kind.plural, "")
        if not name or not (index_dir / name).is_file():
            continue
        try:
            index = ann.read_index(index_dir / name)
        except Exception as e:
            report.problems.append(f"FAISS index {name} cannot be read: {e}")
            continue
        report.counts[kind.plural] = int(index.ntotal)
        if index.d != dim:
            report.problems.append(f"FAISS index {name} has dimension {index.d}, the manifest says {dim}")
        if index.ntotal != counts.get(kind.plural):
            report.problems.append(
                f"FAISS index {name} holds {index.ntotal} vectors, the manifest counts {counts.get(kind.plural)}"
            )
        try:
            found = np.sort(ann.index_ids(index))
        except TypeError:
            report.problems.append(f"FAISS index {name} does not map catalog ids")
            continue
        ids[kind.plural] = found
        if len(np.unique(found)) != len(found):
            report.problems.append(f"FAISS index {name} holds duplicate ids")
        if kind.plural in meta_ok and not np.array_equal(found, meta_ok[kind.plural]):
            diff = np.setxor1d(found, meta_ok[kind.plural])
            report.problems.append(
                f"FAISS index {name} and the item table disagree on {len(diff)} ids (e.g. {diff[:3].tolist()})"
            )
    return ids


def _check_catalog(index_dir: Path, dim: int, published: dict[str, np.ndarray], report: CheckReport) -> None:
    try:
        con = duckdb.connect(str(index_dir / CATALOG), read_only=True)
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            report.notes.append(
                "an indexing run holds the catalog: catalog and vector checks skipped; run check when it ends"
            )
        else:
            report.problems.append(f"catalog {CATALOG} cannot be opened: {e}")
        return
    except Exception as e:
        report.problems.append(f"catalog {CATALOG} cannot be opened: {e}")
        return
    try:
        _check_rows(con, report)
        _check_vectors(con, index_dir, dim, published, report)
    finally:
        con.close()


def _check_rows(con: duckdb.DuckDBPyConnection, report: CheckReport) -> None:
    dup_ids = con.execute("SELECT count(*) FROM (SELECT id FROM items GROUP BY id HAVING count(*) > 1)").fetchone()[0]  # type: ignore[index]
    if dup_ids:
        report.problems.append(f"catalog: {dup_ids} ids appear more than once")
    dup_paths = con.execute(
        "SELECT path, count(*) FROM items WHERE kind = 'image' GROUP BY path HAVING count(*) > 1 LIMIT 3"
    ).fetchall()
    if dup_paths:
        report.problems.append(
            f"catalog: images listed more than once, e.g. {dup_paths[0][0]} ({dup_paths[0][1]} times)"
        )
    dup_texts = con.execute(
        "SELECT count(*) FROM (SELECT source, text, path FROM items WHERE kind = 'text' AND status = 'ok' "
        "GROUP BY source, text, path HAVING count(*) > 1)"
    ).fetchone()[0]  # type: ignore[index]
    if dup_texts:
        report.problems.append(f"catalog: {dup_texts} texts listed more than once")
    no_vector = con.execute(
        "SELECT count(*) FROM items WHERE status = 'ok' AND (shard IS NULL OR row IS NULL)"
    ).fetchone()[0]  # type: ignore[index]
    if no_vector:
        report.problems.append(f"catalog: {no_vector} indexed items have no vector location")


def _check_vectors(
    con: duckdb.DuckDBPyConnection, index_dir: Path, dim: int, published: dict[str, np.ndarray], report: CheckReport
) -> None:
    shards = {int(s): (int(n), h) for s, n, h in con.execute("SELECT shard, rows, sha256 FROM shards").fetchall()}
    live = con.execute("SELECT id, kind, shard, row FROM items WHERE status = 'ok' ORDER BY id").fetchnumpy()
    vectors: dict[int, np.ndarray] = {}
    for shard in np.unique(live["shard"]).tolist():
        path = shard_path(index_dir, int(shard))
        if int(shard) not in shards:
            report.problems.append(f"vector shard {path.name} is used by the catalog but not registered")
            continue
        rows, digest = shards[int(shard)]
        if not path.is_file():
            report.problems.append(f"vector shard {path.name} is missing")
            continue
        if sha256_file(path) != digest:
            report.problems.append(f"vector shard {path.name} does not match its checksum (damaged)")
            continue
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            report.problems.append(f"vector shard {path.name} cannot be read: {e}")
            continue
        if data.shape != (rows, dim):
            report.problems.append(f"vector shard {path.name} has shape {data.shape}, expected ({rows}, {dim})")
            continue
        vectors[int(shard)] = data
    bad_rows = bad_norms = 0
    for shard, row in zip(live["shard"].tolist(), live["row"].tolist(), strict=True):
        data = vectors.get(int(shard))
        if data is None:
            continue
        if not 0 <= row < len(data):
            bad_rows += 1
        elif abs(float(np.linalg.norm(data[row])) - 1.0) > _NORM_TOLERANCE:
            bad_norms += 1
    if bad_rows:
        report.problems.append(f"catalog: {bad_rows} items point past the end of their vector shard")
    if bad_norms:
        report.problems.append(f"{bad_norms} stored vectors are not unit length")
    for kind in Kind:
        committed = np.sort(live["id"][live["kind"] == kind.value])
        shown = published.get(kind.plural)
        if shown is not None and not np.array_equal(committed, shown):
            report.notes.append(
                f"{len(np.setxor1d(committed, shown))} {kind.plural} committed but not yet published "
                "(an indexing run was interrupted); run `clipdex index` again to publish them"
            )
