"""`clipdex check`: do manifest, snapshot, catalog and vector shards agree? Reports exactly what is wrong.

The snapshot checks read only immutable files. The catalog checks open catalog.duckdb, so they run under
the write lock: while an indexing run holds it they are skipped (with a note), and an indexer started
during a check is told the check holds the index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import faiss
import numpy as np
import pyarrow.compute as pc

from clipdex.retrieval import ann
from clipdex.retrieval.config import Kind, sha256_file
from clipdex.retrieval.errors import IndexFormatError, IndexLockedError, ReadOnlyError
from clipdex.retrieval.maintain.salvage import manifest_problem, reconstruct
from clipdex.retrieval.store.catalog import CATALOG, Catalog
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import Manifest, model_config_intact, model_config_path, read_manifest
from clipdex.retrieval.store.shards import shard_path
from clipdex.retrieval.store.snapshot import read_parquet

log = logging.getLogger(__name__)

_NORM_TOLERANCE = 2e-3  # float16 shards round each component
_SAMPLE = 2000  # vectors per kind read back from the ANN index and compared with the stored ones
_STALE_TOLERANCE = 1e-4


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
        lost = manifest_problem(index_dir)  # a path that is no index at all is a usage error, raised
    except IndexFormatError as e:  # damage is a finding
        report.problems.append(str(e))
        return report
    if lost is not None:
        report.problems.append(f"{lost}; run `clipdex check --repair` to rebuild it from the published item table")
        return report
    manifest = read_manifest(index_dir)
    read_only = False
    try:
        lock = acquire_lock(index_dir, holder="clipdex check")
    except IndexLockedError:
        lock = None
        report.notes.append(
            "an indexing run holds the index: catalog and vector checks skipped; run check when it ends"
        )
    except ReadOnlyError:
        lock, read_only = None, True  # a folder nobody can write has no writer to wait for: check it all
    try:
        published = _check_snapshot(index_dir, manifest, report)
        if lock is not None or read_only:
            _check_catalog(index_dir, manifest.dim, published, report)
    finally:
        if lock is not None:
            lock.close()
    if lock is None and not read_only and read_manifest(index_dir).snapshot.generation != manifest.snapshot.generation:
        report.notes.append("the indexing run published during the check: run it again once the run ends")
    return report


# -- the published snapshot ----------------------------------------------------------------------


def _check_snapshot(index_dir: Path, manifest: Manifest, report: CheckReport) -> dict[str, np.ndarray]:
    """Verify the published files; return the searchable ids per kind as the snapshot has them."""
    files = manifest.snapshot.files
    counts = manifest.counts
    for key, name in files.items():
        path = index_dir / name
        if not path.is_file():
            report.problems.append(f"snapshot file {name} named in manifest.json is missing; run `clipdex build`")
        elif key in manifest.snapshot.sha256 and sha256_file(path) != manifest.snapshot.sha256[key]:
            report.problems.append(
                f"snapshot file {name} does not match its checksum in manifest.json (damaged); run `clipdex build`"
            )
    _check_model_config(index_dir, manifest, report)
    items = _read_items(index_dir, files.get("items"), report)
    if items is not None:
        failed = int(pc.sum(pc.equal(items["status"], "failed")).as_py() or 0)
        if failed != counts.get("failed", 0):
            report.problems.append(f"manifest counts {counts.get('failed', 0)} failed items, the item table {failed}")
    ids: dict[str, np.ndarray] = {}
    for kind in Kind:
        name = files.get(kind.plural, "")
        if not name or not (index_dir / name).is_file():
            continue
        try:
            index = ann.read_index(index_dir / name)
        except Exception as e:
            report.problems.append(f"FAISS index {name} cannot be read: {_first_line(e)}; run `clipdex build`")
            continue
        report.counts[kind.plural] = int(index.ntotal)
        if index.d != manifest.dim:
            report.problems.append(f"FAISS index {name} has dimension {index.d}, the manifest says {manifest.dim}")
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
            report.problems.append(f"FAISS index {name} holds duplicate ids; run `clipdex build`")
        if items is None:
            continue
        live = items.filter(pc.and_(pc.equal(items["kind"], kind.value), pc.equal(items["status"], "ok")))
        expected = np.sort(live["id"].to_numpy())
        if not np.array_equal(found, expected):
            diff = np.setxor1d(found, expected)
            report.problems.append(
                f"FAISS index {name} and the item table disagree on {len(diff)} ids (e.g. {diff[:3].tolist()}); "
                "run `clipdex build`"
            )
        else:
            _check_stale(index_dir, index, name, live, report)
    return ids


def _check_model_config(index_dir: Path, manifest: Manifest, report: CheckReport) -> None:
    if not model_config_intact(index_dir, manifest.model):
        path = model_config_path(index_dir, manifest.model)
        report.problems.append(
            f"the model config {path.relative_to(index_dir)} is missing or differs from the one in manifest.json; "
            "run `clipdex check --repair` to write it again"
        )


def _read_items(index_dir: Path, name: str | None, report: CheckReport) -> Any:
    if not name or not (index_dir / name).is_file():
        return None
    try:
        return read_parquet(index_dir / name, columns=["id", "kind", "status", "shard", "row"])
    except Exception as e:
        report.problems.append(f"item table {name} cannot be read: {_first_line(e)}; run `clipdex build`")
        return None


def _check_stale(index_dir: Path, index: faiss.Index, name: str, live: Any, report: CheckReport) -> None:
    """Read a sample of vectors back from the ANN index and compare them with the stored vectors they were
    made from (through the index's own encoding), so an index still holding an edited item's old vector is
    caught."""
    if not len(live):
        return
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(live), size=min(_SAMPLE, len(live)), replace=False))
    ids = live["id"].to_numpy()[pick]
    shards = live["shard"].to_numpy(zero_copy_only=False)[pick]
    rows = live["row"].to_numpy(zero_copy_only=False)[pick]
    stored = np.empty((len(ids), index.d), dtype=np.float32)
    try:
        for shard in np.unique(shards).tolist():
            mask = shards == shard
            stored[mask] = np.load(shard_path(index_dir, int(shard)), mmap_mode="r", allow_pickle=False)[rows[mask]]
    except (OSError, ValueError, IndexError, EOFError):  # numpy: EOFError for an empty file
        return  # shard problems are the catalog check's to report
    try:
        held = reconstruct(index, ids)
    except RuntimeError as e:
        report.notes.append(f"{name}: vectors cannot be read back from this index type ({_first_line(e)})")
        return
    stale = np.abs(held - encoded_like(index, stored)).max(axis=1) > _STALE_TOLERANCE
    if stale.any():
        report.problems.append(
            f"{int(stale.sum())} of {len(ids)} sampled vectors in {name} differ from the stored vectors of their "
            f"items (e.g. id {int(ids[stale][0])}: an edit the index missed); run `clipdex build`"
        )


def encoded_like(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """`x` passed through the index's encoding (8-bit scalars, PQ codes…), as `reconstruct` returns it."""
    top = faiss.downcast_index(index)
    codec = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2) else top
    try:
        return codec.sa_decode(codec.sa_encode(np.ascontiguousarray(x)))
    except RuntimeError:  # no standalone codec (HNSW): such indexes store vectors as they are
        return x


# -- the catalog and the vector shards -----------------------------------------------------------


def _check_catalog(index_dir: Path, dim: int, published: dict[str, np.ndarray], report: CheckReport) -> None:
    if not (index_dir / CATALOG).is_file():
        report.problems.append(f"catalog {CATALOG} is missing; run `clipdex check --repair` to rebuild it")
        return
    try:
        catalog = Catalog(index_dir, read_only=True)
    except duckdb.Error as e:
        report.problems.append(
            f"catalog {CATALOG} cannot be opened ({_first_line(e)}); run `clipdex check --repair` to rebuild it "
            "from the published snapshot"
        )
        return
    try:
        _check_rows(catalog.con, report)
        _check_vectors(catalog, index_dir, dim, published, report)
    except duckdb.Error as e:
        report.problems.append(
            f"catalog {CATALOG} cannot be read ({_first_line(e)}); run `clipdex check --repair` to rebuild it"
        )
    finally:
        catalog.close()


def _check_rows(con: duckdb.DuckDBPyConnection, report: CheckReport) -> None:
    def count(sql: str) -> int:
        row = con.execute(sql).fetchone()
        return int(row[0]) if row else 0

    if dup_ids := count("SELECT count(*) FROM (SELECT id FROM items GROUP BY id HAVING count(*) > 1)"):
        report.problems.append(f"catalog: {dup_ids} ids appear more than once; run `clipdex check --repair`")
    dup_paths = con.execute(
        "SELECT path, count(*) FROM items WHERE kind = 'image' GROUP BY path HAVING count(*) > 1 LIMIT 3"
    ).fetchall()
    if dup_paths:
        report.problems.append(
            f"catalog: images listed more than once, e.g. {dup_paths[0][0]} ({dup_paths[0][1]} times); "
            "run `clipdex check --repair`"
        )
    columns = {d[0] for d in con.execute("SELECT * FROM items LIMIT 0").description}
    link = "link" if "link" in columns else "path"  # format 1 had no link column
    dup_texts = count(
        f"SELECT count(*) FROM (SELECT source, text, {link} FROM items WHERE kind = 'text' AND status = 'ok' "
        f"AND hash IS NOT NULL GROUP BY source, text, {link} HAVING count(*) > 1)"
    )
    if dup_texts:
        report.problems.append(f"catalog: {dup_texts} texts listed more than once; run `clipdex check --repair`")
    if no_vector := count("SELECT count(*) FROM items WHERE status = 'ok' AND (shard IS NULL OR row IS NULL)"):
        report.problems.append(f"catalog: {no_vector} indexed items have no vector location")


def _check_vectors(
    catalog: Catalog, index_dir: Path, dim: int, published: dict[str, np.ndarray], report: CheckReport
) -> None:
    registered = catalog.registered_shards()
    live = catalog.con.execute("SELECT id, kind, shard, row FROM items WHERE status = 'ok' ORDER BY id").fetchnumpy()
    vectors: dict[int, np.ndarray] = {}
    for shard in np.unique(live["shard"]).tolist():
        problem, data = inspect_shard(index_dir, int(shard), registered, dim)
        if problem:
            report.problems.append(f"{problem}; run `clipdex check --repair`")
        elif data is not None:
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


def inspect_shard(
    index_dir: Path, shard: int, registered: dict[int, tuple[int, str]], dim: int
) -> tuple[str | None, np.ndarray | None]:
    """(what is wrong with a shard or None, its memory-mapped data when it is sound)."""
    path = shard_path(index_dir, shard)
    if shard not in registered:
        return f"vector shard {path.name} is used by the catalog but not registered", None
    rows, digest = registered[shard]
    if not path.is_file():
        return f"vector shard {path.name} is missing", None
    if sha256_file(path) != digest:
        return f"vector shard {path.name} does not match its checksum (damaged)", None
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        return f"vector shard {path.name} cannot be read: {_first_line(e)}", None
    if data.shape != (rows, dim):
        return f"vector shard {path.name} has shape {data.shape}, expected ({rows}, {dim})", None
    return None, data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
