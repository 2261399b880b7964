"""`clipdex check --repair`: a consistent index again from everything that survives, and an account of the rest.

- A lost or garbled manifest.json is rebuilt from the copy the newest readable item table carries.
- A lost, emptied, cut or unreadable catalog is moved aside and rebuilt from the published snapshot's item table (a
  full copy of the rows as of that generation, with the shard registry and its checksums).
- Items whose vectors sit in a missing, damaged or short shard get them again (recover.py): texts from their words,
  images from their files or from an exact FAISS index; only an item none of these holds is dropped, named.
- Duplicate rows (one id, one image path or one caption row listed twice) keep their newest copy.
- The ANN indexes, the item table and the full-text index are built afresh and published; the snapshot that
  answered before stays until the new one is current. Whatever it answered that the new one does not is said.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from clipdex.retrieval.ann.build import index_writer
from clipdex.retrieval.config import Kind
from clipdex.retrieval.errors import IndexFormatError
from clipdex.retrieval.maintain import salvage
from clipdex.retrieval.maintain.check import inspect_shard
from clipdex.retrieval.maintain.recover import recover_vectors
from clipdex.retrieval.store.catalog import CATALOG, Catalog
from clipdex.retrieval.store.lock import acquire_lock
from clipdex.retrieval.store.manifest import (
    MANIFEST,
    Manifest,
    model_config_intact,
    read_manifest,
    write_manifest,
    write_model_config,
)
from clipdex.retrieval.store.snapshot import ITEMS, read_shards_copy
from clipdex.retrieval.store.writer import IndexWriter

log = logging.getLogger(__name__)

_NAMED = 50  # lost items named one a line; past this, a count


@dataclass
class RepairReport:
    actions: list[str] = field(default_factory=list)  # what was done
    lost: list[str] = field(default_factory=list)  # what is gone, and how to get it back

    def to_json(self) -> dict[str, Any]:
        return {"actions": self.actions, "lost": self.lost}


def _default_encoder(index_dir: Path) -> Any:
    from clipdex.retrieval.model.choose import open_index_encoder

    return open_index_encoder(index_dir)


def repair_index(index_dir: Path, *, open_encoder: Callable[[Path], Any] = _default_encoder) -> RepairReport:
    report = RepairReport()
    salvage.manifest_problem(index_dir)  # a folder that is no index at all is refused before the lock is made
    lock = acquire_lock(index_dir, holder="clipdex check --repair")
    try:
        manifest = _ensure_manifest(index_dir, report)
        before = salvage.answered(index_dir, manifest)
        exact = {kind: salvage.exact_index(index_dir, manifest, kind) for kind in Kind}
        _ensure_model_config(index_dir, manifest, report)
        _ensure_catalog(index_dir, manifest, before, report)
        writer = index_writer(index_dir, manifest.model, manifest.dim, lock=lock)
    except BaseException:
        lock.close()
        raise
    try:
        named = _recover_vectors(writer, exact, open_encoder, report)
        _drop_duplicates(writer, report)
        writer.reuse_words = False
        writer.publish(rebuild=True)
        report.actions.append(f"rebuilt the ANN indexes and published generation {writer.manifest.snapshot.generation}")
        _account(writer, before, named, report)
    finally:
        writer.close()
    return report


def _ensure_manifest(index_dir: Path, report: RepairReport) -> Manifest:
    problem = salvage.manifest_problem(index_dir)
    if problem is None:
        return read_manifest(index_dir)
    manifest = salvage.recovered_manifest(index_dir)
    if manifest is None:
        raise IndexFormatError(
            f"{problem}, and no item table in {index_dir} holds a readable copy of it: nothing to rebuild it from; "
            "index your folders again into a new --index directory"
        )
    write_manifest(index_dir, manifest)
    report.actions.append(
        f"{problem}: rebuilt {MANIFEST} from the copy in {manifest.snapshot.files.get(ITEMS)} "
        f"(generation {manifest.snapshot.generation})"
    )
    return manifest


def _ensure_model_config(index_dir: Path, manifest: Manifest, report: RepairReport) -> None:
    """The index's copy of its model-config JSON, written again from the manifest's when it differs."""
    if not model_config_intact(index_dir, manifest.model):
        path = write_model_config(index_dir, manifest.model)
        report.actions.append(f"wrote the model config {path.relative_to(index_dir)} again from {MANIFEST}")


def _catalog_problem(index_dir: Path, answered: int) -> str | None:
    """Why the catalog cannot be used as it is (missing, unreadable, without its tables, or empty while the
    published snapshot answered `answered` items), or None."""
    path = index_dir / CATALOG
    if not path.is_file():
        return "it is missing"
    if path.stat().st_size == 0:
        return "it is empty"
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        return _first_line(e)
    try:
        tables = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not {"items", "shards"} <= tables:
            return "its tables are missing"
        for table in sorted(tables):  # every block of every table read once: a cut file fails here, not later
            con.execute(f'SELECT * FROM "{table}"').fetchall()
        held = con.execute("SELECT count(*) FROM items").fetchall()[0][0]
        if held == 0 and answered:
            return f"it holds no items, the published snapshot {answered}"
    except duckdb.Error as e:
        return _first_line(e)
    finally:
        con.close()
    return None


def _ensure_catalog(index_dir: Path, manifest: Manifest, before: dict[Kind, set[int]], report: RepairReport) -> None:
    reason = _catalog_problem(index_dir, sum(len(ids) for ids in before.values()))
    if reason is None:
        return
    path = index_dir / CATALOG
    items = salvage.intact(index_dir, manifest, ITEMS)
    if items is None:
        raise IndexFormatError(
            f"{path} cannot be read ({reason}) and no intact published snapshot holds a copy of its rows: nothing to "
            "rebuild from; index your folders again into a new --index directory"
        )
    stamp = int(time.time())
    for name in (CATALOG, CATALOG + ".wal"):
        if (index_dir / name).exists():
            (index_dir / name).rename(index_dir / f"{name}.damaged-{stamp}")
    try:
        catalog = Catalog(index_dir)
        try:
            n = catalog.restore(items)
            catalog.register_shards(read_shards_copy(items))
        finally:
            catalog.close()
    except (duckdb.Error, OSError) as e:
        raise IndexFormatError(f"cannot rebuild the catalog from {items.name}: {_first_line(e)}") from e
    aside = f"; the damaged file is kept as {CATALOG}.damaged-{stamp}" if reason != "it is missing" else ""
    report.actions.append(
        f"{CATALOG} could not be used ({reason}): rebuilt it from snapshot generation "
        f"{manifest.snapshot.generation} ({n} items){aside}"
    )
    report.lost.append(
        f"changes committed after generation {manifest.snapshot.generation} was published, if any: "
        "run `clipdex index` on your folders and caption files to redo them"
    )


def _recover_vectors(writer: IndexWriter, exact: dict[Kind, Any], open_encoder: Any, report: RepairReport) -> set[int]:
    """Vectors that cannot be read made again; returns the ids of the items lost (named in the report)."""
    catalog = writer.catalog
    registered = catalog.registered_shards()
    bad: dict[int, str] = {}
    lengths: dict[int, int] = {}
    for shard in sorted(catalog.used_shards()):
        problem, data = inspect_shard(writer.dir, shard, registered, writer.dim)
        if problem or data is None:
            bad[shard] = problem or "unreadable"
        else:
            lengths[shard] = len(data)
    rows = catalog.rows("shard IS NOT NULL ORDER BY id")
    doomed = [r for r in rows if r["shard"] in bad or not 0 <= r["row"] < lengths.get(r["shard"], 0)]
    if not doomed:
        return set()
    why = "; ".join(p for _, p in sorted(bad.items())[:3]) or "rows past a shard's end"
    got = recover_vectors(writer, doomed, exact, open_encoder)
    made = got.reencoded
    report.actions.append(
        f"{len(doomed)} items had vectors that could not be read ({why}): encoded {made['images']} images again "
        f"from their files and {made['texts']} texts from their words, read {got.salvaged} back from the FAISS index"
    )
    for _, path, reason in got.lost[:_NAMED]:
        report.lost.append(f"{path}: {reason}, and no intact copy of its vector is left (run `clipdex index` on it)")
    if len(got.lost) > _NAMED:
        report.lost.append(f"{len(got.lost) - _NAMED} more images like those above")
    return {i for i, _, _ in got.lost}


def _account(writer: IndexWriter, before: dict[Kind, set[int]], named: set[int], report: RepairReport) -> None:
    """Say what the index answered before the repair that the published result does not hold (and was not
    already named)."""
    held = {int(i) for (i,) in writer.catalog.con.execute("SELECT id FROM items WHERE status = 'ok'").fetchall()}
    for kind in Kind:
        gone = sorted(before[kind] - held - named)
        if gone:
            report.lost.append(
                f"{len(gone)} {kind.plural} the index answered before the repair are not in it now (ids "
                f"{', '.join(map(str, gone[:5]))}{'…' if len(gone) > 5 else ''}): removed by "
                "a change that was committed but not yet published, or lost with the catalog; `clipdex index` on "
                "their folders brings back those whose files remain"
            )


# (rows concerned, what makes two of them the same item): one id, one image file, one caption row of a caption
# file (imported texts carry no hash: they are told apart by their row in the import, not by content)
_IDENTITIES = (
    ("TRUE", "id"),
    ("kind = 'image' AND path IS NOT NULL", "path"),
    ("kind = 'text' AND hash IS NOT NULL", "source, text, link"),
)


def _drop_duplicates(writer: IndexWriter, report: RepairReport) -> None:
    catalog = writer.catalog
    before = int(catalog.scalar("SELECT count(*) FROM items"))
    for where, key in _IDENTITIES:
        catalog.con.execute(
            f"""DELETE FROM items WHERE {where} AND rowid NOT IN (
                    SELECT arg_max(rowid, updated) FROM items WHERE {where} GROUP BY {key})"""
        )
    removed = before - int(catalog.scalar("SELECT count(*) FROM items"))
    if removed:
        report.actions.append(f"removed {removed} duplicate catalog rows (kept the newest of each)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
