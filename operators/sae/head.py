"""The SAE head: sparse sample embeddings computed inside the LM actor, on the LM's device.

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations". For a document with layer-L residual states h_t (HF ``hidden_states[L]``) the head
encodes every token with a sparse autoencoder and mean-pools the codes:

    z_t = SAE.encode(h_t)                            [d_sae], sparse (TopK: k non-zeros)
    e   = (1 / |P|) Σ_{t ∈ P} z_t                     the sample embedding
    P   = {t : skip_first ≤ t < n}                    pooled positions

The engine hands heads the states of every token x_0 … x_{n-1}, the last one included. By default
(``skip_first`` = 0) P is all n tokens, as MoNA's Eq. 7 averages them. ``skip_first: 1`` drops x_0,
an attention sink whose residual norm is ~100× the others (SmolLM2-135M, layer 15: ~23,000 vs
~150), so that its code does not weigh on the mean (its effect on the demo selection task
is in docs/methods/sae_select.md; SAE training skips x_0 either way, where it would dominate the
loss). A document with no pooled position gets the zero embedding (similarity 0).

Columns, for a head named ``<name>`` (default ``sae``):

    <name>__sae_idx       list<int32>     non-zero latents of e, ascending
    <name>__sae_val       list<float32>   their values (> 0)
    <name>__hidden_mean   list<float32>   (1 / |P|) Σ_{t ∈ P} h_t, [H]; only with hidden_mean: true

In a pipeline (kind ``operators.sae.head:build_head``; the short name ``sae`` resolves where this
module has been imported, e.g. through ``operators.registry``)::

    - op: lm
      model: {name: smollm2, path: ...}
      heads: [{kind: "operators.sae.head:build_head", params: {sae: DIR_OR_URL, layer: 15, name: sae}}]

Outside Ray, ``embed_texts`` runs the same head through the same engine (target examples,
evaluation) and ``collect_activations`` gathers the pooled positions' states (SAE training).
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch

from operators.lm.heads import ModelInfo, token_mask
from operators.sae.head_params import SAEHeadParams, hidden_mean_column, idx_column, val_column
from operators.sae.io import load_sae, saelens_hf_layer, sparsify_hookpoint
from operators.sae.math import to_sparse
from operators.sae.model import SparseAutoencoder

#: Elements of one [rows, d_sae] code buffer (64 MiB in float32): bounds memory for wide SAEs.
CODE_BUFFER = 1 << 24


# ---------------------------------------------------------------------------------------------
# Loading with a clear shape check
# ---------------------------------------------------------------------------------------------


def _has(url: str, name: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url.rstrip("/") + "/" + name)
    return fs.exists(root)


def check_sae_layer(layer: int, num_layers: int, model: str = "the model") -> None:
    """An SAE reads the residual stream at HF ``hidden_states[layer]``, 0 ≤ layer < n.

    ``layer = n`` is refused: HF's ``hidden_states[n]`` is the last block's output *after* the
    model's final norm, while sparsify's ``layers.{n-1}`` and SAELens' ``blocks.{n-1}.hook_resid_post``
    hook it *before* the norm; feeding one for the other would silently change the codes.
    """
    if layer == num_layers:
        raise ValueError(f"SAE layer {layer} is the last layer of {model}: HF hidden_states[{layer}] is after the "
                         f"final norm, but sparsify layers.{layer - 1} / SAELens blocks.{layer - 1}.hook_resid_post "
                         f"are before it; use a layer in 0..{num_layers - 1}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"SAE layer {layer} is outside {model} ({num_layers} blocks: HF hidden_states "
                         f"0..{num_layers - 1} for an SAE)")


def sae_weights_file(path: str, layer: int) -> tuple[str, int | None]:
    """(weights file, sub-layer) of the SAE at ``path`` for HF ``hidden_states[layer]``:
    ``layers.<layer-1>/`` (sparsify names a block's output by the block) when present, else flat."""
    path = os.fspath(path)
    sub = path.rstrip("/") + f"/{sparsify_hookpoint(layer)}" if layer >= 1 else None
    for where, pick in ((sub, layer), (path, None)):
        if where is None:
            continue
        for name in ("sae_weights.safetensors", "sae.safetensors"):
            if _has(where, name):
                return f"{where.rstrip('/')}/{name}", pick
    expect = f"{sub}/ or {path}/" if sub else f"{path}/"
    raise FileNotFoundError(f"no SAE at {path} for HF layer {layer}: expected {expect} holding "
                            "cfg.json + sae.safetensors (sparsify) or sae_weights.safetensors (SAELens)")


def check_saelens_hook(file: str, layer: int) -> None:
    """A SAELens cfg whose ``hook_name`` is a residual hook must name HF ``hidden_states[layer]``."""
    if not file.endswith("sae_weights.safetensors"):
        return
    cfg_file = file.rsplit("/", 1)[0] + "/cfg.json"
    with fsspec.open(cfg_file, "r") as f:
        hook = json.load(f).get("hook_name")
    hf = saelens_hf_layer(hook)
    if hf is not None and hf != layer:
        raise ValueError(f"{cfg_file}: hook_name {hook!r} reads HF hidden_states[{hf}], but the head asks for "
                         f"layer {layer}")


def load_head_sae(path: str, layer: int, hidden_size: int, model: str = "the model") -> SparseAutoencoder:
    """Load the SAE for HF ``hidden_states[layer]`` and check that it reads vectors of the model's hidden size."""
    file, pick = sae_weights_file(path, layer)
    check_saelens_hook(file, layer)
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
        check_sae_layer(params.layer, info.num_layers, f"model {info.name!r}")
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
        h = hidden[self.params.layer]  # [B, T, H]: every token
        pooled = pooled_mask(token_mask(mask), self.params.skip_first)  # [B, T]
        idx, val = sparse_rows(mean_codes(self.sae, h, pooled))
        out: dict[str, list] = {idx_column(self.params.name): idx, val_column(self.params.name): val}
        if self.params.hidden_mean:
            out[hidden_mean_column(self.params.name)] = list(mean_hidden(h, pooled).cpu().numpy())
        return out


def build_head(params: dict, info: ModelInfo) -> SAEHead:
    """Head factory for the ``lm`` stage: ``kind: sae`` (params validated as ``SAEHeadParams``)."""
    return SAEHead(SAEHeadParams.model_validate(params), info)
