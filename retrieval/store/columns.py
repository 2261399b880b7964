"""Arrow columns as numpy arrays, and numpy arrays and Python values as Arrow, through Arrow's buffers.

pyarrow's own conversions (`Array.to_numpy`, `pa.array`, `pa.scalar`, a Python value handed to a compute function)
go through its pandas layer, which imports pandas wherever pandas is installed, whether or not a pandas object is
involved: 0.14-0.19 s, a fifth of a cold `clipdex search` on the development machine. What a search converts (the
ids and locations of the snapshot's items, the positions of its hits, the values it compares columns with) is
converted here instead, from and into the same buffers, giving the same arrays. Anything else (nulls, nested types)
falls back to pyarrow's conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def numbers(column: Any) -> np.ndarray:
    """An integer or floating-point column (Array or ChunkedArray) as one numpy array of its own dtype."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = _numpy_dtype(column.type)
    if dtype is None:
        return np.asarray(column.to_numpy(zero_copy_only=False))
    parts = []
    for chunk in chunks:
        if not len(chunk):
            continue
        if chunk.null_count:
            parts.append(np.asarray(chunk.to_numpy(zero_copy_only=False)))
        else:
            data = chunk.buffers()[1]
            parts.append(np.frombuffer(data, dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize))
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def integers(values: np.ndarray) -> pa.Array:
    """An int64 Arrow array holding `values` (positions for `Table.take`, ids for `is_in`)."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def strings(values: Sequence[str], type: pa.DataType | None = None) -> pa.Array:
    """A string (or large string) Arrow array holding `values`."""
    type = type or pa.string()
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64 if pa.types.is_large_string(type) else np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(type, len(encoded), buffers)


def equals(column: Any, value: str) -> Any:
    """Where a string column equals `value` (null where the column is null), as Arrow booleans."""
    import pyarrow.compute as pc

    return pc.equal(column, strings([value], column.type)[0])


def _numpy_dtype(type: pa.DataType) -> np.dtype | None:
    if pa.types.is_integer(type):
        kind = "i" if pa.types.is_signed_integer(type) else "u"
    elif pa.types.is_floating(type):
        kind = "f"
    else:
        return None
    return np.dtype(f"{kind}{type.bit_width // 8}")
