"""Arrow helpers shared by the operators."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def ragged_rows(column: pa.ChunkedArray | pa.Array, name: str) -> list[np.ndarray]:
    """list<list<float>> column -> one float32 [T_i, width] array per row (null rows: T = 0)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = pc.list_flatten(arr)                                      # list<float> [ΣT]
    widths = pc.list_value_length(rows).fill_null(0).to_numpy(zero_copy_only=False)
    if len(widths) and (widths != widths[0]).any():
        raise ValueError(f"column {name!r}: inner lists have different lengths")
    width = int(widths[0]) if len(widths) else 0
    flat = pc.list_flatten(rows).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    values = flat.reshape(len(rows), width)
    return np.split(values, np.cumsum(lengths)[:-1])


def ragged(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A list<number> column as one float64/int64 numpy array per row (None for null rows)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    parts = np.split(flat, np.cumsum(lengths)[:-1]) if len(arr) else []
    return [p if ok else None for p, ok in zip(parts, valid, strict=True)]
