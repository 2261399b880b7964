"""The snapshot's full-text index, `words-G.sqlite`: the words of each item (an image's OCR text and captions, a
text's own) in SQLite's FTS5, ranked by its BM25.

Two FTS5 tables over the same documents: `grams` (the trigram tokenizer) finds a query word anywhere inside a
document's words, so a prefix, a suffix or part of a compound matches ("voice" finds "INVOICE"); `terms` (unicode61)
finds words of one or two characters, which trigrams cannot hold, as word prefixes. Text is case-folded and its
accents removed on both sides, so "zurich" finds "Zürich". A query matches a document that holds every one of its
words; those are ranked by BM25 over the trigram table (over the word table when every word is short).

Like the rest of a snapshot, the file is written once, beside the others, and only read after: readers open it
read-only and immutable, so no journal or lock file is ever made next to it, and keep it open for as long as they
search that snapshot (a newer publish deletes the file; the open descriptor still reads it).
"""

from __future__ import annotations

import errno
import re
import shutil
import sqlite3
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORDS = "words"
SUFFIX = ".sqlite"
_WORD = re.compile(r"\w+", re.UNICODE)
_SCHEMA = (
    "CREATE VIRTUAL TABLE grams USING fts5(kind UNINDEXED, body, tokenize = 'trigram')",
    "CREATE VIRTUAL TABLE terms USING fts5(kind UNINDEXED, body, tokenize = 'unicode61 remove_diacritics 2')",
)


def fold(text: str) -> str:
    """Case-folded, accents removed (NFKD, combining marks dropped): how documents and queries are compared."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def query_words(text: str) -> list[str]:
    """The words of a query, folded, each once, in order."""
    return list(dict.fromkeys(_WORD.findall(fold(text))))


def build(path: Path, documents: list[tuple[int, str, str]], previous: Path | None = None) -> int:
    """Write the full-text index of `documents` ((id, kind, body) rows) to `path`; return how many. With the
    `previous` generation's file, a copy of it is brought up to date (only the documents that changed are indexed
    again; BM25's statistics follow the deletions exactly), else it is built from nothing."""
    rows = [(int(i), kind, fold(body)) for i, kind, body in documents]
    if previous is not None and previous.is_file():
        try:
            shutil.copyfile(previous, path)
            _write(path, rows, update=True)
            return len(rows)
        except (OSError, sqlite3.Error):  # a damaged or unreadable previous file: build it whole instead
            pass
    path.unlink(missing_ok=True)  # from nothing: never into what a failed copy or update left
    try:
        _write(path, rows, update=False)
    except sqlite3.OperationalError:  # its own words name a failing or full disk (errors.disk_error reads them)
        raise
    except sqlite3.DatabaseError as e:  # a file made just now that reads back "malformed": the disk failed
        raise OSError(errno.EIO, f"the full-text index read back damaged ({e})", str(path)) from None
    return len(rows)


def _write(path: Path, rows: list[tuple[int, str, str]], *, update: bool) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode = OFF")  # a temp file that only a finished write makes current
        con.execute("PRAGMA synchronous = OFF")  # the caller fsyncs it before it becomes current
        if update:
            held = {int(i): (k, b) for i, k, b in con.execute("SELECT rowid, kind, body FROM grams")}
            wanted = {i: (k, b) for i, k, b in rows}
            gone = [(i,) for i, doc in held.items() if wanted.get(i) != doc]
            rows = [(i, k, b) for i, k, b in rows if held.get(i) != (k, b)]
            for table in ("grams", "terms"):
                con.executemany(f"DELETE FROM {table} WHERE rowid = ?", gone)
        else:
            for statement in _SCHEMA:
                con.execute(statement)
        for table in ("grams", "terms"):
            con.executemany(f"INSERT INTO {table} (rowid, kind, body) VALUES (?, ?, ?)", rows)
            if not update:
                con.execute(f"INSERT INTO {table} ({table}) VALUES ('optimize')")
        con.commit()
    finally:
        con.close()


class WordIndex:
    """A snapshot's full-text index, open for searching (any thread; one query at a time)."""

    def __init__(self, path: Path):
        self.path = path
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def match(self, text: str, kind: str, limit: int) -> Matches:
        """The documents of `kind` holding every word of `text` (as a substring; a word under three characters as a
        word prefix), best BM25 first, at most `limit`."""
        words = query_words(text)
        if not words:
            return Matches(np.zeros(0, dtype=np.int64), np.zeros(0), True)
        long = [w for w in words if len(w) >= 3]
        short = [w for w in words if len(w) < 3]
        if long:
            sql = "SELECT rowid, bm25(grams) FROM grams WHERE grams MATCH ? AND kind = ?"
            params: list[Any] = [_all(long, prefix=False), kind]
            if short:
                sql += " AND rowid IN (SELECT rowid FROM terms WHERE terms MATCH ?)"
                params.append(_all(short, prefix=True))
            sql += " ORDER BY bm25(grams), rowid LIMIT ?"
        else:
            sql = "SELECT rowid, bm25(terms) FROM terms WHERE terms MATCH ? AND kind = ? ORDER BY bm25(terms), rowid LIMIT ?"
            params = [_all(short, prefix=True), kind]
        with self._lock:
            found = self._con.execute(sql, [*params, limit + 1]).fetchall()
        exhausted = len(found) <= limit
        found = found[:limit]
        ids = np.array([int(r[0]) for r in found], dtype=np.int64)
        return Matches(ids, -np.array([float(r[1]) for r in found], dtype=np.float64), exhausted)

    def close(self) -> None:
        self._con.close()


@dataclass(frozen=True)
class Matches:
    ids: np.ndarray  # best first
    scores: np.ndarray  # BM25, higher is better (FTS5's own is negated)
    exhausted: bool  # no more documents match


def _all(words: list[str], *, prefix: bool) -> str:
    """An FTS5 query that every word must match: each one quoted (so none is read as an operator)."""
    star = "*" if prefix else ""
    return " AND ".join('"' + w.replace('"', '""') + '"' + star for w in words)
