"""Membership-inference scores: was a document part of the LM's pretraining data?

Pure functions over the per-token arrays the LM engine yields for one document, over the
positions i that have context (token x_i predicted from x_<i):

    lp_i      = ln p(x_i | x_<i)                      ``logprob``
    H_i       = -Σ_v p_v ln p_v                       ``entropy``
    E_i[ln²p] = Σ_v p_v (ln p_v)²                     ``logp2``
    x_i                                               ``token_ids``

Scores (higher = more likely a member, except perplexity and the ratios where *lower* is):

* ``perplexity``        exp(-mean lp)                                   (lower ⇒ member)
* ``min_k_prob``        Min-K% Prob, Shi et al. 2024, "Detecting Pretraining Data from Large
                        Language Models"
* ``min_k_plus_plus``   Min-K%++, Zhang et al. 2025, "Min-K%++: Improved Baseline for
                        Detecting Pretraining Data from Large Language Models"
* ``zlib_ratio``        Carlini et al. 2021, "Extracting Training Data from Large Language
                        Models"                                          (lower ⇒ member)
* ``lowercase_ratio``   Carlini et al. 2021                              (lower ⇒ member)
* ``dcpdd_score``       DC-PDD, Zhang et al. 2024, "Pretraining Data Detection for Large
                        Language Models: A Divergence-based Calibration Method"

Every score of an empty document (no scored position) is NaN; callers turn NaN into null.
Scores are computed in float64 and returned as Python floats.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import ArrayLike

#: Floor of the variance σ² in Min-K%++ (σ ≥ 1e-5), guarding a (near) one-hot distribution.
SIGMA2_EPS = 1e-10

_META_KEYS = ("n_tokens", "vocab_size", "model", "max_tokens_per_doc")
_OPTIONAL_META_KEYS = ("tokenizer_fingerprint", "source")  # absent in tables from older versions


def _f64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ``max(1, int(n·k))`` smallest values (the count the reference code uses)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if values.size == 0:
        return math.nan
    count = max(1, int(values.size * k))
    return float(np.partition(values, count - 1)[:count].mean())


def log_perplexity(logprob: ArrayLike) -> float:
    """log PPL = -(1/n) Σ_i lp_i; NaN for an empty document."""
    lp = _f64(logprob)
    return float(-lp.mean()) if lp.size else math.nan


def perplexity(logprob: ArrayLike) -> float:
    """PPL = exp(-(1/n) Σ_i lp_i); NaN for an empty document, inf past float64 range.

    Lower ⇒ more likely a member.
    """
    log_ppl = log_perplexity(logprob)
    return math.inf if log_ppl >= 709.0 else math.exp(log_ppl)


def min_k_prob(logprob: ArrayLike, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest k fraction of lp_i.

    The count is ``max(1, int(n·k))`` (floor, at least one), as in the reference implementations.
    Higher ⇒ more likely a member.
    """
    return _lowest_k_mean(_f64(logprob), k)


def min_k_plus_plus_z(logprob: ArrayLike, entropy: ArrayLike, logp2: ArrayLike) -> np.ndarray:
    """Per-token Min-K%++ statistic z_i = (lp_i - μ_i) / σ_i.

    μ_i = E_{v~p}[ln p_v] = -H_i and σ_i² = E[(ln p)²] - μ_i² = logp2_i - H_i², with σ_i² clamped
    below at ``SIGMA2_EPS`` (rounding can make it ≤ 0 for a near one-hot distribution).
    """
    lp, h, m2 = _f64(logprob), _f64(entropy), _f64(logp2)
    mu = -h
    sigma = np.sqrt(np.maximum(m2 - mu * mu, SIGMA2_EPS))
    return (lp - mu) / sigma


def min_k_plus_plus(logprob: ArrayLike, entropy: ArrayLike, logp2: ArrayLike, k: float = 0.2) -> float:
    """Min-K%++ (Zhang et al. 2025): mean of the lowest k fraction of z_i (``min_k_plus_plus_z``).

    Count ``max(1, int(n·k))`` as in ``min_k_prob``. Higher ⇒ more likely a member.
    """
    return _lowest_k_mean(min_k_plus_plus_z(logprob, entropy, logp2), k)


def zlib_ratio(logprob: ArrayLike, text: str) -> float:
    """zlib ratio (Carlini et al. 2021): log PPL / len(zlib.compress(text.encode("utf-8"))).

    ``text`` must be the span the log-probs score (both reference codes use one span for both).
    log PPL = -mean lp. Lower ⇒ more likely a member (low perplexity relative to the
    text's zlib entropy).
    """
    return log_perplexity(logprob) / len(zlib.compress(text.encode("utf-8")))


def lowercase_ratio(logprob: ArrayLike, logprob_lower: ArrayLike) -> float:
    """Lowercase ratio (Carlini et al. 2021): log PPL(x) / log PPL(lower(x)).

    NaN when either document is empty or log PPL(lower(x)) = 0. Lower ⇒ more likely a member.
    """
    num, den = log_perplexity(logprob), log_perplexity(logprob_lower)
    return num / den if den != 0.0 else math.nan


@dataclass(eq=False)
class FrequencyTable:
    """Token counts of a reference corpus, for DC-PDD's token frequency f(x).

    f(x) = (count(x) + 1) / (N + |V|)  (Laplace smoothing), N = Σ counts = ``n_tokens``, |V| the
    model's ``config.vocab_size``. Only the first ``max_tokens_per_doc`` tokens of each document are
    counted, BOS included where the tokenizer adds one (``count_reference_tokens``). The table is
    specific to a tokenizer: ``model`` names it, ``tokenizer_fingerprint`` identifies it
    (``operators.lm.models.tokenizer_fingerprint``), and ``source`` records what was counted (file
    list and content hash). The reference corpus must be disjoint from the documents scored, as in
    the paper: a reference that contains its targets calibrates their tokens away.
    """

    counts: np.ndarray
    n_tokens: int
    vocab_size: int
    model: str
    max_tokens_per_doc: int = 1024
    tokenizer_fingerprint: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        self.n_tokens, self.vocab_size = int(self.n_tokens), int(self.vocab_size)
        self.max_tokens_per_doc = int(self.max_tokens_per_doc)
        if self.counts.size != self.vocab_size:
            raise ValueError(f"counts has {self.counts.size} entries, vocab_size is {self.vocab_size}")
        if (self.counts < 0).any() or int(self.counts.sum()) != self.n_tokens:
            raise ValueError("counts must be non-negative and sum to n_tokens")

    @classmethod
    def from_token_ids(cls, token_ids: list[ArrayLike], vocab_size: int, model: str,
                       max_tokens_per_doc: int = 1024) -> FrequencyTable:
        """Count the first ``max_tokens_per_doc`` token ids of each document (``np.bincount``)."""
        parts = [np.asarray(t, dtype=np.int64).reshape(-1)[:max_tokens_per_doc] for t in token_ids]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        _check_ids(ids, vocab_size)
        counts = np.bincount(ids, minlength=vocab_size).astype(np.int64)
        return cls(counts, int(ids.size), vocab_size, model, max_tokens_per_doc)

    def freq(self, token_ids: ArrayLike) -> np.ndarray:
        """f(x) = (count(x) + 1) / (N + |V|) for each id (float64)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        _check_ids(ids, self.vocab_size)
        return (self.counts[ids] + 1.0) / (self.n_tokens + self.vocab_size)

    def merge(self, other: FrequencyTable) -> FrequencyTable:
        """Sum of two tables counted with the same tokenizer and truncation."""
        for key in ("vocab_size", "model", "max_tokens_per_doc"):
            if getattr(self, key) != getattr(other, key):
                raise ValueError(f"cannot merge tables with different {key}")
        if self.tokenizer_fingerprint != other.tokenizer_fingerprint:
            raise ValueError("cannot merge tables with different tokenizer_fingerprint")
        return FrequencyTable(self.counts + other.counts, self.n_tokens + other.n_tokens,
                              self.vocab_size, self.model, self.max_tokens_per_doc,
                              self.tokenizer_fingerprint)

    def save(self, path: str) -> None:
        """Write one Parquet file (columns token_id, count; the scalars in the schema metadata)."""
        meta = {k: json.dumps(getattr(self, k)) for k in (*_META_KEYS, *_OPTIONAL_META_KEYS)}
        table = pa.table({"token_id": pa.array(np.arange(self.vocab_size, dtype=np.int64)),
                          "count": pa.array(self.counts)}).replace_schema_metadata(meta)
        with fsspec.open(path, "wb") as f:
            pq.write_table(table, f)

    @classmethod
    def load(cls, path: str) -> FrequencyTable:
        """Read a table written by ``save`` (any fsspec URL)."""
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
        meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()
                if k.decode() in (*_META_KEYS, *_OPTIONAL_META_KEYS)}
        missing = set(_META_KEYS) - set(meta)
        if missing:
            raise ValueError(f"{path}: not a FrequencyTable (missing metadata {sorted(missing)})")
        counts = np.zeros(meta["vocab_size"], dtype=np.int64)
        counts[table.column("token_id").to_numpy()] = table.column("count").to_numpy()
        return cls(counts, **meta)

    @staticmethod
    def read_metadata(path: str) -> dict:
        """The scalars of a saved table (model, tokenizer_fingerprint, source, …) without its counts."""
        with fsspec.open(path, "rb") as f:
            schema = pq.read_schema(f)
        return {k.decode(): json.loads(v) for k, v in (schema.metadata or {}).items()
                if k.decode() in (*_META_KEYS, *_OPTIONAL_META_KEYS)}


def count_reference_tokens(tokenizer: Any, texts: list[str], max_tokens: int, vocab_size: int) -> np.ndarray:
    """Token counts [vocab_size] of a reference corpus, as DC-PDD's reference code counts them
    (``zhang-wei-chao/DC-PDD``, ``src/com_fre_dis.py``): ``tok.encode(text)[:max_tok]`` per document,
    so with the special tokens the tokenizer adds by default (its BOS), BOS included in the
    ``max_tokens``; |V| = ``vocab_size``, the model's ``config.vocab_size`` (the reference's
    ``vob_siz``, 50304 for Pythia, not the tokenizer's 50277)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
    flat = np.fromiter((i for row in ids for i in row[:max_tokens]), dtype=np.int64)
    _check_ids(flat, vocab_size)
    return np.bincount(flat, minlength=vocab_size).astype(np.int64)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")


def dcpdd_alpha(logprob: ArrayLike, freq: ArrayLike, a: float = 0.01) -> np.ndarray:
    """Per-token DC-PDD calibrated score α_i = min(-p_i · ln f(x_i), a), p_i = exp(lp_i)."""
    return np.minimum(-np.exp(_f64(logprob)) * np.log(_f64(freq)), a)


def dcpdd_score(token_ids: ArrayLike, logprob: ArrayLike, table: FrequencyTable, a: float = 0.01) -> float:
    """DC-PDD (Zhang et al. 2024): β = mean of α_i over the first occurrence of each distinct token.

    α_i = min(-p_i · ln f(x_i), a) (``dcpdd_alpha``) with f the Laplace-smoothed reference
    frequency of ``table``; the mean runs over the scored positions i where x_i appears for the
    first time in the document. β ∈ [0, a]; higher ⇒ more likely a member. NaN when empty.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    lp = _f64(logprob)
    if ids.size != lp.size:
        raise ValueError(f"token_ids ({ids.size}) and logprob ({lp.size}) are not aligned")
    if ids.size == 0:
        return math.nan
    _, first = np.unique(ids, return_index=True)
    # every α ≤ a, so β ≤ a; the clamp only removes the last-ulp rounding of the float mean
    return min(float(dcpdd_alpha(lp[first], table.freq(ids[first]), a).mean()), a)
