"""What an index holds: items of two kinds, their catalog columns, and a row to write."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from clipdex.retrieval.config import Kind


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"


@dataclass
class Record:
    """A catalog row to write. `vector` is set for new embeddings, (shard, row) for reused ones.

    `link` is, for a text, the image path its caption file names (canonical, whether or not it exists);
    `path` is that image while it is indexed, else None.
    """

    id: int
    kind: Kind
    source: str | None
    path: str | None
    text: str | None
    size: int | None = None
    mtime: float | None = None
    hash: str | None = None
    width: int | None = None
    height: int | None = None
    status: Status = Status.OK
    error: str | None = None
    vector: np.ndarray | None = None
    shard: int | None = None
    row: int | None = None
    link: str | None = None
    taken_at: float | None = None  # from EXIF (images)
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None
    ocr: str | None = None  # the words read in an image (`index --ocr`); None: not read
    same_as: Record | None = None  # share this record's vector (identical content met earlier in the same run)
