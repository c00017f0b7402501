"""Per-position statistics of a next-token distribution, computed on the logits' device.

For one scored position with logits z ∈ R^V, p = softmax(z), log p = log_softmax(z) and observed
(target) token t:

    logprob      = log p_t
    entropy      = -Σ_v p_v log p_v
    max_logprob  = max_v log p_v
    rank         = |{v : log p_v ≥ log p_t}| / V           (1/V when t is the arg-max)
    top_p        = Σ_{v : log p_v ≥ log p_t} p_v            (probability mass at least as likely as t)
    logp2        = Σ_v p_v (log p_v)²                       (second moment of log p, for Min-K%++)

and, for Binoculars, with an observer's logits y on the same position:

    xent         = -Σ_v softmax(y)_v · log softmax(z)_v

Everything is computed in float32 from one pass over the shifted logits u = z - max z:
with e = exp(u), s = Σ e, a = Σ p·u, b = Σ p·u², log p = u - log s, so

    entropy = log s - a,   logp2 = b - 2 a log s + (log s)²,   max_logprob = -log s.

``chunks`` bounds memory: callers turn [N, H] hidden states into logits ``chunk`` rows at a time,
so at most a few [chunk, V] float32 buffers are alive and no [N, V] tensor is ever built.

The vLLM backend only sees the top-k log-probabilities; ``topk_metrics`` gives its estimates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the functions that need it: configs load without it
    import torch

EXACT_METRICS = ("logprob", "entropy", "max_logprob", "rank", "top_p", "logp2")
#: Estimated from vLLM's top-k logprobs (``topk_metrics``); logprob, rank, max_logprob are exact.
TOPK_METRICS = ("logprob", "max_logprob", "rank", "entropy_topk", "top_p_topk", "logp2_topk")
# exp(-1e4) == 0 in float32: clamping -inf logits keeps 0·(-inf) = NaN out of the sums.
_FLOOR = -1e4


def token_metrics(logits: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...] = EXACT_METRICS,
                  scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Metrics of ``targets`` [N] under ``logits`` [N, V]; returns float32 [N] tensors by name.

    ``logprob`` is always computed (it feeds nll_sum). float32 ``logits`` are overwritten (they
    become u). ``scratch``: two float32 buffers of at least [N, V] on the same device, reused
    across calls so a CPU loop does not pay for fresh multi-megabyte allocations every chunk.
    """
    import torch

    unknown = set(names) - set(EXACT_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {EXACT_METRICS}")
    n, vocab = logits.shape
    if scratch is None:
        scratch = (torch.empty_like(logits, dtype=torch.float32), torch.empty_like(logits, dtype=torch.float32))
    e, w = scratch[0][:n], scratch[1][:n]                           # [N, V] each
    u = logits.float()
    u = u.sub_(u.amax(dim=-1, keepdim=True)).clamp_(min=_FLOOR)     # u = z - max z ≤ 0
    torch.exp(u, out=e)                                             # e = exp(u)
    s = e.sum(dim=-1)                                               # [N]
    log_s = torch.log(s)
    u_t = u.gather(-1, targets.long().unsqueeze(-1))                # [N, 1]
    out = {"logprob": u_t.squeeze(-1) - log_s}
    if "max_logprob" in names:
        out["max_logprob"] = -log_s
    if {"entropy", "logp2"} & set(names):
        torch.mul(e, u, out=w)                                      # w = e·u
        a = w.sum(dim=-1) / s                                       # Σ p u
        if "entropy" in names:
            out["entropy"] = log_s - a
        if "logp2" in names:
            b = torch.linalg.vecdot(w, u) / s                       # Σ p u²
            out["logp2"] = b - 2 * a * log_s + log_s * log_s
    if {"rank", "top_p"} & set(names):
        torch.ge(u, u_t, out=w)                                     # w = 1[u_v ≥ u_t]
        if "rank" in names:
            out["rank"] = w.sum(dim=-1) / vocab
        if "top_p" in names:
            out["top_p"] = torch.linalg.vecdot(w, e) / s
    return {k: out[k] for k in ("logprob", *names) if k in out}


def cross_entropy(observer_logits: torch.Tensor, performer_logits: torch.Tensor) -> torch.Tensor:
    """x = -Σ_v softmax(observer)_v · log softmax(performer)_v per row, for [N, V] logits -> [N]."""
    import torch

    p = torch.softmax(observer_logits.float(), dim=-1)              # [N, V]
    log_q = torch.log_softmax(performer_logits.float(), dim=-1).clamp_(min=_FLOOR)
    return -torch.linalg.vecdot(p, log_q)


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` rows."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def chunk_rows(vocab_size: int, budget_elems: int = 1 << 25) -> int:
    """Rows per logits chunk so that one [rows, V] float32 buffer holds ≤ ``budget_elems`` values."""
    return max(1, budget_elems // max(vocab_size, 1))


def topk_metrics(observed: np.ndarray, rank: np.ndarray, top: np.ndarray,
                 vocab_size: int) -> dict[str, np.ndarray]:
    """Metrics from vLLM prompt logprobs: observed logprob [N], its 1-based rank [N], top-k [N, k].

    ``rank`` counts tokens with logprob ≥ the observed one (vLLM's definition), so the rank
    fraction is exact: rank / V. ``max_logprob`` is the top-1 logprob (exact). The rest are
    estimates. The tail mass r = 1 - Σ_topk p lies on V - k tokens, each with p ≤ p_(k), so its
    share of a sum Σ p f(log p) lies between packing it at p_(k) (f(log p_(k))·r) and spreading it
    uniformly (f(log(r / (V - k)))·r); the estimate takes the midpoint of the two:

        entropy_topk = -Σ_topk p log p + r · mid(-log p_(k), -log(r / (V - k)))
        logp2_topk   =  Σ_topk p (log p)² + r · mid((log p_(k))², (log(r / (V - k)))²)
        top_p_topk   =  Σ_{j ≤ rank} p_(j)                     if rank ≤ k  (exact)
                        Σ_topk p + (rank - k) · p_t             otherwise    (a lower bound)

    On SmolLM2-135M with k = 20 the entropy estimate is off by ~5% on average (either bound alone
    by 20-30%).
    """
    top = np.asarray(top, dtype=np.float64)                          # [N, k], sorted descending
    lp = np.asarray(observed, dtype=np.float64)                      # [N]
    rank = np.asarray(rank, dtype=np.int64)                          # [N]
    n, k = top.shape
    if k < 1:
        raise ValueError("topk_metrics needs at least the top-1 logprob per position")
    p_top = np.exp(top)
    tail = np.clip(1.0 - p_top.sum(axis=1), 0.0, 1.0)                # r
    with np.errstate(divide="ignore"):
        log_spread = np.where(tail > 0, np.log(tail / max(vocab_size - k, 1)), 0.0)  # uniform tail
    log_packed = top[:, -1]                                          # tail at p_(k)
    cum = np.cumsum(p_top, axis=1)                                   # [N, k]
    top_p = np.where(rank <= k, cum[np.arange(n), np.clip(rank, 1, k) - 1],
                     cum[:, -1] + (rank - k) * np.exp(lp))
    return {
        "logprob": lp.astype(np.float32),
        "max_logprob": top[:, 0].astype(np.float32),
        "rank": (rank / vocab_size).astype(np.float32),
        "entropy_topk": (-(p_top * top).sum(axis=1)
                         - tail * (log_packed + log_spread) / 2).astype(np.float32),
        "top_p_topk": np.minimum(top_p, 1.0).astype(np.float32),
        "logp2_topk": ((p_top * top**2).sum(axis=1)
                       + tail * (log_packed**2 + log_spread**2) / 2).astype(np.float32),
    }


def nll_sum(logprob: np.ndarray) -> float:
    """-Σ_i logprob_i, summed in float64 (0 for no positions)."""
    return -float(np.sum(logprob, dtype=np.float64))
