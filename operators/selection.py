"""Selection policies, applied to a whole run's scores: threshold, top fraction by characters, top percent."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from operators.base import StrictModel

# ---------------------------------------------------------------------------------------------
# Selection policies (global: they see the whole run's score column)
# ---------------------------------------------------------------------------------------------


def select_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Keep documents with score ≥ threshold; NaN scores are never selected."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores >= threshold  # NaN >= t is False


def select_top_fraction_by_chars(
    scores: np.ndarray, n_chars: np.ndarray, fraction: float = 0.10
) -> np.ndarray:
    """Keep the highest-scoring documents until they hold ``fraction`` of all characters.

    budget = fraction · Σ n_chars over *all* documents (NaN-scored ones count towards the
    total but are never selected). Documents are visited by score descending, ties in input
    order (stable sort); a document is kept iff the characters kept *before* it are < budget,
    so the document that crosses the budget is included ("until reached") and the kept
    characters are ≥ budget unless the non-NaN documents run out. fraction = 0 keeps nothing.

    Returns:
        bool mask aligned with the input.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_chars = np.asarray(n_chars, dtype=np.int64)
    if scores.shape != n_chars.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and n_chars {n_chars.shape} must be 1-D of equal length")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if (n_chars < 0).any():
        raise ValueError("n_chars must be non-negative")

    budget = fraction * float(n_chars.sum())
    valid = np.flatnonzero(~np.isnan(scores))
    order = valid[np.argsort(-scores[valid], kind="stable")]  # score desc, ties by input order
    kept_before = np.cumsum(n_chars[order]) - n_chars[order]  # chars kept before each doc
    mask = np.zeros(scores.shape, dtype=bool)
    mask[order[kept_before < budget]] = True
    return mask


#: Columns of the shared ``selected`` table (plus lineage, so ids repeated across shards stay distinct).
SELECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("operator", pa.string()), ("policy", pa.string()),
    ("score", pa.float64()), ("n_chars", pa.int64()), ("rank", pa.int64()),
    ("source_file", pa.string()), ("source_row", pa.int64()),
])


class ThresholdPolicy(StrictModel):
    """Keep documents with score ≥ ``threshold``."""

    policy: Literal["threshold"] = "threshold"
    threshold: float = Field(0.5, ge=0.0, le=1.0)

    def describe(self) -> str:
        return f"threshold({self.threshold:g})"

    def mask(self, scores: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        return select_threshold(scores, self.threshold)


class TopFractionCharsPolicy(StrictModel):
    """Keep the highest-scoring documents until they hold ``fraction`` of all characters."""

    policy: Literal["top_fraction_chars"] = "top_fraction_chars"
    fraction: float = Field(0.10, ge=0.0, le=1.0)

    def describe(self) -> str:
        return f"top_fraction_chars({self.fraction:g})"

    def mask(self, scores: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        return select_top_fraction_by_chars(scores, n_chars, self.fraction)


def select_documents(docs: pl.LazyFrame, score_column: str, operator: str,
                     policy: ThresholdPolicy | TopFractionCharsPolicy) -> pa.Table:
    """Apply ``policy`` to the whole run's scores; one ``selected`` row per kept document.

    Rows are ordered by (id, source_file, source_row) before selecting, so ties in score are
    broken by id, deterministically. ``rank`` is 1 for the best kept document (score descending,
    then the same tie order). ``n_chars`` is the input's ``n_chars`` column when present (the
    token-premium stage adds it), else len(text) in code points; both count the same thing.
    """
    names = docs.collect_schema().names()
    if score_column not in names:  # the stage adds it to every document: none were staged
        return SELECTED_SCHEMA.empty_table()
    n_chars = pl.col("n_chars") if "n_chars" in names else pl.col("text").str.len_chars()
    lineage = [pl.col(c) if c in names else pl.lit(None).alias(c) for c in ("source_file", "source_row")]
    frame = (docs.select(pl.col("id").cast(pl.String), pl.col(score_column).cast(pl.Float64).alias("score"),
                         n_chars.cast(pl.Int64).alias("n_chars"), *lineage)
             .sort(["id", "source_file", "source_row"], nulls_last=True)
             .collect())
    scores = frame["score"].fill_null(np.nan).to_numpy()
    keep = policy.mask(scores, frame["n_chars"].fill_null(0).to_numpy())
    kept = (frame.filter(pl.Series(keep))
            .with_row_index("order")
            .sort(["score", "order"], descending=[True, False])
            .with_row_index("rank", offset=1))
    return pa.table({
        "id": kept["id"].to_arrow(), "operator": [operator] * kept.height,
        "policy": [policy.describe()] * kept.height, "score": kept["score"].to_arrow(),
        "n_chars": kept["n_chars"].to_arrow(), "rank": kept["rank"].cast(pl.Int64).to_arrow(),
        "source_file": kept["source_file"].cast(pl.String).to_arrow(),
        "source_row": kept["source_row"].cast(pl.Int64).to_arrow(),
    }).cast(SELECTED_SCHEMA)


def top_percent_mask(scores: np.ndarray, percent: float) -> np.ndarray:
    """Keep the ⌈percent · N / 100⌉ highest of the N non-NaN scores (ties: earlier row first)."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(scores))
    n_keep = math.ceil(round(percent * valid.size / 100, 9))
    order = valid[np.argsort(-scores[valid], kind="stable")]
    mask = np.zeros(scores.shape, dtype=bool)
    mask[order[:n_keep]] = True
    return mask


class TopPercentPolicy(StrictModel):
    """Keep the best ``percent`` % of the scored documents (by count)."""

    percent: float = Field(5.0, gt=0, le=100)

    def describe(self) -> str:
        return f"top_percent({self.percent:g})"

    def mask(self, scores: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        return top_percent_mask(scores, self.percent)
