"""What survives in a damaged index: the manifest its item tables carry, the intact snapshot, and the items the
index answered before anything is changed (so a repair can say what it could not keep).

Each published item table (`items-G.parquet`) holds a copy of the manifest that published it (key-value metadata,
less the snapshot), so a lost, emptied or garbled manifest.json is rebuilt from the newest table that reads, with
the snapshot files of that generation found beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np

from clipdex.retrieval import ann
from clipdex.retrieval.config import Kind, sha256_file
from clipdex.retrieval.errors import ClipdexError, IndexFormatError
from clipdex.retrieval.store.manifest import MANIFEST, Manifest, read_manifest
from clipdex.retrieval.store.snapshot import ITEMS, read_manifest_copy, read_parquet, snapshot_name
from clipdex.retrieval.store.words import WORDS

_ITEM_TABLE = re.compile(r"items-(\d+)\.parquet")
_SNAPSHOT_KEYS = (*(k.plural for k in Kind), ITEMS, WORDS)


def item_tables(index_dir: Path) -> list[tuple[int, Path]]:
    """(generation, path) of the item tables in the folder, newest first."""
    try:
        names = list(index_dir.iterdir())
    except OSError:  # not a folder, or one that cannot be listed: no tables to recover from
        return []
    found = [(int(m.group(1)), p) for p in names if (m := _ITEM_TABLE.fullmatch(p.name))]
    return sorted(found, reverse=True)


def recovered_manifest(index_dir: Path) -> Manifest | None:
    """The manifest as the newest readable item table recorded it, pointed at that generation's files."""
    for generation, path in item_tables(index_dir):
        data = read_manifest_copy(path)
        if data is None:
            continue
        try:
            manifest = Manifest.from_json({**data, "snapshot": {}})
        except (KeyError, TypeError, ValueError):
            continue
        files = {key: snapshot_name(key, generation) for key in _SNAPSHOT_KEYS}
        files = {key: name for key, name in files.items() if (index_dir / name).is_file()}
        manifest.snapshot.generation = generation
        manifest.snapshot.files = files
        manifest.snapshot.sha256 = {key: sha256_file(index_dir / name) for key, name in files.items()}
        return manifest
    return None


def manifest_problem(index_dir: Path) -> str | None:
    """Why manifest.json cannot be used, when the folder still holds a snapshot to rebuild it from."""
    try:
        read_manifest(index_dir)
        return None
    except ClipdexError as e:
        if not item_tables(index_dir):
            raise
        if not (index_dir / MANIFEST).is_file():
            return f"{MANIFEST} is missing"
        if isinstance(e, IndexFormatError) and "newer than this clipdex" in str(e):
            raise
        return str(e).split(";")[0]


def intact(index_dir: Path, manifest: Manifest, key: str) -> Path | None:
    """A snapshot file the manifest names, when it is there and matches its checksum."""
    name = manifest.snapshot.files.get(key)
    if not name or not (index_dir / name).is_file():
        return None
    path = index_dir / name
    digest = manifest.snapshot.sha256.get(key)
    return path if digest is None or sha256_file(path) == digest else None


def answered(index_dir: Path, manifest: Manifest) -> dict[Kind, set[int]]:
    """The ids each kind's search answered from before a repair: the intact item table's searchable rows, else
    the ids the kind's FAISS index holds, else none known."""
    items = intact(index_dir, manifest, ITEMS)
    if items is not None:
        try:
            table = read_parquet(items, columns=["id", "kind", "status"]).to_pylist()
            return {
                kind: {int(r["id"]) for r in table if r["kind"] == kind.value and r["status"] == "ok"} for kind in Kind
            }
        except Exception:  # unreadable after all: the FAISS files are the next witness
            pass
    out: dict[Kind, set[int]] = {}
    for kind in Kind:
        index = exact_index(index_dir, manifest, kind)
        out[kind] = set() if index is None else {int(i) for i in ann.index_ids(index)}
    return out


def exact_index(index_dir: Path, manifest: Manifest, kind: Kind) -> faiss.Index | None:
    """The kind's published FAISS index when it is intact and holds its vectors as they were (a flat index): a
    source of vectors whose shard is lost."""
    path = intact(index_dir, manifest, kind.plural)
    if path is None:
        return None
    try:
        index = ann.read_index(path)
        ann.index_ids(index)
    except Exception:
        return None
    top = faiss.downcast_index(index)
    inner = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2) else top
    return index if isinstance(inner, faiss.IndexFlat) else None


def vectors_from(index: faiss.Index, ids: list[int]) -> dict[int, np.ndarray]:
    """The vectors an exact index holds for those of `ids` it has."""
    held = {int(i) for i in ann.index_ids(index)}
    wanted = [i for i in ids if i in held]
    if not wanted:
        return {}
    return dict(zip(wanted, reconstruct(index, np.asarray(wanted, dtype=np.int64)), strict=True))


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The vectors an index holds for `ids` (decoded from its codes)."""
    ivf = ann.find_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # ids are catalog ids
    return np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, index.d), np.float32)
