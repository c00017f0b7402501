"""PreSelect: predictive data selection with a fastText scorer.

Shum et al., "Predictive Data Selection: The Data That Predicts Is the Data That Teaches"
(arXiv:2503.00808). A document d is useful when the losses of N reference models on d rank
those models the same way as their benchmark scores s_1..s_N do (lower loss ↔ higher score):

    S(d) = (1 / C(N, 2)) · Σ_{i<j} 1[(s_i > s_j and L_i(d) < L_j(d)) or (s_i < s_j and L_i(d) > L_j(d))]

L_i(d) is the normalised loss of model i on d; we use bits per character,

    BPC(d) = L_nats(d) / (n_chars(d) · ln 2).

Ties (s_i == s_j or L_i(d) == L_j(d)) count 0 but stay in the C(N, 2) denominator, so a tie
in the benchmark scores makes S == 1 unreachable. Documents with S == 1 become positives,
an equal number of lowest-S documents negatives, and a fastText classifier trained on them
scores the whole corpus; the selection policies (``operators.selection``) take the *global*
score column of a run (never a batch).

This module holds the S statistic, the labels and the text normalisation; the fastText scorer
(train / load / score) is ``operators.preselect.scorer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

POSITIVE_LABEL = "__label__1"
NEGATIVE_LABEL = "__label__0"


# ---------------------------------------------------------------------------------------------
# Predictive strength and training labels
# ---------------------------------------------------------------------------------------------


def predictive_strength(losses: np.ndarray, bench_scores: np.ndarray) -> np.ndarray:
    """Predictive strength S(d) of every document (Shum et al., Eq. 1).

    S(d) = (1 / C(N,2)) · Σ_{i<j} 1[(s_i > s_j ∧ L_i(d) < L_j(d)) ∨ (s_i < s_j ∧ L_i(d) > L_j(d))]

    Args:
        losses: [D, N] normalised loss (e.g. bits per character) of N models on D documents.
        bench_scores: [N] benchmark score of each model (higher is better).

    Returns:
        [D] float64 in [0, 1]; NaN for rows that contain any NaN loss (the caller skips and
        counts those). Ties in s or in L count 0.

    Raises:
        ValueError: N < 3, shapes disagree, or a benchmark score is not finite.

    The loop runs over the C(N, 2) model pairs (N is small), vectorised over documents, so
    memory stays O(D).
    """
    losses = np.asarray(losses, dtype=np.float64)
    scores = np.asarray(bench_scores, dtype=np.float64)
    if losses.ndim != 2 or scores.ndim != 1:
        raise ValueError(f"expected losses [D, N] and bench_scores [N], got {losses.shape} and {scores.shape}")
    n_models = scores.shape[0]
    if losses.shape[1] != n_models:
        raise ValueError(f"losses has {losses.shape[1]} models (columns) but bench_scores has {n_models}")
    if n_models < 3:
        raise ValueError(f"predictive strength needs N >= 3 models, got N = {n_models}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("bench_scores must be finite")

    agree = np.zeros(losses.shape[0], dtype=np.int64)  # [D] pairs ranked as the benchmark does
    for i in range(n_models):
        for j in range(i + 1, n_models):
            ds = np.sign(scores[i] - scores[j])  # scalar in {-1, 0, 1}
            if ds == 0:
                continue
            dl = np.sign(losses[:, i] - losses[:, j])  # [D]; NaN where a loss is NaN
            agree += ds * dl == -1
    strength = agree / math.comb(n_models, 2)
    strength[np.isnan(losses).any(axis=1)] = np.nan
    return strength


def bits_per_char(total_nll_nats: float | np.ndarray, n_chars: int | np.ndarray) -> float | np.ndarray:
    """BPC = L / (n_chars · ln 2), L the summed negative log-likelihood in nats.

    Documents with n_chars == 0 give NaN.
    """
    nll = np.asarray(total_nll_nats, dtype=np.float64)
    chars = np.asarray(n_chars, dtype=np.float64)
    denom = chars * math.log(2)
    out = np.divide(nll, denom, out=np.full(np.broadcast(nll, denom).shape, np.nan), where=chars > 0)
    return float(out) if out.ndim == 0 else out


def choose_labels(
    ids: Sequence | np.ndarray,
    strength: np.ndarray,
    n_positive: int | None = None,
    n_negative: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick fastText training documents from their predictive strength.

    Positives: documents with S == 1, in ascending id order, capped at ``n_positive``
    (the first ``n_positive`` ids). Negatives: the ``n_negative`` (default: as many as
    there are positives) documents with the lowest S, ties broken by ascending id. No
    S == 1 document is ever a negative, NaN strengths are never chosen, and when fewer
    candidates exist than asked for, all of them are returned.

    Returns:
        (pos_ids, neg_ids): positives in id order, negatives in (S, id) order.
    """
    ids = np.asarray(ids)
    strength = np.asarray(strength, dtype=np.float64)
    if ids.shape != strength.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and strength {strength.shape} must be 1-D of equal length")
    if np.unique(ids).size != ids.size:
        raise ValueError("ids must be unique")

    is_pos = strength == 1.0  # NaN compares False
    pos_ids = np.sort(ids[is_pos])
    if n_positive is not None:
        pos_ids = pos_ids[:n_positive]

    want = len(pos_ids) if n_negative is None else n_negative
    candidates = ~is_pos & ~np.isnan(strength)
    cand_ids, cand_s = ids[candidates], strength[candidates]
    order = np.lexsort((cand_ids, cand_s))  # primary key S, then id
    neg_ids = cand_ids[order[:want]]
    return pos_ids, neg_ids


# ---------------------------------------------------------------------------------------------
# Text normalisation (shared by training and inference)
# ---------------------------------------------------------------------------------------------

# Every character str.splitlines() treats as a line boundary, mapped to one space.
_BREAK_CHARS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAKS = str.maketrans({c: " " for c in _BREAK_CHARS})
_LINE_BREAK_CLASS = f"[{_BREAK_CHARS}]"


def normalize_for_fasttext(text: str) -> str:
    """Map every line separator (\\n, \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028, U+2029) to a space.

    fastText reads one example per line, so training lines and ``predict`` inputs must be
    single lines; one-to-one replacement keeps the text length unchanged.
    """
    return text.translate(_LINE_BREAKS)


def normalize_column_for_fasttext(texts: pa.Array | pa.ChunkedArray) -> list[str]:
    """``normalize_for_fasttext`` over an Arrow string column, in one vectorised pass (about 4×
    faster than per string on the demo corpus); nulls stay None."""
    return pc.replace_substring_regex(texts, _LINE_BREAK_CLASS, " ").to_pylist()
