"""PAWN inside the LM actor (the feature cache it is trained from is ``operators.detection.features``).

Miralles-González et al. 2025 (PAWN; the head and its math are in ``operators.detection.pawn``). Two adapters:

* ``build_head(params, model_info) -> PawnLMHead``: a ``Head`` for the ``lm`` stage. It loads a saved
  head once (``load_pawn``) onto the LM's device and, per micro-batch, feeds it the on-device metrics
  m_t = [entropy, max_logprob, logprob, rank, top_p] and the last layer's hidden states h_t, cut to
  the first 512 positions, returning ``pawn_score`` = P(machine-written) = sigmoid(PAWN(m, h)).

      - op: lm
        model: {name: smollm2, path: ...}
        heads: [{kind: "operators.detection.head:build_head", params: {path: ~/.cache/curate/demo/pawn}}]

* ``features_from_documents(table, model)``: a documents table written by an ``lm`` stage with
  ``cache_hidden: [last]`` (and the five metrics) -> the PAWN feature cache (``metrics`` [T][5],
  ``hidden`` [T][H], ``label``) that ``train_pawn`` / ``curate pawn train`` read.

Both use the engine's alignment, which is PAWN's: row t of the metrics scores x_{t+1}, row t of the
hidden states is e_t, the state that predicted it, and row t + 1 is e_{t+1}, the state after reading
x_{t+1} that the gate also reads. The engine keeps every token's state, so the hidden states have
one row more than the metrics and the last scored row's e_{t+1} is real, not zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from operators.detection.head_params import PawnHeadParams
from operators.detection.pawn import MAX_TOKENS, METRIC_NAMES, load_pawn

#: Positions PAWN reads per document (the paper's truncation).
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
        h = hidden[LAST][:, :n + 1]                                          # [B,T+1,H]: e_0 … e_T
        keep = mask[:, :n]                                                   # [B,T]
        p = self.head.predict_proba(m, h, keep)                              # [B]
        return {self.column: [float(x) if ok else None
                              for x, ok in zip(p.double().cpu().tolist(), keep.any(dim=1).tolist(), strict=True)]}


def build_head(params: dict[str, Any], model_info: Any) -> PawnLMHead:
    """Head factory for the lm stage: ``params`` as ``PawnHeadParams`` (path, column, max_tokens)."""
    p = PawnHeadParams.model_validate(params)
    return PawnLMHead(p.path, model_info, p.column, p.max_tokens)
