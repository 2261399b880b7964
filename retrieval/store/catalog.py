"""catalog.duckdb: one row per item, the vector shards, and small resumable-job state; only writers open it.

Every change is one transaction, so a crash leaves the last committed state. Readers never open this file:
they read the published snapshot (see snapshot.py), which carries a full copy of the rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdex.retrieval.config import Kind
from clipdex.retrieval.paths import under_prefix
from clipdex.retrieval.store.columns import column
from clipdex.retrieval.store.items import Record

CATALOG = "catalog.duckdb"

# (name, DuckDB type, arrow type): the items table, in order. New columns are only ever appended, so an older
# catalog is brought up to date by adding the missing ones (see Catalog._migrate).
ITEM_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("id", "BIGINT NOT NULL", pa.int64()),
    ("kind", "VARCHAR NOT NULL", pa.string()),
    ("source", "VARCHAR", pa.string()),
    ("path", "VARCHAR", pa.string()),
    ("text", "VARCHAR", pa.string()),
    ("size", "BIGINT", pa.int64()),
    ("mtime", "DOUBLE", pa.float64()),
    ("hash", "VARCHAR", pa.string()),
    ("width", "INTEGER", pa.int32()),
    ("height", "INTEGER", pa.int32()),
    ("status", "VARCHAR NOT NULL", pa.string()),
    ("error", "VARCHAR", pa.string()),
    ("shard", "INTEGER", pa.int32()),
    ("row", "INTEGER", pa.int32()),
    ("updated", "DOUBLE", pa.float64()),
    ("link", "VARCHAR", pa.string()),  # format 2: the image a caption row names (texts)
    ("taken_at", "DOUBLE", pa.float64()),  # EXIF, images: capture time (POSIX seconds), camera, GPS position
    ("camera", "VARCHAR", pa.string()),
    ("lat", "DOUBLE", pa.float64()),
    ("lon", "DOUBLE", pa.float64()),
    ("label", "VARCHAR", pa.string()),  # images: the zero-shot label `clipdex classify` stored, and its cosine
    ("label_score", "DOUBLE", pa.float64()),
    ("ocr", "VARCHAR", pa.string()),  # images: the words read in it (`index --ocr`), "" for none; NULL: not read yet
)
COLUMNS = tuple(name for name, _, _ in ITEM_COLUMNS)
_ARROW_SCHEMA = pa.schema([(name, kind) for name, _, kind in ITEM_COLUMNS])
_SHARDS = "CREATE TABLE IF NOT EXISTS shards (shard INTEGER NOT NULL, rows INTEGER NOT NULL, sha256 VARCHAR NOT NULL)"
_STATE = "CREATE TABLE IF NOT EXISTS state (key VARCHAR PRIMARY KEY, value VARCHAR)"
# vectors a `clipdex reindex` run has made with the next model, swapped into `items` when all are made
_REENCODED = "CREATE TABLE IF NOT EXISTS reencoded (id BIGINT NOT NULL, shard INTEGER, row INTEGER, error VARCHAR)"


class Catalog:
    def __init__(self, index_dir: Path, *, read_only: bool = False):
        self.path = index_dir / CATALOG
        self.con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            try:
                self._migrate()
            except BaseException:
                self.con.close()
                raise

    def _migrate(self) -> None:
        first = ITEM_COLUMNS[0]
        self.con.execute(f"CREATE TABLE IF NOT EXISTS items ({first[0]} {first[1]})")
        for name, sql_type, _ in ITEM_COLUMNS[1:]:
            nullable = sql_type.replace(" NOT NULL", "")  # added columns cannot be NOT NULL on existing rows
            self.con.execute(f'ALTER TABLE items ADD COLUMN IF NOT EXISTS "{name}" {nullable}')
        self.con.execute(_SHARDS)
        self.con.execute(_STATE)
        self.con.execute(_REENCODED)

    def close(self) -> None:
        self.con.close()

    # -- reads ----------------------------------------------------------------------------------

    def rows(self, sql_where: str = "TRUE", params: list[Any] | None = None) -> list[dict[str, Any]]:
        cols = ", ".join(f'"{c}"' for c in COLUMNS)
        cur = self.con.execute(f"SELECT {cols} FROM items WHERE {sql_where}", params or [])
        return [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        row = self.con.execute(sql, params or []).fetchone()
        return None if row is None else row[0]

    def next_id(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(id), -1) + 1 FROM items"))

    def max_shard(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(shard), -1) FROM items"))

    def live(self, kind: Kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, shards, rows) of the searchable items of one kind."""
        live = self.con.execute(
            "SELECT id, shard, row FROM items WHERE kind = ? AND status = 'ok'", [kind.value]
        ).fetchnumpy()
        return (
            np.asarray(live["id"], dtype=np.int64),
            np.asarray(live["shard"], dtype=np.int64),
            np.asarray(live["row"], dtype=np.int64),
        )

    def live_counts(self) -> dict[str, int]:
        return {
            k: int(n)
            for k, n in self.con.execute(
                "SELECT kind, count(*) FROM items WHERE status = 'ok' GROUP BY kind"
            ).fetchall()
        }

    def failed_count(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM items WHERE status = 'failed'"))

    def used_shards(self) -> set[int]:
        """Shards committed rows point at, including vectors a reindex has made but not swapped in yet."""
        rows = self.con.execute(
            "SELECT shard FROM items WHERE shard IS NOT NULL UNION SELECT shard FROM reencoded WHERE shard IS NOT NULL"
        ).fetchall()
        return {int(s) for (s,) in rows}

    # -- re-encoding with another model (clipdex reindex) ----------------------------------------

    def not_reencoded(self, kind: Kind) -> list[dict[str, Any]]:
        """Searchable items of `kind` that the running reindex has not re-encoded yet."""
        return self.rows("kind = ? AND status = 'ok' AND id NOT IN (SELECT id FROM reencoded)", [kind.value])

    def add_reencoded(
        self, ids: list[int], rows: list[int | None], errors: list[str | None], new_shard: tuple[int, int, str] | None
    ) -> None:
        staged = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            id=(ids, pa.int64()),
            shard=([new_shard[0] if r is not None and new_shard else None for r in rows], pa.int32()),
            row=(rows, pa.int32()),
            error=(errors, pa.string()),
        )
        with self._transaction():
            if new_shard is not None:
                self.con.execute("INSERT INTO shards VALUES (?, ?, ?)", list(new_shard))
            self.con.execute("INSERT INTO reencoded SELECT * FROM staged")

    def reencode_as_is(self, kind: Kind) -> None:
        """Stage the current vectors of `kind` as their re-encoded ones (the new model encodes them the same)."""
        self.con.execute(
            "INSERT INTO reencoded SELECT id, shard, row, NULL FROM items "
            "WHERE kind = ? AND status = 'ok' AND id NOT IN (SELECT id FROM reencoded)",
            [kind.value],
        )

    def swap_reencoded(self, state: dict[str, str]) -> int:
        """Point every re-encoded item at its new vector (an item that could not be re-encoded fails, with why),
        in one transaction with `state`. Returns the items that failed."""
        with self._transaction():
            self.con.execute(
                "UPDATE items SET shard = r.shard, row = r.row FROM reencoded r "
                "WHERE items.id = r.id AND r.shard IS NOT NULL"
            )
            self.con.execute(
                "UPDATE items SET status = 'failed', error = r.error, shard = NULL, row = NULL FROM reencoded r "
                "WHERE items.id = r.id AND r.shard IS NULL"
            )
            failed = int(self.scalar("SELECT count(*) FROM reencoded WHERE shard IS NULL"))
            self.con.execute("DELETE FROM reencoded")
            for key, value in state.items():
                self.con.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", [key, value])
        return failed

    def relocate(self, ids: list[int], new_shard: tuple[int, int, str]) -> None:
        """Point existing items at their vectors' new place: rows 0.. of `new_shard`, in the order of `ids`."""
        moved = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            id=(ids, pa.int64()), row=(list(range(len(ids))), pa.int32())
        )
        with self._transaction():
            self.con.execute("INSERT INTO shards VALUES (?, ?, ?)", list(new_shard))
            self.con.execute(
                "UPDATE items SET shard = ?, row = moved.row FROM moved WHERE items.id = moved.id", [new_shard[0]]
            )

    def register_shards(self, shards: dict[int, tuple[int, str]]) -> None:
        """Register shards as recorded elsewhere (a snapshot's copy of this table), replacing what is held."""
        with self._transaction():
            for shard, (rows, digest) in shards.items():
                self.con.execute("DELETE FROM shards WHERE shard = ?", [shard])
                self.con.execute("INSERT INTO shards VALUES (?, ?, ?)", [shard, rows, digest])

    def clear_state(self, key: str) -> None:
        self.con.execute("DELETE FROM state WHERE key = ?", [key])

    def registered_shards(self) -> dict[int, tuple[int, str]]:
        return {
            int(s): (int(n), h) for s, n, h in self.con.execute("SELECT shard, rows, sha256 FROM shards").fetchall()
        }

    # -- writes ---------------------------------------------------------------------------------

    def commit(
        self,
        records: list[Record],
        *,
        delete_ids: list[int] | None = None,
        new_shard: tuple[int, int, str] | None = None,
        state: dict[str, str] | None = None,
    ) -> None:
        """Register a shard, replace the rows of `records`, delete `delete_ids` and set `state`, in one transaction."""
        touched = [r.id for r in records] + list(delete_ids or [])
        with self._transaction():
            if new_shard is not None:
                self.con.execute("INSERT INTO shards VALUES (?, ?, ?)", list(new_shard))
            for key, value in (state or {}).items():
                self.con.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", [key, value])
            if touched:
                self.con.execute("DELETE FROM items WHERE id IN (SELECT unnest($1::BIGINT[]))", [touched])
            if records:
                rows = _records_table(records, time.time())  # noqa: F841 (read by DuckDB's replacement scan below)
                self.con.execute(
                    f"INSERT INTO items ({', '.join(chr(34) + c + chr(34) for c in COLUMNS)}) SELECT * FROM rows"
                )

    def touch(self, updates: list[tuple[int, int, float]]) -> None:
        """Record a new size/mtime for files whose content hash did not change."""
        if not updates:
            return
        changes = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            id=([u[0] for u in updates], pa.int64()),
            size=([u[1] for u in updates], pa.int64()),
            mtime=([u[2] for u in updates], pa.float64()),
        )
        with self._transaction():
            self.con.execute(
                "UPDATE items SET size = changes.size, mtime = changes.mtime FROM changes WHERE items.id = changes.id"
            )

    def set_labels(self, labels: list[tuple[int, str, float]]) -> None:
        """Store zero-shot labels (id, label, cosine); every other image's label is cleared (one labelling at a time)."""
        changes = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            id=([x[0] for x in labels], pa.int64()),
            label=([x[1] for x in labels], pa.string()),
            score=([x[2] for x in labels], pa.float64()),
        )
        with self._transaction():
            self.con.execute("UPDATE items SET label = NULL, label_score = NULL WHERE label IS NOT NULL")
            self.con.execute(
                "UPDATE items SET label = changes.label, label_score = changes.score FROM changes WHERE items.id = changes.id"
            )

    def unread(self) -> list[dict[str, Any]]:
        """Searchable images whose words have not been read yet (`index --ocr`), by id."""
        return self.rows("kind = 'image' AND status = 'ok' AND ocr IS NULL ORDER BY id")

    def set_ocr(self, texts: list[tuple[int, str]]) -> None:
        """Store the words read in these images (id, text); "" says one holds none."""
        changes = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            id=([x[0] for x in texts], pa.int64()), ocr=([x[1] for x in texts], pa.string())
        )
        with self._transaction():
            self.con.execute("UPDATE items SET ocr = changes.ocr FROM changes WHERE items.id = changes.id")

    def documents(self) -> list[tuple[int, str, str]]:
        """What full-text search reads, as (id, kind, body) rows: an image's words and its captions, a
        text's own words; items with none are left out."""
        return self.con.execute(
            """WITH captions AS (
                   SELECT path, string_agg(text, '\n' ORDER BY id) AS words FROM items
                   WHERE kind = 'text' AND status = 'ok' AND path IS NOT NULL GROUP BY path
               )
               SELECT * FROM (
                   SELECT i.id, i.kind, concat_ws('\n', nullif(i.ocr, ''), c.words) AS body
                   FROM items i LEFT JOIN captions c ON c.path = i.path
                   WHERE i.kind = 'image' AND i.status = 'ok'
                   UNION ALL
                   SELECT id, kind, text AS body FROM items WHERE kind = 'text' AND status = 'ok'
               ) WHERE body IS NOT NULL AND body <> '' ORDER BY id"""
        ).fetchall()

    def state(self, key: str) -> str | None:
        """A value that a resumable job (e.g. an import) committed with its rows."""
        value = self.scalar("SELECT value FROM state WHERE key = ?", [key])
        return None if value is None else str(value)

    def ids_at_or_under(self, roots: list[str]) -> list[int]:
        """Items at or under any of the canonical `roots`: images by path, and anything indexed from a source
        there (a caption file, a folder given on the command line)."""
        if not roots:
            return []
        roots_table = _staged(root=(roots, pa.string()), prefix=([under_prefix(r) for r in roots], pa.string()))  # noqa: F841
        found = self.con.execute(
            """SELECT DISTINCT i.id FROM items i, roots_table r
               WHERE (i.kind = 'image' AND (i.path = r.root OR starts_with(i.path, r.prefix)))
                  OR i.source = r.root OR starts_with(i.source, r.prefix)"""
        ).fetchall()
        return sorted(int(i) for (i,) in found)

    def relink_texts(self) -> None:
        """A caption's `path` is the image its row names while that image is searchable, else NULL."""
        with self._transaction():
            self.con.execute(
                """UPDATE items SET path = new.path FROM (
                       SELECT t.id, CASE WHEN i.path IS NOT NULL THEN t.link END AS path
                       FROM items t LEFT JOIN (
                           SELECT DISTINCT path FROM items WHERE kind = 'image' AND status = 'ok'
                       ) i ON i.path = t.link
                       WHERE t.kind = 'text'
                   ) new
                   WHERE items.id = new.id AND items.path IS DISTINCT FROM new.path"""
            )

    def unlinked_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM items WHERE kind = 'text' AND link IS NOT NULL AND path IS NULL"))

    def canonicalize_paths(self, canonical: Callable[[str], str]) -> int:
        """Format 1 → 2: rewrite paths in their canonical spelling, keep one image per file (the oldest id),
        and record each caption's image as its `link`. Returns the number of duplicate images dropped."""
        rows = self.con.execute("SELECT id, kind, path FROM items WHERE path IS NOT NULL ORDER BY id").fetchall()
        spelled = {p: canonical(p) for p in {r[2] for r in rows}}
        keep: dict[str, int] = {}
        drop: list[int] = []
        for item_id, kind, path in rows:
            if kind == "image":
                if spelled[path] in keep:
                    drop.append(int(item_id))
                else:
                    keep[spelled[path]] = int(item_id)
        fixes = _staged(  # noqa: F841 (read by DuckDB's replacement scan below)
            old=(list(spelled), pa.string()), new=(list(spelled.values()), pa.string())
        )
        with self._transaction():
            self.con.execute("UPDATE items SET path = fixes.new FROM fixes WHERE items.path = fixes.old")
            self.con.execute("UPDATE items SET link = path WHERE kind = 'text' AND link IS NULL")
            if drop:
                self.con.execute("DELETE FROM items WHERE id IN (SELECT unnest($1::BIGINT[]))", [drop])
        return len(drop)

    def restore(self, items: Path) -> int:
        """Fill an empty catalog from a snapshot's item table (every row as of that generation); return the rows.

        A format-1 table lacks some columns (they stay NULL) and held an image's caption in `text`."""
        names = set(pq.read_schema(items).names)
        columns = [f'"{c}"' if c in names else f'NULL AS "{c}"' for c in COLUMNS]
        if "caption" not in names:
            columns[COLUMNS.index("text")] = "CASE WHEN kind = 'image' THEN NULL ELSE text END AS text"
        with self._transaction():
            self.con.execute(f"INSERT INTO items SELECT {', '.join(columns)} FROM read_parquet('{_sql_str(items)}')")
        return int(self.scalar("SELECT count(*) FROM items"))

    def forget_shards(self, keep: set[int]) -> None:
        """Unregister shards outside `keep` (their files are being deleted)."""
        self.con.execute("DELETE FROM shards WHERE shard NOT IN (SELECT unnest($1::INTEGER[]))", [sorted(keep)])

    def export(self, path: Path, *, metadata: dict[str, str] | None = None) -> None:
        """Write every row to parquet (the snapshot's item table), adding `caption`: an image's first linked
        caption, so image hits can show one. `metadata` goes into the file's key-value metadata."""
        kv = ", ".join(f"{_sql_literal(k)}: {_sql_literal(v)}" for k, v in (metadata or {}).items())
        options = "FORMAT parquet" + (f", KV_METADATA {{{kv}}}" if kv else "")
        cols = ", ".join(f'i."{c}"' for c in COLUMNS)
        self.con.execute(
            f"""COPY (
                WITH first_caption AS (
                    SELECT path, arg_min(text, id) AS caption FROM items
                    WHERE kind = 'text' AND status = 'ok' AND path IS NOT NULL GROUP BY path
                )
                SELECT {cols}, CASE WHEN i.kind = 'image' THEN f.caption ELSE NULL END AS caption
                FROM items i LEFT JOIN first_caption f ON i.kind = 'image' AND f.path = i.path
                ORDER BY i.id
            ) TO '{_sql_str(path)}' ({options})"""
        )

    def _transaction(self) -> Any:
        return _Transaction(self.con)


class _Transaction:
    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN TRANSACTION")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.con.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _staged(**columns: tuple[list[Any], pa.DataType]) -> pa.Table:
    """A table for DuckDB to read by its name, built through Arrow's buffers (`store/columns.py`): pyarrow's own
    conversion imports pandas wherever it is installed, 0.2-0.3 s of an index run that writes a few photos."""
    return pa.Table.from_arrays([column(v, t) for v, t in columns.values()], names=list(columns))


def _records_table(records: list[Record], now: float) -> pa.Table:
    values: dict[str, list[Any]] = {c: [getattr(r, c, None) for r in records] for c in COLUMNS}
    values["kind"] = [r.kind.value for r in records]
    values["status"] = [r.status.value for r in records]
    values["updated"] = [now] * len(records)
    return pa.Table.from_arrays([column(values[f.name], f.type) for f in _ARROW_SCHEMA], schema=_ARROW_SCHEMA)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")
