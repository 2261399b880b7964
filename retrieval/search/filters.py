"""Filters: which items a search may return, decided by DuckDB over the published snapshot's item rows.

`--where` is a DuckDB boolean expression over the columns below, run in an in-memory DuckDB with external access
disabled and the configuration locked, so a filter cannot read, write or fetch anything. Shorthands: `in_folder`
(at or under a folder), `after`/`before` (the photo's date: its EXIF capture time, else the file's mtime; after is
inclusive, before exclusive), `min_score` (applied to the ranked results). The HTTP API takes the shorthands only.

Columns: id, kind ('image' | 'text'), path, folder, name, ext (lower case, no dot), text (an image's caption, or the
text), source (the folder or caption file it came from), width, height, bytes, mtime and taken_at (TIMESTAMP, UTC),
camera, lat, lon, label and label_score (what `clipdex classify` stored), and ocr (the words read in an image,
`index --ocr`; "" when it holds none).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.paths import canonical

COLUMNS = (
    "id",
    "kind",
    "path",
    "folder",
    "name",
    "ext",
    "text",
    "source",
    "width",
    "height",
    "bytes",
    "mtime",
    "taken_at",
    "camera",
    "lat",
    "lon",
    "label",
    "label_score",
    "ocr",
)

_VIEW = """
SELECT id, kind, path,
       regexp_replace(path, '/[^/]*$', '') AS folder,
       regexp_extract(path, '[^/]*$') AS name,
       lower(regexp_extract(path, '\\.([^./]*)$', 1)) AS ext,
       {text} AS text, source, width, height, size AS bytes,
       to_timestamp(mtime)::TIMESTAMP AS mtime,
       {taken_at} AS taken_at, {camera} AS camera, {lat} AS lat, {lon} AS lon,
       {label} AS label, {label_score} AS label_score, {ocr} AS ocr
FROM _items WHERE status = 'ok'
"""


@dataclass(frozen=True)
class Filter:
    where: str | None = None
    in_folder: Path | None = None
    after: datetime | None = None
    before: datetime | None = None
    min_score: float | None = None

    @classmethod
    def build(
        cls,
        *,
        where: str | None = None,
        in_folder: Path | None = None,
        after: str | None = None,
        before: str | None = None,
        min_score: float | None = None,
        option_prefix: str = "--",
    ) -> Filter | None:
        """A filter from what a user typed (dates as text), or None when nothing narrows the search; a bad date is
        named as the option the user gave (`--after` on the command line, `after` in the HTTP API)."""
        f = cls(
            where=where,
            in_folder=in_folder,
            after=parse_date(after, option=f"{option_prefix}after") if after else None,
            before=parse_date(before, option=f"{option_prefix}before") if before else None,
            min_score=min_score,
        )
        return f if f.to_json() else None

    @property
    def selects(self) -> bool:
        """Whether it narrows the items searched (min_score only trims the ranked results)."""
        return any(x is not None for x in (self.where, self.in_folder, self.after, self.before))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.where is not None:
            out["where"] = self.where
        if self.in_folder is not None:
            out["in"] = str(canonical(self.in_folder))
        for name in ("after", "before"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        if self.min_score is not None:
            out["min_score"] = self.min_score
        return out


def parse_date(text: str, *, option: str) -> datetime:
    """`2024-05-01` or an ISO date-time; read as UTC when it names no zone (as photo dates are compared)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"{option} takes a date like 2024-05-01 or 2024-05-01T18:30 (got {text!r})") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def matching_ids(table: Any, f: Filter, kind: str) -> np.ndarray:
    """Ids of the `kind` items the filter keeps, ascending."""
    import duckdb

    names = set(table.column_names)
    con = duckdb.connect(":memory:")
    try:
        con.register("_items", table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        view = _VIEW.format(
            text="CASE WHEN kind = 'image' THEN caption ELSE text END" if "caption" in names else "text",
            **{c: (c if c in names else "NULL") for c in ("camera", "lat", "lon", "label", "label_score", "ocr")},
            taken_at="to_timestamp(taken_at)::TIMESTAMP" if "taken_at" in names else "NULL::TIMESTAMP",
        )
        clauses: list[str] = ["kind = ?"]
        params: list[Any] = [kind]
        if f.in_folder is not None:
            folder = str(canonical(f.in_folder)).rstrip("/")
            clauses.append("(path = ? OR starts_with(path, ?))")
            params += [folder, folder + "/"]
        date = "coalesce(taken_at, mtime)"
        if f.after is not None:
            clauses.append(f"{date} >= ?")
            params.append(f.after.astimezone(timezone.utc).replace(tzinfo=None))
        if f.before is not None:
            clauses.append(f"{date} < ?")
            params.append(f.before.astimezone(timezone.utc).replace(tzinfo=None))
        if f.where is not None:
            _check_expression(f.where)
            clauses.append(f"({f.where})")
        sql = f"SELECT id FROM ({view}) WHERE {' AND '.join(clauses)} ORDER BY id"
        try:
            rows = con.execute(sql, params).fetchnumpy()["id"]
        except duckdb.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"--where {f.where!r}: {first} (columns: {', '.join(COLUMNS)})") from None
        return np.asarray(rows, dtype=np.int64)
    finally:
        con.close()


def _check_expression(where: str) -> None:
    import duckdb

    try:
        statements = duckdb.extract_statements(f"SELECT 1 WHERE ({where})")
    except duckdb.Error as e:
        raise InputError(f"--where {where!r} is not an SQL expression: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise InputError(f"--where {where!r} must be one boolean expression, not several statements")
