"""MoNA's selection math: pooled sparse codes, the task prototype and the generalized Jaccard similarity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where a tensor comes in: sae_select's workers never load it
    import torch

# ---------------------------------------------------------------------------------------------
# Sample embeddings and sparse storage
# ---------------------------------------------------------------------------------------------


def mean_pooled_code(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """e = Σ_t m_t z_t / Σ_t m_t over the token axis.

    z: [..., T, d_sae]; mask: [..., T] (bool or 0/1; None = all tokens). Returns [..., d_sae];
    a sample with no unmasked token gets the zero vector.
    """
    if mask is None:
        return z.mean(dim=-2)
    m = mask.to(z.dtype)  # [..., T]
    total = (z * m.unsqueeze(-1)).sum(dim=-2)  # [..., d_sae]
    return total / m.sum(dim=-1, keepdim=True).clamp(min=1.0)


def to_sparse(vec: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """1-D dense vector -> (indices int32 ascending, values float32) of its non-zeros."""
    vec = _numpy(vec)
    if vec.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {vec.shape}")
    idx = np.flatnonzero(vec)
    return idx.astype(np.int32), vec[idx].astype(np.float32)


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor's values on the CPU (anything else as an array)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def from_sparse(indices: np.ndarray, values: np.ndarray, d_sae: int) -> np.ndarray:
    """(indices, values) -> dense float32 [d_sae]."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.shape != np.shape(values):
        raise ValueError(f"indices {indices.shape} and values {np.shape(values)} differ in shape")
    if indices.size and (indices.min() < 0 or indices.max() >= d_sae):
        raise ValueError(f"indices must lie in [0, {d_sae})")
    out = np.zeros(d_sae, dtype=np.float32)
    out[indices] = values
    return out


def prototype(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """proto = (1 / n) Σ_i e_i over target embeddings [n, d_sae] -> float64 [d_sae]."""
    emb = np.asarray(_numpy(embeddings), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"expected non-empty embeddings [n, d_sae], got shape {emb.shape}")
    return emb.mean(axis=0)


# ---------------------------------------------------------------------------------------------
# Generalized Jaccard
# ---------------------------------------------------------------------------------------------


def generalized_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """J(a, b) = Σ_k min(a_k, b_k) / Σ_k max(a_k, b_k) for non-negative a, b; 0/0 -> 0.0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("generalized Jaccard needs non-negative vectors")
    den = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / den) if den > 0 else 0.0


def generalized_jaccard_many(
    indices: Sequence[np.ndarray], values: Sequence[np.ndarray], proto: np.ndarray
) -> np.ndarray:
    """J(row_r, proto) for sparse rows (indices[r], values[r]) against a dense prototype.

    Only the row's support S_r is visited:
        Σ_k min = Σ_{k∈S_r} min(v_k, p_k)
        Σ_k max = Σ_{k∈S_r} max(v_k, p_k) + Σ_{k∉S_r} p_k = Σ_k p_k + Σ_{k∈S_r} max(v_k − p_k, 0)
    (prototype mass outside the support counts in the denominator). Indices within a row
    must be unique; 0/0 -> 0.0. Returns float64 [R].
    """
    if len(indices) != len(values):
        raise ValueError(f"{len(indices)} index rows but {len(values)} value rows")
    p = np.asarray(proto, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any():
        raise ValueError("the prototype must be a non-negative 1-D vector")
    n_rows = len(indices)
    if n_rows == 0:
        return np.empty(0, dtype=np.float64)
    lengths = np.array([len(i) for i in indices])
    idx = np.concatenate([np.asarray(i, dtype=np.int64) for i in indices])
    val = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    if idx.shape != val.shape or not np.array_equal(lengths, [len(v) for v in values]):
        raise ValueError("every index row needs a value row of the same length")
    if (val < 0).any():
        raise ValueError("generalized Jaccard needs non-negative vectors")
    row = np.repeat(np.arange(n_rows), lengths)  # [nnz] row of each entry
    p_at = p[idx]  # [nnz]
    num = np.bincount(row, weights=np.minimum(val, p_at), minlength=n_rows)
    den = p.sum() + np.bincount(row, weights=np.maximum(val - p_at, 0.0), minlength=n_rows)
    return np.divide(num, den, out=np.zeros(n_rows), where=den > 0)
