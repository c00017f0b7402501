"""PAWN inside the LM actor, and the feature cache it is trained from.

Miralles-González et al. 2025 (PAWN; the head and its math are in ``operators.pawn``). Two adapters:

* ``build_head(params, model_info) -> PawnLMHead``: a ``Head`` for the ``lm`` stage. It loads a saved
  head once (``load_pawn``) onto the LM's device and, per micro-batch, feeds it the on-device metrics
  m_t = [entropy, max_logprob, logprob, rank, top_p] and the last layer's hidden states h_t, cut to
  the first 512 positions, returning ``pawn_score`` = P(machine-written) = sigmoid(PAWN(m, h)).

      - op: lm
        model: {name: smollm2, path: ...}
        heads: [{kind: "operators.pawn_head:build_head", params: {path: ~/.cache/curate/demo/pawn}}]

* ``features_from_documents(table, model)``: a documents table written by an ``lm`` stage with
  ``cache_hidden: [last]`` (and the five metrics) -> the PAWN feature cache (``metrics`` [T][5],
  ``hidden`` [T][H], ``label``) that ``train_pawn`` / ``curate pawn train`` read.

Both use the engine's alignment, which is PAWN's: row t of the metrics scores x_{t+1}, row t of the
hidden states is e_t, the state that predicted it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from operators.pawn import METRIC_NAMES, load_pawn

#: Positions PAWN reads per document (the paper's truncation).
MAX_TOKENS = 512
LAST = -1  # HF hidden_states index of the last (normed) layer


class PawnLMHead:
    """The Head: a PAWN model on the LM's device, scoring each micro-batch of the LM stage."""

    layers = [LAST]

    def __init__(self, path: str, model_info: Any, column: str = "pawn_score",
                 max_tokens: int = MAX_TOKENS) -> None:
        self.head = load_pawn(str(Path(path).expanduser()) if "://" not in path else path,
                              device=model_info.device)
        expected = self.head.config.hidden_size
        if model_info.hidden_size != expected:
            raise ValueError(f"PAWN head at {path} was trained on hidden size {expected}, but model "
                             f"{model_info.name!r} has {model_info.hidden_size}")
        self.column, self.max_tokens = column, max_tokens

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.column, pa.float64())])

    @torch.inference_mode()
    def __call__(self, metrics: dict[str, torch.Tensor], hidden: dict[int, torch.Tensor],
                 mask: torch.Tensor) -> dict[str, list]:
        missing = [k for k in METRIC_NAMES if k not in metrics]
        if missing:
            raise KeyError(f"PAWN needs the lm metrics {list(METRIC_NAMES)}; missing {missing} "
                           "(leave the lm stage's `metrics` unset, or list them)")
        n = self.max_tokens
        m = torch.stack([metrics[k][:, :n] for k in METRIC_NAMES], dim=-1)   # [B,T,5]
        h = hidden[LAST][:, :n]                                              # [B,T,H]
        keep = mask[:, :n]                                                   # [B,T]
        p = self.head.predict_proba(m, h, keep)                              # [B]
        return {self.column: [float(x) if ok else None
                              for x, ok in zip(p.double().cpu().tolist(), keep.any(dim=1).tolist(), strict=True)]}


def build_head(params: dict[str, Any], model_info: Any) -> PawnLMHead:
    """Head factory for the lm stage: ``params = {path, column = "pawn_score", max_tokens = 512}``."""
    unknown = set(params) - {"path", "column", "max_tokens"}
    if unknown or "path" not in params:
        raise ValueError(f"PAWN head params: need 'path' (a head saved by `curate pawn train`), "
                         f"optional 'column', 'max_tokens'; got {sorted(params)}")
    return PawnLMHead(params["path"], model_info, params.get("column", "pawn_score"),
                      int(params.get("max_tokens", MAX_TOKENS)))


# ---------------------------------------------------------------------------- feature cache

FEATURE_SCHEMA = pa.schema([("metrics", pa.list_(pa.list_(pa.float32()))),
                            ("hidden", pa.list_(pa.list_(pa.float32()))), ("label", pa.int8())])


def features_from_documents(table: pa.Table, model: str, layer: str | int = "last",
                            max_tokens: int = MAX_TOKENS, label: str = "label") -> pa.Table:
    """Documents with ``<model>__{entropy,max_logprob,logprob,rank,top_p}`` and ``<model>__hidden_<layer>``
    -> the PAWN feature cache (``operators.pawn`` module docstring), cut to ``max_tokens`` rows.

    Rows without a label are dropped; skipped documents (null metrics) keep T = 0 (train_pawn skips them).
    """
    names = [f"{model}__{k}" for k in METRIC_NAMES] + [f"{model}__hidden_{layer}", label]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise ValueError(f"not a documents table of an lm stage with cache_hidden: [{layer}] and the PAWN "
                         f"metrics: missing {missing}")
    table = table.filter(pc.is_valid(table.column(label)))
    per_metric = [_ragged(table.column(f"{model}__{k}")) for k in METRIC_NAMES]
    rows = []
    for i in range(table.num_rows):
        cols = [m[i][:max_tokens] for m in per_metric]
        rows.append(np.stack(cols, axis=1) if all(len(c) == len(cols[0]) for c in cols) else None)
        if rows[-1] is None:
            raise ValueError(f"row {i}: the five metric lists differ in length")
    hidden = pc.list_slice(table.column(f"{model}__hidden_{layer}").combine_chunks().fill_null([]),
                           0, max_tokens)
    lengths = [len(r) for r in rows]
    hidden_lengths = pc.list_value_length(hidden).to_numpy(zero_copy_only=False)
    bad = [i for i, (a, b) in enumerate(zip(lengths, hidden_lengths, strict=True)) if a != b]
    if bad:
        raise ValueError(f"row {bad[0]}: {lengths[bad[0]]} metric rows but {hidden_lengths[bad[0]]} hidden rows")
    metrics = _nested([r.astype(np.float32) for r in rows])
    labels = pc.cast(table.column(label), pa.int8())
    return pa.table([metrics, hidden.cast(FEATURE_SCHEMA.field("hidden").type), labels],
                    schema=FEATURE_SCHEMA)


def _ragged(column: pa.ChunkedArray) -> list[np.ndarray]:
    arr = column.combine_chunks()
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(arr) else []


def _nested(rows: list[np.ndarray]) -> pa.Array:
    """[T_i, W] float32 arrays -> list<list<float32>>."""
    width = len(METRIC_NAMES)
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    offsets = pa.array(np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32))
    return pa.ListArray.from_arrays(offsets, inner).cast(FEATURE_SCHEMA.field("metrics").type)
