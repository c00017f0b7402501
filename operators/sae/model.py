"""Sparse-autoencoder codes for task-specific data selection (MoNA-style).

Ma et al., "Task-Specific Data Selection for Instruction Tuning via Monosemantic Neuronal
Activations": encode a model's hidden states with a sparse autoencoder (SAE), mean-pool the
codes over a sample's tokens, and rank candidate samples by their generalized Jaccard
similarity to the mean code (prototype) of the target-task samples:

    e(x)        = (1 / |T|) Σ_{t ∈ T} z_t                       sample embedding
    proto       = (1 / |X_target|) Σ_{x ∈ X_target} e(x)
    J(a, b)     = Σ_k min(a_k, b_k) / Σ_k max(a_k, b_k)          a, b ≥ 0

Two SAE families are read:

* TopK, EleutherAI ``sparsify`` (Gao et al., "Scaling and Evaluating Sparse Autoencoders"):
  z = TopK_k(ReLU(W_enc (x − b_dec) + b_enc))
* ReLU / JumpReLU, ``SAELens`` (Rajamanoharan et al., "Jumping Ahead: Improving
  Reconstruction Fidelity with JumpReLU Sparse Autoencoders"):
  pre = (x − b_dec · apply_b_dec_to_input) W_enc + b_enc,  z = ReLU(pre) [· 1(pre > θ)]

All decode with x̂ = z W_dec + b_dec. Weights are held in one layout (W_enc [d_in, d_sae],
W_dec [d_sae, d_in]); loaders convert and check every shape at load time.

This module is the model. Loading and saving live in ``operators.sae.io``, pooling and the
Jaccard similarity in ``operators.sae.math``, training in ``operators.sae.train``, the ``lm``
head in ``operators.sae.head`` and the ``sae_select`` stage in ``operators.sae.stage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Activation = Literal["topk", "relu", "jumprelu"]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a ``SparseAutoencoder`` (what the loaders read from cfg.json)."""

    d_in: int
    d_sae: int
    activation: Activation = "topk"
    k: int | None = None  # TopK only: latents kept per token
    apply_b_dec_to_input: bool = True  # subtract b_dec before the encoder


class SparseAutoencoder(nn.Module):
    """z = act(pre), pre = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc; x̂ = z W_dec + b_dec."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.activation not in ("topk", "relu", "jumprelu"):
            raise ValueError(f"unknown activation {cfg.activation!r}")
        if cfg.activation == "topk" and not (cfg.k and 0 < cfg.k <= cfg.d_sae):
            raise ValueError(f"TopK needs 0 < k <= d_sae = {cfg.d_sae}, got k = {cfg.k}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))  # [d_sae]
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))  # [d_sae, d_in], row = latent direction
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))  # [d_in]
        threshold = torch.zeros(cfg.d_sae) if cfg.activation == "jumprelu" else None
        self.register_buffer("threshold", threshold)  # [d_sae] JumpReLU θ, else None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)  # [..., d_in]
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc  # [..., d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> z [..., d_sae] (non-negative)."""
        pre = self.pre_acts(x)  # [..., d_sae]
        if self.cfg.activation == "topk":
            vals, idx = pre.relu().topk(self.cfg.k, dim=-1)  # [..., k]
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        if self.cfg.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d_sae] -> x̂ [..., d_in]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
