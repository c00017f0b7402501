"""How well does a selection method find a task's examples hidden in a pool? precision@n.

A labelled pool (``label`` = 1 for examples of the target task) and a few *other* examples of
the task (the target) are scored by three methods, each "more like the target" = higher:

    sae_jaccard     J(e_i, proto),  proto = mean_j e(t_j),  e = mean-pooled SAE codes (MoNA)
    sae_jaccard_max max_j J(e_i, e(t_j))   (nearest target example; see operators.sae.stage)
    cosine_hidden   cos(h̄_i, mean_j h̄(t_j)),  h̄ = mean-pooled raw layer-L states (same positions)
    bm25            max_j BM25(query = t_j, doc = x_i)   (per-example max; ``concat`` mode: one query
                    made of all target texts joined), bm25s with English stop words, no stemming

    precision@n = |top-n(scores) ∩ positives| / n,   n = ⌈fraction · N⌉ (ties: earlier row first)

With as many positives as n, precision@n is also recall@n. ``random`` = share of positives is the
expected precision of a random pick.

The demo task (``build_demo_selection_pool``): short everyday English sentences. Target: English
sentences 0–7 of the demo corpus's parallel set; the pool hides English sentences 8–23 (16
positives) among their German, French, Spanish and Italian translations (64, same length and
content, another language), 180 Python docs and 60 texts the demo model wrote: 320 rows, so the
positives are exactly 5% and precision@5% = recall@5%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

BM25Mode = Literal["max", "concat"]


# ---------------------------------------------------------------------------------------------
# Metrics and baselines (pure)
# ---------------------------------------------------------------------------------------------


def n_of(n: float, pool_size: int) -> int:
    """A count from ``n``: a fraction of the pool when 0 < n < 1 (⌈n · N⌉), else n itself."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    count = math.ceil(round(n * pool_size, 9)) if n < 1 else int(n)
    return min(count, pool_size)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores (NaN last; ties: earlier row first)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.argsort(-s, kind="stable")[:n]


def precision_at_n(scores: np.ndarray, labels: np.ndarray, n: float) -> float:
    """precision@n = |top-n(scores) ∩ {labels = 1}| / n (``n`` a count, or a fraction of the pool)."""
    labels = np.asarray(labels)
    if len(labels) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    count = n_of(n, len(labels))
    return float(labels[top_n(scores, count)].astype(bool).sum() / count) if count else math.nan


def cosine_to_mean(pool: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cos(x_i, c) = x_i·c / (‖x_i‖‖c‖), c = mean of the target rows: [N, H], [M, H] -> [N].

    A zero vector gets 0."""
    x = np.asarray(pool, dtype=np.float64)
    c = np.asarray(target, dtype=np.float64).mean(axis=0)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(c)
    return np.divide(x @ c, den, out=np.zeros(len(x)), where=den > 0)


def bm25_scores(pool_texts: Sequence[str], target_texts: Sequence[str], mode: BM25Mode = "max") -> np.ndarray:
    """BM25 of each pool text for the target (bm25s defaults: Lucene variant, k1 = 1.5, b = 0.75):

        BM25(q, d) = Σ_{w ∈ q} idf(w) · tf(w, d) / (tf(w, d) + k1 (1 − b + b |d| / avgdl)),
        idf(w) = ln(1 + (N − df(w) + 0.5) / (df(w) + 0.5))

    ``max``: max over target examples of BM25(example, doc); ``concat``: one query of all examples.
    """
    import bm25s

    def tokens(texts: Sequence[str]) -> list[list[str]]:
        return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)

    retriever = bm25s.BM25()
    retriever.index(tokens(pool_texts), show_progress=False)
    queries = tokens([" ".join(target_texts)] if mode == "concat" else target_texts)
    per_query = np.stack([retriever.get_scores(q) for q in queries])  # [Q, N]
    return per_query.max(axis=0).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionEval:
    """precision@n per method on one pool."""

    n: int
    pool_size: int
    positives: int
    precision: dict[str, float]

    def table(self) -> str:
        lines = [f"pool {self.pool_size} rows, {self.positives} positives; n = {self.n} "
                 f"({100 * self.n / self.pool_size:.1f}% of the pool)",
                 f"{'method':<16}{'precision@n':>12}"]
        lines += [f"{m:<16}{p:>12.3f}" for m, p in self.precision.items()]
        return "\n".join(lines)


def evaluate_selection(pool: pa.Table, target: pa.Table, model: str | Path, sae: str | Path, layer: int,
                       n: float = 0.05, max_tokens: int = 256, bm25_mode: BM25Mode = "max",
                       label_column: str = "label", skip_first: int = 0) -> SelectionEval:
    """Embed pool and target with the LM + SAE head (as the ``lm`` stage does); score; precision@n."""
    from operators.sae.embed import embed_texts, open_tap_engine
    from operators.sae.head import SAEHead
    from operators.sae.head_params import SAEHeadParams
    from operators.sae.stage import reference_rows, similarity

    pool_texts, target_texts = pool.column("text").to_pylist(), target.column("text").to_pylist()
    labels = np.asarray(pool.column(label_column).to_pylist(), dtype=np.int64)
    engine = open_tap_engine(str(model), layer, max_tokens=max_tokens)
    head = SAEHead(SAEHeadParams(sae=str(sae), layer=layer, hidden_mean=True, skip_first=skip_first),
                   engine.model_info())
    emb_pool, emb_target = embed_texts(engine, head, pool_texts), embed_texts(engine, head, target_texts)
    scores = {
        "sae_jaccard": similarity(emb_pool.idx, emb_pool.val, reference_rows(emb_target, "prototype")),
        "sae_jaccard_max": similarity(emb_pool.idx, emb_pool.val, reference_rows(emb_target, "max")),
        "cosine_hidden": cosine_to_mean(emb_pool.hidden_mean, emb_target.hidden_mean[emb_target.ok]),
        f"bm25_{bm25_mode}": bm25_scores(pool_texts, target_texts, bm25_mode),
    }
    count = n_of(n, len(labels))
    precision = {m: precision_at_n(s, labels, count) for m, s in scores.items()}
    precision["random"] = float(labels.mean())
    return SelectionEval(count, len(labels), int(labels.sum()), precision)
