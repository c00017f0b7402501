"""The SAE head: sparse sample embeddings computed inside the LM actor, on the LM's device.

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations". For a document with layer-L residual states h_t (HF ``hidden_states[L]``) the head
encodes every token with a sparse autoencoder and mean-pools the codes:

    z_t = SAE.encode(h_t)                            [d_sae], sparse (TopK: k non-zeros)
    e   = (1 / |P|) Σ_{t ∈ P} z_t                     the sample embedding
    P   = {t : t ≥ skip_first, t < n - 1}             pooled positions

The engine hands heads the states of x_0 … x_{n-2} (the last token's state predicts nothing and
is not kept). ``skip_first`` (default 1) drops x_0: the first position is an attention sink whose
residual norm is ~100× the others (SmolLM2-135M, layer 15: ~23,000 vs ~150), so it would
dominate both the SAE's training loss and the mean. A document with no pooled position gets the
zero embedding (similarity 0).

Columns, for a head named ``<name>`` (default ``sae``):

    <name>__sae_idx       list<int32>     non-zero latents of e, ascending
    <name>__sae_val       list<float32>   their values (> 0)
    <name>__hidden_mean   list<float32>   (1 / |P|) Σ_{t ∈ P} h_t, [H]; only with hidden_mean: true

In a pipeline (kind ``operators.sae.head:build_head``; the short name ``sae`` resolves where this
module has been imported, e.g. through ``operators.registry``)::

    - op: lm
      model: {name: smollm2, path: ...}
      heads: [{kind: "operators.sae.head:build_head", params: {sae: DIR_OR_URL, layer: 15, name: sae}}]

Outside Ray, ``embed_texts`` runs the same head through a ``TorchEngine`` (target examples,
evaluation) and ``collect_activations`` gathers the pooled positions' states (SAE training).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from operators.lm.heads import ModelInfo, SAEHeadParams
from operators.sae.io import load_sae
from operators.sae.math import to_sparse
from operators.sae.model import SparseAutoencoder

#: Elements of one [rows, d_sae] code buffer (64 MiB in float32): bounds memory for wide SAEs.
CODE_BUFFER = 1 << 24


def idx_column(name: str) -> str:
    return f"{name}__sae_idx"


def val_column(name: str) -> str:
    return f"{name}__sae_val"


def hidden_mean_column(name: str) -> str:
    return f"{name}__hidden_mean"


# ---------------------------------------------------------------------------------------------
# Loading with a clear shape check
# ---------------------------------------------------------------------------------------------


def _has(url: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + name)
    return fs.exists(root)


def sae_weights_file(path: str, layer: int) -> tuple[str, int | None]:
    """(weights file, sub-layer) of the SAE at ``path``: ``layers.<layer>/`` when present, else flat."""
    path = os.fspath(path)
    sub = path.rstrip("/") + f"/layers.{layer}"
    for where, pick in ((sub, layer), (path, None)):
        for name in ("sae_weights.safetensors", "sae.safetensors"):
            if _has(where, name):
                return f"{where.rstrip('/')}/{name}", pick
    raise FileNotFoundError(f"no SAE at {path}: expected {path}/layers.{layer}/ or {path}/ holding "
                            "cfg.json + sae.safetensors (sparsify) or sae_weights.safetensors (SAELens)")


def load_head_sae(path: str, layer: int, hidden_size: int, model: str = "the model") -> SparseAutoencoder:
    """Load the SAE for ``layer`` and check that it reads vectors of the model's hidden size."""
    file, pick = sae_weights_file(path, layer)
    sae = load_sae(path, layer=pick)
    if sae.cfg.d_in != hidden_size:
        raise ValueError(
            f"{file}: SAE d_in = {sae.cfg.d_in}, but {model} has hidden size {hidden_size}: expected "
            f"W_enc [{hidden_size}, {sae.cfg.d_sae}] (sparsify encoder.weight [{sae.cfg.d_sae}, {hidden_size}]); "
            "was this SAE trained on another model?")
    return sae


# ---------------------------------------------------------------------------------------------
# The math on device
# ---------------------------------------------------------------------------------------------


def pooled_mask(mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """mask [B, T] with the first ``skip_first`` positions of every row set False."""
    pooled = mask.clone()
    pooled[:, :skip_first] = False
    return pooled


@torch.inference_mode()
def mean_codes(sae: SparseAutoencoder, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """e_b = Σ_t m_bt SAE.encode(h_bt) / Σ_t m_bt: hidden [B, T, H], mask [B, T] -> [B, d_sae] float32.

    Only masked-in positions are encoded, ``CODE_BUFFER / d_sae`` rows at a time, so no
    [B, T, d_sae] tensor is built. Rows with no position get zeros.
    """
    rows = hidden[mask]  # [N, H]
    doc = mask.nonzero()[:, 0]  # [N] document of each row
    sums = torch.zeros(mask.shape[0], sae.cfg.d_sae, device=hidden.device, dtype=torch.float32)
    step = max(1, CODE_BUFFER // sae.cfg.d_sae)
    for start in range(0, rows.shape[0], step):
        z = sae.encode(rows[start:start + step]).float()  # [c, d_sae]
        sums.index_add_(0, doc[start:start + step], z)
    return sums / mask.sum(dim=1, keepdim=True).clamp(min=1).float()


@torch.inference_mode()
def mean_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 / Σ_t m_bt) Σ_t m_bt h_bt: [B, T, H], [B, T] -> [B, H] float32 (zeros for empty rows)."""
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def sparse_rows(codes: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """[B, d_sae] -> per row (indices int32, values float32) of its non-zeros."""
    dense = codes.cpu().numpy()
    pairs = [to_sparse(row) for row in dense]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------------
# The head (engine ``Head`` protocol)
# ---------------------------------------------------------------------------------------------


class SAEHead:
    """Per micro-batch: SAE codes of layer ``layer`` on device, mean-pooled, stored sparsely."""

    def __init__(self, params: SAEHeadParams, info: ModelInfo) -> None:
        self.params = params
        self.layers = [params.layer]
        self.sae = load_head_sae(params.sae, params.layer, info.hidden_size, f"model {info.name!r}")
        self.sae.to(info.device)
        self.d_sae = self.sae.cfg.d_sae

    def output_schema(self) -> pa.Schema:
        name = self.params.name
        fields = [(idx_column(name), pa.list_(pa.int32())), (val_column(name), pa.list_(pa.float32()))]
        if self.params.hidden_mean:
            fields.append((hidden_mean_column(name), pa.list_(pa.float32())))
        return pa.schema(fields)

    def __call__(self, metrics: dict[str, Any], hidden: dict[int, Any], mask: Any) -> dict[str, list]:
        h = hidden[self.params.layer]  # [B, T, H]
        pooled = pooled_mask(mask, self.params.skip_first)  # [B, T]
        idx, val = sparse_rows(mean_codes(self.sae, h, pooled))
        out: dict[str, list] = {idx_column(self.params.name): idx, val_column(self.params.name): val}
        if self.params.hidden_mean:
            out[hidden_mean_column(self.params.name)] = list(mean_hidden(h, pooled).cpu().numpy())
        return out


def build_head(params: dict, info: ModelInfo) -> SAEHead:
    """Head factory for the ``lm`` stage: ``kind: sae`` (params validated as ``SAEHeadParams``)."""
    return SAEHead(SAEHeadParams.model_validate(params), info)
