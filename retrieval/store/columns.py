"""Arrow columns as numpy arrays, and numpy arrays and Python values as Arrow, through Arrow's buffers.

pyarrow's own conversions (`Array.to_numpy`, `pa.array`, `pa.scalar`, a Python value handed to a compute function)
go through its pandas layer, which imports pandas wherever pandas is installed, whether or not a pandas object is
involved: 0.14-0.19 s, a fifth of a cold `clipdex search` on the development machine. What a search converts (the
ids and locations of the snapshot's items, the positions of its hits, the values it compares columns with) is
converted here instead, from and into the same buffers, giving the same arrays. Anything else (nulls, nested types)
falls back to pyarrow's conversion.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def numbers(column: Any, fill: float | None = None) -> np.ndarray:
    """An integer or floating-point column (Array or ChunkedArray) as one numpy array of its own dtype; its nulls
    read as `fill` when one is given (else pyarrow converts a chunk with nulls, as floats with NaN)."""
    dtype = _numpy_dtype(column.type)
    if dtype is None:
        return np.asarray(column.to_numpy(zero_copy_only=False))
    parts = []
    for chunk in _chunks(column):
        if not len(chunk):
            continue
        if chunk.null_count and fill is None:
            parts.append(np.asarray(chunk.to_numpy(zero_copy_only=False)))
            continue
        validity, data = chunk.buffers()[:2]
        values = np.frombuffer(data, dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)
        if chunk.null_count:
            values = np.where(_bits(validity, chunk.offset, len(chunk)), values, np.asarray(fill).astype(dtype))
        parts.append(values)
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


def column(values: Sequence[Any], type: pa.DataType) -> pa.Array:
    """Python values (None for a null) as an Arrow array of `type`: strings, integers, floats and booleans through
    Arrow's buffers, as `pa.array(values, type)` makes them; any other type through `pa.array` itself."""
    text, dtype = pa.types.is_string(type) or pa.types.is_large_string(type), _numpy_dtype(type)
    if not text and dtype is None and not pa.types.is_boolean(type):
        return pa.array(values, type)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    if pa.types.is_boolean(type):
        bits = np.packbits(np.fromiter((bool(v) for v in values), dtype=bool, count=len(values)), bitorder="little")
        return pa.Array.from_buffers(type, len(values), [validity, pa.py_buffer(bits)])
    if text:
        return pa.Array.from_buffers(
            type, len(values), [validity, *strings([v or "" for v in values], type).buffers()[1:]]
        )
    data = np.array([0 if v is None else v for v in values], dtype=dtype)
    return pa.Array.from_buffers(type, len(values), [validity, pa.py_buffer(data)])


def equals(column: Any, value: str) -> Any:
    """Where a string column equals `value` (null where the column is null), as Arrow booleans."""
    import pyarrow.compute as pc

    return pc.equal(column, strings([value], column.type)[0])


def matches(column: Any, value: str) -> np.ndarray:
    """Where a string column (plain or dictionary-encoded) equals `value`, as numpy booleans (a null is no match)."""
    return among(column, (value,))


_PYTHON_ROWS = 1 << 16  # up to this many rows, a plain string column is compared in Python (5 ms per 64k paths)


def among(column: Any, values: Collection[str]) -> np.ndarray:
    """Where a string column (plain or dictionary-encoded) holds one of `values`, as numpy booleans (a null is in
    none). A dictionary is compared once per distinct value and its codes looked up, so a column of a few values (an
    item table's `kind` or `status`) needs no Arrow compute function; nor does a plain column of up to
    `_PYTHON_ROWS` rows (a library's paths, an image query looking for itself among them). A longer one goes through
    `pyarrow.compute.is_in`, whose import (0.06 s) is small beside the rows then."""
    wanted = frozenset(values)
    if len(column) > _PYTHON_ROWS and not pa.types.is_dictionary(column.type):
        import pyarrow.compute as pc

        return flags(pc.is_in(column, value_set=strings(sorted(wanted), column.type)))
    parts = [np.zeros(0, dtype=bool)]
    for chunk in _chunks(column):
        if pa.types.is_dictionary(chunk.type) and not chunk.null_count:
            hit = np.array([v in wanted for v in chunk.dictionary.to_pylist()], dtype=bool)
            parts.append(hit[numbers(chunk.indices)])
        else:
            parts.append(np.fromiter((v in wanted for v in chunk.to_pylist()), dtype=bool, count=len(chunk)))
    return np.concatenate(parts)


def flags(column: Any) -> np.ndarray:
    """A boolean column as numpy booleans, a null as False (Arrow packs booleans, and validity, into bits)."""
    parts = [np.zeros(0, dtype=bool)]
    for chunk in _chunks(column):
        validity, data = chunk.buffers()[:2]
        values = _bits(data, chunk.offset, len(chunk))
        if validity is not None and chunk.null_count:
            values &= _bits(validity, chunk.offset, len(chunk))
        parts.append(values)
    return np.concatenate(parts)


def _chunks(column: Any) -> list[Any]:
    """The Arrays of a ChunkedArray, or an Array as its own one chunk."""
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def _bits(buffer: Any, offset: int, length: int) -> np.ndarray:
    if buffer is None or not length:
        return np.zeros(length, dtype=bool)
    bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), bitorder="little")
    return bits[offset : offset + length].astype(bool)


def _numpy_dtype(type: pa.DataType) -> np.dtype | None:
    if pa.types.is_integer(type):
        kind = "i" if pa.types.is_signed_integer(type) else "u"
    elif pa.types.is_floating(type):
        kind = "f"
    else:
        return None
    return np.dtype(f"{kind}{type.bit_width // 8}")
