"""Arrow ↔ numpy through buffers (store/columns.py) against pyarrow's own conversions: chunked, sliced, with
nulls, of every integer and float width, and strings with any Unicode."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given
from hypothesis import strategies as st

from clipdex.retrieval.store import columns as columns_module
from clipdex.retrieval.store.columns import among, column, equals, flags, integers, matches, numbers, strings

TYPES = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint32(),
    pa.uint64(),
    pa.float32(),
    pa.float64(),
]


@given(
    type=st.sampled_from(TYPES),
    chunks=st.lists(st.lists(st.integers(0, 100) | st.none(), max_size=20), max_size=4),
    start=st.integers(0, 5),
)
def test_numbers_equal_pyarrows_to_numpy(type, chunks, start):
    column = pa.chunked_array([pa.array(c, type) for c in chunks], type=type)
    column = column.slice(min(start, len(column)))
    got = numbers(column)
    want = column.to_numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if not column.null_count:
        assert got.dtype == want.dtype
    filled = numbers(column, fill=7)
    assert filled.dtype == np.dtype(type.to_pandas_dtype())
    assert filled.tolist() == [7 if v is None else v for v in column.to_pylist()]
    for chunk in column.chunks:  # an Array as well as a ChunkedArray
        np.testing.assert_array_equal(numbers(chunk), chunk.to_numpy(zero_copy_only=False))


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50))
def test_integers_equal_pa_array(values):
    got = integers(np.array(values, dtype=np.int64))
    assert got.equals(pa.array(values, pa.int64()))


@given(
    values=st.lists(st.text(max_size=12), max_size=20),
    probe=st.text(max_size=12),
    large=st.booleans(),
)
def test_strings_and_equals_match_pyarrow(values, probe, large):
    type = pa.large_string() if large else pa.string()
    got = strings(values, type)
    assert got.equals(pa.array(values, type))
    column = pa.chunked_array([pa.array([*values, None], type)])
    assert equals(column, probe).equals(pc.equal(column, pa.scalar(probe, type)))


@given(
    chunks=st.lists(
        st.lists(st.sampled_from(["ok", "failed", "image", "text", "é"]) | st.none(), max_size=12), max_size=4
    ),
    probe=st.sampled_from(["ok", "failed", "é", "missing"]),
    coded=st.booleans(),
    start=st.integers(0, 4),
)
def test_matches_equals_pyarrows_equal_with_nulls_as_no_match(chunks, probe, coded, start):
    column = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], type=pa.string())
    if coded:
        column = pa.chunked_array(
            [c.dictionary_encode() for c in column.chunks], type=pa.dictionary(pa.int32(), pa.string())
        )
    column = column.slice(min(start, len(column)))
    want = [v == probe for v in column.to_pylist()]
    assert matches(column, probe).tolist() == want


@given(
    chunks=st.lists(st.lists(st.text(alphabet="ab/é.", max_size=4) | st.none(), max_size=12), max_size=4),
    wanted=st.lists(st.text(alphabet="ab/é.", max_size=4), max_size=3),
    large=st.booleans(),
    coded=st.booleans(),
    start=st.integers(0, 4),
    computed=st.booleans(),
)
def test_among_equals_pyarrows_is_in_with_nulls_as_no_match(chunks, wanted, large, coded, start, computed):
    """A path or hash column holding any of a query's values: in Python up to `_PYTHON_ROWS` rows, through
    `pyarrow.compute.is_in` past them (forced here with `computed`), the same booleans either way."""
    type = pa.large_string() if large else pa.string()
    column = pa.chunked_array([pa.array(c, type) for c in chunks], type=type)
    if coded:
        column = pa.chunked_array([c.dictionary_encode() for c in column.chunks], type=pa.dictionary(pa.int32(), type))
    column = column.slice(min(start, len(column)))
    want = flags(pc.is_in(column, value_set=pa.array(wanted, type))) if len(column) else np.zeros(0, dtype=bool)
    assert want.tolist() == [v is not None and v in wanted for v in column.to_pylist()]
    limit = columns_module._PYTHON_ROWS
    try:
        columns_module._PYTHON_ROWS = -1 if computed else limit
        got = among(column, wanted)
    finally:
        columns_module._PYTHON_ROWS = limit
    assert got.dtype == bool and got.tolist() == want.tolist()


@given(chunks=st.lists(st.lists(st.booleans() | st.none(), max_size=40), max_size=4), start=st.integers(0, 9))
def test_flags_equal_the_booleans_with_nulls_false(chunks, start):
    column = pa.chunked_array([pa.array(c, pa.bool_()) for c in chunks], type=pa.bool_()).slice(0)
    column = column.slice(min(start, len(column)))
    assert flags(column).tolist() == [bool(v) for v in column.to_pylist()]


@given(
    data=st.data(),
    type=st.sampled_from([*TYPES, pa.string(), pa.large_string(), pa.bool_(), pa.timestamp("s")]),
    n=st.integers(0, 30),
)
def test_column_equals_pa_array_with_nulls(data, type, n):
    """What the catalog stages for DuckDB (Python values, None a null) equals pyarrow's own conversion: values,
    nulls and type, for strings with any Unicode, every integer and float width, booleans, and a type it leaves
    to pyarrow."""
    if pa.types.is_string(type) or pa.types.is_large_string(type):
        value = st.text()
    elif pa.types.is_boolean(type):
        value = st.booleans()
    elif pa.types.is_floating(type):
        value = st.floats(width=type.bit_width, allow_nan=False)
    elif pa.types.is_timestamp(type):
        value = st.integers(0, 2**40)
    else:
        signed = pa.types.is_signed_integer(type)
        value = st.integers(
            -(2 ** (type.bit_width - 1)) if signed else 0, 2 ** (type.bit_width - (1 if signed else 0)) - 1
        )
    values = data.draw(st.lists(value | st.none(), min_size=n, max_size=n))
    got, want = column(values, type), pa.array(values, type)
    got.validate(full=True)
    assert got.type == want.type and got.null_count == want.null_count
    assert got.equals(want), (got, want)
