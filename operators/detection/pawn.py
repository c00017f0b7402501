"""PAWN: Perplexity Attention Weighted Network for detecting machine-written text.

Miralles-González et al. 2025, "Not all tokens are created equal: Perplexity Attention Weighted
Networks for AI generated text detection". A small head on top of a frozen causal LM: per-token
next-token metrics are embedded by ``metrics_nn``, weighted per feature by a softmax over the
sequence of gates computed from the LM's hidden states (``gate_nn``), summed, and classified by
``aggregate_nn``:

    m_t = [entropy_t, max_logprob_t, logprob_t, rank_t, top_p_t]            (5 features, this order)
    g_t = gate_nn([h_t ‖ h_{t+1} ‖ t/512])                                  ∈ R^256
    w_t = softmax_t(g_t)        (over time, per feature; padding and dropped tokens get g = -∞)
    s   = Σ_t w_t ⊙ metrics_nn(m_t)                                          ∈ R^256
    P(machine-written) = sigmoid(aggregate_nn(s))

Alignment. A document x_0 … x_n is scored at positions i = 1 … n (the engine's arrays); row
t = i - 1 of every per-token array below. e_j is the LM's last-layer hidden state after reading
x_0 … x_j, so e_{i-1} produced the distribution that scores x_i:

    metrics[t] = m(x_{t+1})      the metrics of token x_{t+1}, predicted from e_t
    hidden[t]  = e_t = h_t       the state that made that prediction
    h_{t+1}    = hidden[t+1]     = e_{t+1}, the state after reading the scored token x_{t+1}

``hidden`` has T + 1 rows for T metric rows (the engine keeps e_0 … e_n, every token's state), so
every scored row has its real h_{t+1}, the last one and the last of a document cut at
``max_tokens`` included. A feature cache written before the engine kept the last state has T
rows; there the last row's h_{t+1} is zeros (as it is for rows of padding).

The feature cache it trains on is described in ``operators.detection.features``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from operators.detection.head_params import PAWN_MAX_TOKENS

MAX_TOKENS = PAWN_MAX_TOKENS  # rows per document the head reads (t/512 in the gate)
METRIC_NAMES = ("entropy", "max_logprob", "logprob", "rank", "top_p")


@dataclass(frozen=True)
class PawnConfig:
    """Hyper-parameters of ``PawnHead``; only ``hidden_size`` (H of the LM) changes the shapes."""

    hidden_size: int
    width: int = 256
    n_metrics: int = len(METRIC_NAMES)
    position_scale: float = 512.0  # the gate sees t / position_scale
    drop_rate: float = 0.15  # fraction of real tokens dropped from the softmax in training


class ResidualBlock(nn.Module):
    """x ← LayerNorm(Linear(GELU(x)) + x), LayerNorm without bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., W] -> [..., W]
        return self.ln(self.fc(F.gelu(x)) + x)


class MLP(nn.Module):
    """Linear(d_in→W), 2 × ResidualBlock(W), GELU, Linear(W→d_out).

    Parameters: (W·d_in + W) + 2·(W² + W + W) + (W·d_out + d_out).
    """

    def __init__(self, d_in: int, d_out: int, width: int = 256, n_blocks: int = 2) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(n_blocks)))
        self.fc_out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_out]
        return self.fc_out(F.gelu(self.blocks(self.fc_in(x))))


class PawnHead(nn.Module):
    """The PAWN head. Trainable parameters (W = 256), with MLP(d_in, d_out) = 256·d_in + 132,352 + 257·d_out:

        metrics_nn   = MLP(5, 256)      =   1,280 + 132,352 + 65,792 = 199,424
        gate_nn      = MLP(2H+1, 256)   = 512H + 256 + 132,352 + 65,792 = 512H + 198,400
        aggregate_nn = MLP(256, 1)      =  65,536 + 132,352 +    257 = 198,145
        total        = 512H + 595,969   → 989,185 for H = 768, 1,644,545 for H = 2048

    (each residual block: Linear 256·256 + 256 = 65,792 plus LayerNorm weight 256; the out
    layers of metrics_nn and gate_nn map 256 → 256.)
    """

    def __init__(self, config: PawnConfig) -> None:
        super().__init__()
        self.config = config
        w, h = config.width, config.hidden_size
        self.metrics_nn = MLP(config.n_metrics, w, w)
        self.gate_nn = MLP(2 * h + 1, w, w)
        self.aggregate_nn = MLP(w, 1, w)

    def forward(self, metrics: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """metrics [B,T,5], hidden [B,T+1,H] (e_0 … e_T; or [B,T,H], then the last h_{t+1} is zeros),
        mask [B,T] bool (True = real scored row, right-padded) -> logits [B]."""
        B, T, _ = metrics.shape
        dtype = self.metrics_nn.fc_in.weight.dtype
        mask = mask.bool()
        pad = ~mask.unsqueeze(-1)                                         # [B,T,1]
        m = metrics.to(dtype).masked_fill(pad, 0.0)                       # [B,T,5]
        full = hidden.to(dtype)
        if full.shape[1] == T:                                            # no e_T: zeros after the last row
            full = F.pad(full, (0, 0, 0, 1))
        h = full[:, :T].masked_fill(pad, 0.0)                             # [B,T,H]  h_t
        h_next = full[:, 1:T + 1].masked_fill(pad, 0.0)                   # [B,T,H]  h_{t+1}
        pos = torch.arange(T, device=m.device, dtype=dtype) / self.config.position_scale
        pos = pos.view(1, T, 1).expand(B, T, 1)                           # [B,T,1]
        gate = self.gate_nn(torch.cat([h, h_next, pos], dim=-1))          # [B,T,W]
        has_tokens = mask.any(dim=1)                                      # [B]
        # a doc without tokens keeps finite gates (no all -inf softmax) and gets s = 0
        keep = self._keep(mask) | ~has_tokens.unsqueeze(1)                # [B,T]
        gate = gate.masked_fill(~keep.unsqueeze(-1), -math.inf)
        weights = torch.softmax(gate, dim=1)                              # [B,T,W], sums to 1 over T
        s = (weights * self.metrics_nn(m)).sum(dim=1)                     # [B,W]
        s = s * has_tokens.unsqueeze(-1).to(dtype)
        return self.aggregate_nn(s).squeeze(-1)                           # [B]

    def _keep(self, mask: torch.Tensor) -> torch.Tensor:
        """Real tokens that enter the softmax: in training, drop ``drop_rate`` of them at random,
        except in a document where that would drop them all."""
        if not self.training or self.config.drop_rate <= 0:
            return mask
        keep = mask & (torch.rand(mask.shape, device=mask.device) >= self.config.drop_rate)
        return torch.where(keep.any(dim=1, keepdim=True), keep, mask)

    @torch.no_grad()
    def predict_proba(self, metrics: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(machine-written) = sigmoid(logit) [B], computed in eval mode (no token dropping)."""
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(metrics, hidden, mask))
        finally:
            self.train(was_training)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- feature cache


def pad_batch(metrics: list[np.ndarray], hidden: list[np.ndarray],
              max_tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad per-document arrays [T_i,5] / [T_i+1,H] (or [T_i,H]: no e_{T_i}) to metrics [B,T,5],
    hidden [B,T+1,H], mask [B,T].

    Each document is truncated to its first ``max_tokens`` metric rows (and ``max_tokens`` + 1
    hidden rows); T = the longest after that. Missing hidden rows are zeros.
    """
    if len(metrics) != len(hidden):
        raise ValueError("metrics and hidden have different numbers of documents")
    lengths = [min(len(m), max_tokens) for m in metrics]
    B, T = len(metrics), max(lengths, default=0)
    H = hidden[0].shape[-1] if hidden else 0
    m_out = torch.zeros(B, T, len(METRIC_NAMES))
    h_out = torch.zeros(B, T + 1, H)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (m, h, n) in enumerate(zip(metrics, hidden, lengths, strict=True)):
        if len(h) not in (len(m), len(m) + 1):
            raise ValueError(f"document {b}: {len(m)} metric rows but {len(h)} hidden rows "
                             f"(expected {len(m) + 1}, or {len(m)})")
        m_out[b, :n] = torch.tensor(np.asarray(m, dtype=np.float32)[:n])
        rows = np.asarray(h, dtype=np.float32)[:n + 1]
        h_out[b, :len(rows)] = torch.tensor(rows)
        mask[b, :n] = True
    return m_out, h_out, mask


# ---------------------------------------------------------------------------- persistence


def save_pawn(head: PawnHead, path: str) -> None:
    """Write ``{path}/model.safetensors`` and ``{path}/config.json`` (``PawnConfig``, incl. H)."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with fs.open(f"{root}/model.safetensors", "wb") as f:
        f.write(safetensors.torch.save(state))
    with fs.open(f"{root}/config.json", "w") as f:
        json.dump(asdict(head.config), f, indent=2)


def load_pawn(path: str, device: str | torch.device = "cpu") -> PawnHead:
    """Read a head written by ``save_pawn``; returned in eval mode."""
    fs, root = fsspec.core.url_to_fs(path)
    with fs.open(f"{root}/config.json", "r") as f:
        config = PawnConfig(**json.load(f))
    with fs.open(f"{root}/model.safetensors", "rb") as f:
        state = safetensors.torch.load(f.read())
    head = PawnHead(config)
    head.load_state_dict(state, strict=True)
    return head.to(device).eval()
