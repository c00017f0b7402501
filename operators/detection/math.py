"""Zero-shot detection of machine-written text from per-token LM statistics.

Inputs are the arrays the LM engine yields for one document over the scored positions i
(token x_i predicted from x_<i): ``entropy`` H_i = -Σ_v p_v ln p_v, ``rank`` = fraction of the
vocabulary whose logprob is ≥ the observed token's (1/V = top-1), ``logprob`` lp_i.

* ``mean_entropy``      (1/n) Σ_i H_i — Gehrmann et al. 2019 (GLTR), Mitchell et al. 2023 (DetectGPT
                        baselines); higher ⇒ machine-written, the direction of DetectGPT's
                        reference code (``run.py``: entropy scored as is, only ranks negated).
* ``mean_log_rank``     (1/n) Σ_i ln r_i, r_i = max(1, round(rank_i · V)) — Mitchell et al. 2023
                        (DetectGPT baselines), GLTR; lower ⇒ machine-written.
* ``gltr_buckets``      GLTR's rank histogram, Gehrmann et al. 2019: the fractions of tokens whose
                        rank r_i is in the top 10, 11–100, 101–1000 and above 1000 (the
                        green / yellow / red / purple bins of the GLTR demo). Machine text
                        has more top-10 tokens, human text more in the other bins.
* ``binoculars_score``  Hans et al. 2024, "Spotting LLMs With Binoculars: Zero-Shot Detection
                        of Machine-Generated Text"; lower ⇒ machine-written.

Empty documents score NaN (callers turn NaN into null).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    import torch


def _f64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def mean_entropy(entropy: ArrayLike) -> float:
    """(1/n) Σ_i H_i; NaN when empty."""
    h = _f64(entropy)
    return float(h.mean()) if h.size else math.nan


def integer_rank(rank: ArrayLike, vocab_size: int) -> np.ndarray:
    """1-based integer rank r_i = max(1, round(rank_i · V)) from the engine's rank fraction."""
    return np.maximum(1, np.rint(_f64(rank) * vocab_size)).astype(np.int64)


def mean_log_rank(rank: ArrayLike, vocab_size: int) -> float:
    """(1/n) Σ_i ln r_i with r_i = max(1, round(rank_i · V)); NaN when empty."""
    r = integer_rank(rank, vocab_size)
    return float(np.log(r).mean()) if r.size else math.nan


#: Upper rank bounds of GLTR's bins: top-10, top-100, top-1000; the fourth bin is everything above.
GLTR_BOUNDS = (10, 100, 1000)


def gltr_buckets(rank: ArrayLike, vocab_size: int) -> np.ndarray:
    """GLTR fractions [f_10, f_100, f_1000, f_rest] over the n tokens (they sum to 1):

        f_10 = |{i : r_i ≤ 10}| / n,        f_100  = |{i : 10 < r_i ≤ 100}| / n,
        f_1000 = |{i : 100 < r_i ≤ 1000}| / n,   f_rest = |{i : r_i > 1000}| / n

    with r_i = max(1, round(rank_i · V)) the 1-based rank (``integer_rank``; GLTR's 0-based rank
    k < 10 is r ≤ 10). NaN × 4 when empty.
    """
    r = integer_rank(rank, vocab_size)
    if r.size == 0:
        return np.full(len(GLTR_BOUNDS) + 1, math.nan)
    bins = np.searchsorted(np.asarray(GLTR_BOUNDS), r, side="left")  # r ≤ 10 -> 0, ≤ 100 -> 1, …
    return np.bincount(bins, minlength=len(GLTR_BOUNDS) + 1) / r.size


def binoculars_score(performer_logprob: ArrayLike, cross_entropy: ArrayLike) -> float:
    """Binoculars B = [-(1/(n-1)) Σ_{i=1}^{n-1} lp_i^perf] / [(1/n) Σ_{t=0}^{n-1} x_t] for n tokens.

    Numerator: mean NLL of the n - 1 scored tokens under the performer. Denominator: mean
    cross-perplexity term x_t = -Σ_v softmax(observer_t)_v · log softmax(performer_t)_v
    (``cross_entropy_per_position``) over all n positions, the last one included, as the authors'
    code averages it (``binoculars/metrics.py``, ``entropy``: every non-pad position); the model
    assignment is theirs too (``binoculars/detector.py``). So ``cross_entropy`` holds one value more
    than ``performer_logprob``. Lower ⇒ machine-written. NaN when empty or when the mean
    cross-entropy is 0.
    """
    lp, x = _f64(performer_logprob), _f64(cross_entropy)
    if x.size != lp.size + 1 and lp.size + x.size:
        raise ValueError(f"cross_entropy ({x.size}) must hold one value more than performer_logprob "
                         f"({lp.size}): every position, the last token's included")
    if lp.size == 0 or x.mean() == 0.0:
        return math.nan
    return float(-lp.mean() / x.mean())


def cross_entropy_per_position(observer_logits: torch.Tensor, performer_logits: torch.Tensor,
                               chunk_size: int = 256) -> torch.Tensor:
    """x_t = -Σ_v softmax(observer_t)_v · log softmax(performer_t)_v, for logits [..., T, V].

    Returns float32 [...,T] on the inputs' device. Rows are processed ``chunk_size`` at a time,
    in float32: besides the inputs, at most one [chunk, V] float32 pair (the observer softmax
    and the performer log-softmax) is alive at once. Pass the logits aligned with the scored
    positions (logits at position i-1 predict x_i).
    """
    import torch  # here, not at import: the scores stage's workers never load torch

    with torch.no_grad():
        if observer_logits.shape != performer_logits.shape:
            raise ValueError(f"shape mismatch: {tuple(observer_logits.shape)} vs {tuple(performer_logits.shape)}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        lead, vocab = observer_logits.shape[:-1], observer_logits.shape[-1]
        obs, perf = observer_logits.reshape(-1, vocab), performer_logits.reshape(-1, vocab)
        out = torch.empty(obs.shape[0], dtype=torch.float32, device=obs.device)
        for start in range(0, obs.shape[0], chunk_size):
            stop = start + chunk_size
            p = torch.softmax(obs[start:stop], dim=-1, dtype=torch.float32)             # [c, V]
            log_q = torch.log_softmax(perf[start:stop], dim=-1, dtype=torch.float32)    # [c, V]
            log_q.clamp_(min=torch.finfo(torch.float32).min)  # -inf logits: 0 · (-inf) would be NaN
            out[start:stop] = -p.mul_(log_q).sum(dim=-1)      # in place: no third [c, V]
            del p, log_q
        return out.reshape(lead)
