"""The PAWN feature cache: made from an ``lm`` stage's ``documents`` rows, read by training.

Feature cache (Parquet file/URL or a pyarrow Table, one row per document; other columns ignored):

    metrics  list<list<float32>>  [T][5]  m_t (``operators.detection.pawn``), in the order of ``METRIC_NAMES``
    hidden   list<list<float32>>  [T+1][H]  e_0 … e_T: e_t made row t, e_{t+1} read it (older caches: [T][H])
    label    integer or bool              1 = machine-written, 0 = human-written

(``fixed_size_list`` inner lists are accepted too.) Documents are truncated to their first
``max_tokens`` (512) metric rows (+ 1 hidden row); documents with T = 0 are skipped in training.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.arrow import ragged, ragged_rows
from operators.detection.pawn import MAX_TOKENS, METRIC_NAMES


def read_features(features: str | pa.Table) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The feature cache (see the module docstring) as (metrics [T_i,5], hidden [T_i,H], labels [N])."""
    if not isinstance(features, pa.Table):
        with fsspec.open(features, "rb") as f:
            features = pq.read_table(f, columns=["metrics", "hidden", "label"])
    metrics, hidden = ragged_rows(features["metrics"], "metrics"), ragged_rows(features["hidden"], "hidden")
    labels = features["label"].to_numpy(zero_copy_only=False).astype(np.float32)
    if any(m.shape[1] != len(METRIC_NAMES) for m in metrics if len(m)):
        raise ValueError(f"metrics rows must have {len(METRIC_NAMES)} values {METRIC_NAMES}")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("label must be 0 (human) or 1 (machine-written)")
    return metrics, hidden, labels


# ---------------------------------------------------------------------------- feature cache

FEATURE_SCHEMA = pa.schema([("metrics", pa.list_(pa.list_(pa.float32()))),
                            ("hidden", pa.list_(pa.list_(pa.float32()))), ("label", pa.int8())])


def features_from_documents(table: pa.Table, model: str, layer: str | int = "last",
                            max_tokens: int = MAX_TOKENS, label: str = "label") -> pa.Table:
    """Documents with ``<model>__{entropy,max_logprob,logprob,rank,top_p}`` and ``<model>__hidden_<layer>``
    -> the PAWN feature cache (module docstring), cut to ``max_tokens`` rows.

    Rows without a label are dropped; skipped documents (null metrics) keep T = 0 (train_pawn skips them).
    """
    names = [f"{model}__{k}" for k in METRIC_NAMES] + [f"{model}__hidden_{layer}", label]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise ValueError(f"not a documents table of an lm stage with cache_hidden: [{layer}] and the PAWN "
                         f"metrics: missing {missing}")
    table = table.filter(pc.is_valid(table.column(label)))
    per_metric = [[np.zeros(0, np.float32) if r is None else r for r in ragged(table.column(f"{model}__{k}"))]
                  for k in METRIC_NAMES]
    rows = []
    for i in range(table.num_rows):
        cols = [m[i][:max_tokens] for m in per_metric]
        rows.append(np.stack(cols, axis=1) if all(len(c) == len(cols[0]) for c in cols) else None)
        if rows[-1] is None:
            raise ValueError(f"row {i}: the five metric lists differ in length")
    hidden = pc.list_slice(table.column(f"{model}__hidden_{layer}").combine_chunks().fill_null([]),
                           0, max_tokens + 1)
    lengths = [len(r) for r in rows]
    hidden_lengths = pc.list_value_length(hidden).to_numpy(zero_copy_only=False)
    # e_0 … e_T for T metric rows (T + 1), the same T for a cut or old cache; skipped rows: 0 and 0
    bad = [i for i, (a, b) in enumerate(zip(lengths, hidden_lengths, strict=True))
           if b not in (a, a + 1) or (a == 0) != (b == 0)]
    if bad:
        raise ValueError(f"row {bad[0]}: {lengths[bad[0]]} metric rows but {hidden_lengths[bad[0]]} hidden rows")
    metrics = _nested([r.astype(np.float32) for r in rows])
    labels = pc.cast(table.column(label), pa.int8())
    return pa.table([metrics, hidden.cast(FEATURE_SCHEMA.field("hidden").type), labels],
                    schema=FEATURE_SCHEMA)


def _nested(rows: list[np.ndarray]) -> pa.Array:
    """[T_i, W] float32 arrays -> list<list<float32>>."""
    width = len(METRIC_NAMES)
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    offsets = pa.array(np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32))
    return pa.ListArray.from_arrays(offsets, inner).cast(FEATURE_SCHEMA.field("metrics").type)
