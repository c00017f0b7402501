"""Selection policies, applied to a whole run's scores: threshold, top fraction by characters, top percent.

``select_documents`` applies them in memory (the reference the hand-computed tests pin);
``select_dataset`` gives the same rows on the cluster, for runs larger than one machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

if TYPE_CHECKING:
    import ray

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


@dataclass(frozen=True)
class Position:
    """Where a slice of rows sits in the run's selection order, and the run's totals."""

    rows_before: int  #: scored rows before the slice
    chars_before: int  #: their characters (null n_chars count 0)
    scored_rows: int  #: N: rows with a score (not null, not NaN) in the whole run
    total_chars: int  #: Σ n_chars over every row of the run, scored or not


class ThresholdPolicy(StrictModel):
    """Keep documents with score ≥ ``threshold``."""

    policy: Literal["threshold"] = "threshold"
    threshold: float = Field(0.5, ge=0.0, le=1.0)

    def describe(self) -> str:
        return f"threshold({self.threshold:g})"

    def mask(self, scores: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        return select_threshold(scores, self.threshold)

    def ordered_mask(self, scores: np.ndarray, n_chars: np.ndarray, at: Position) -> np.ndarray:
        """``mask`` over a slice of the run's scored rows in selection order: score ≥ threshold."""
        return select_threshold(scores, self.threshold)


class TopFractionCharsPolicy(StrictModel):
    """Keep the highest-scoring documents until they hold ``fraction`` of all characters."""

    policy: Literal["top_fraction_chars"] = "top_fraction_chars"
    fraction: float = Field(0.10, ge=0.0, le=1.0)

    def describe(self) -> str:
        return f"top_fraction_chars({self.fraction:g})"

    def mask(self, scores: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        return select_top_fraction_by_chars(scores, n_chars, self.fraction)

    def ordered_mask(self, scores: np.ndarray, n_chars: np.ndarray, at: Position) -> np.ndarray:
        """``mask`` over a slice of the run's scored rows in selection order (the formula of
        ``select_top_fraction_by_chars``): kept iff the characters before the row,
        at.chars_before + Σ_{j<i} n_chars_j, are < fraction · at.total_chars."""
        n_chars = np.asarray(n_chars, dtype=np.int64)
        kept_before = at.chars_before + np.cumsum(n_chars) - n_chars
        return kept_before < self.fraction * float(at.total_chars)


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


def top_percent_count(n: int, percent: float) -> int:
    """⌈percent · n / 100⌉, rounded to 9 decimals first (5% of 40 is 2, never 3 by float error)."""
    return math.ceil(round(percent * n / 100, 9))


def top_percent_mask(scores: np.ndarray, percent: float) -> np.ndarray:
    """Keep the ⌈percent · N / 100⌉ highest of the N non-NaN scores (ties: earlier row first)."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(scores))
    n_keep = top_percent_count(valid.size, percent)
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

    def ordered_mask(self, scores: np.ndarray, n_chars: np.ndarray, at: Position) -> np.ndarray:
        """``mask`` over a slice of the run's scored rows in selection order: the row's place
        at.rows_before + i (from 0) is < ⌈percent · at.scored_rows / 100⌉."""
        n_keep = top_percent_count(at.scored_rows, self.percent)
        return at.rows_before + np.arange(len(scores)) < n_keep


# ---------------------------------------------------------------------------------------------
# The same selection over a Ray dataset: a distributed sort, per-block running sums, a filter.
# The driver holds a few numbers per block, never a row.
# ---------------------------------------------------------------------------------------------

#: Selection order: scored rows first, score descending, ties by (id, source_file, source_row)
#: ascending with nulls last, the order ``select_documents`` visits them in.
ORDER = ["scored", "score", "id", "source_file", "source_row"]
DESCENDING = [True, True, False, False, False]


def selection_rows(batch: pa.Table, score_column: str) -> pa.Table:
    """The columns selection needs, per document: ``scored`` (the score is neither null nor NaN),
    ``score`` (−inf where not scored, so every sort key is a number), ``id``, ``n_chars`` (the
    column, else len(text) in code points) and the lineage (null when absent)."""
    names = batch.column_names
    score = pc.cast(batch.column(score_column), pa.float64())
    scored = pc.fill_null(pc.invert(pc.is_nan(score)), False)
    n_chars = batch.column("n_chars") if "n_chars" in names else pc.utf8_length(batch.column("text"))
    n = batch.num_rows
    return pa.table({
        "scored": scored,
        "score": pc.if_else(scored, score, -math.inf),
        "id": pc.cast(batch.column("id"), pa.string()),
        "n_chars": pc.cast(n_chars, pa.int64()),
        "source_file": (pc.cast(batch.column("source_file"), pa.string()) if "source_file" in names
                        else pa.nulls(n, pa.string())),
        "source_row": (pc.cast(batch.column("source_row"), pa.int64()) if "source_row" in names
                       else pa.nulls(n, pa.int64())),
    })


def block_totals(block: pa.Table) -> tuple[int, int, int]:
    """(scored rows, their characters, the characters of every row) of one block."""
    scored = block.filter(block.column("scored"))
    chars = pc.sum(pc.fill_null(block.column("n_chars"), 0)).as_py() or 0
    return scored.num_rows, pc.sum(pc.fill_null(scored.column("n_chars"), 0)).as_py() or 0, chars


def select_block(block: pa.Table, at: Position, operator: str, policy: Any) -> tuple[pa.Table, int]:
    """The ``selected`` rows of one block of the sorted run, and their count.

    The block is a consecutive slice of the selection order (scored rows first), so a row's rank
    is at.rows_before + its place in the block + 1, and the policy keeps a prefix of the run.
    """
    rows = block.filter(block.column("scored"))
    keep = policy.ordered_mask(rows.column("score").to_numpy(),
                               pc.fill_null(rows.column("n_chars"), 0).to_numpy(), at)
    rank = at.rows_before + 1 + np.flatnonzero(keep)
    kept = rows.filter(pa.array(keep, pa.bool_()))
    table = pa.table({
        "id": kept.column("id"), "operator": pa.array([operator] * kept.num_rows, pa.string()),
        "policy": pa.array([policy.describe()] * kept.num_rows, pa.string()),
        "score": kept.column("score"), "n_chars": kept.column("n_chars"),
        "rank": pa.array(rank, pa.int64()), "source_file": kept.column("source_file"),
        "source_row": kept.column("source_row"),
    }).cast(SELECTED_SCHEMA)
    return table, table.num_rows


def select_dataset(docs: ray.data.Dataset, score_column: str, operator: str,
                   policy: ThresholdPolicy | TopFractionCharsPolicy | TopPercentPolicy
                   ) -> pa.Table | ray.data.Dataset:
    """``select_documents`` on the cluster, for runs too large for one machine.

    Same rows, order of ties and ``rank``: the documents are sorted by (scored, score desc, id,
    source_file, source_row) on the cluster; one task per sorted block counts its scored rows and
    characters; the driver turns those counts into each block's ``Position`` (running sums over
    blocks); one task per block keeps its rows. The kept rows stay on the cluster: a dataset
    (an empty ``pyarrow.Table`` when nothing is kept).
    """
    import ray

    from operators.aggregate import ordered_blocks

    rows = docs.map_batches(selection_rows, fn_kwargs={"score_column": score_column},
                            batch_size=None, batch_format="pyarrow")
    blocks = ordered_blocks(rows, ORDER, DESCENDING)
    totals = ray.get([ray.remote(block_totals).remote(b) for b in blocks])
    scored_rows = sum(t[0] for t in totals)
    total_chars = sum(t[2] for t in totals)
    task = ray.remote(num_returns=2)(select_block)
    tables, counts, rows_before, chars_before = [], [], 0, 0
    for block, (n_scored, scored_chars, _) in zip(blocks, totals, strict=True):
        at = Position(rows_before, chars_before, scored_rows, total_chars)
        table, count = task.remote(block, at, operator, policy)
        tables.append(table)
        counts.append(count)
        rows_before, chars_before = rows_before + n_scored, chars_before + scored_chars
    counts = ray.get(counts)
    if not sum(counts):
        return SELECTED_SCHEMA.empty_table()
    return ray.data.from_arrow_refs([t for t, n in zip(tables, counts, strict=True) if n])


def select_run(ctx: Any, score_column: str, operator: str,
               policy: ThresholdPolicy | TopFractionCharsPolicy | TopPercentPolicy) -> pa.Table | ray.data.Dataset:
    """A stage's ``selected`` table over the run's staged documents (a ``FinalizeContext``),
    selected on the cluster (``select_dataset``)."""
    names = ctx.documents_schema().names
    if score_column not in names:  # the stage adds it to every document: none were staged
        return SELECTED_SCHEMA.empty_table()
    columns = ["id", score_column, "n_chars" if "n_chars" in names else "text"]
    columns += [c for c in ("source_file", "source_row") if c in names]
    if not ctx.on_cluster:
        return select_table(ctx.documents_table(columns), score_column, operator, policy)
    return select_dataset(ctx.documents_dataset(columns), score_column, operator, policy)


def select_table(docs: pa.Table, score_column: str, operator: str,
                 policy: ThresholdPolicy | TopFractionCharsPolicy | TopPercentPolicy) -> pa.Table:
    """``select_dataset`` for a small run held on the driver: the same code over one block."""
    rows = selection_rows(docs, score_column)
    order = [(k, "descending" if d else "ascending", "at_end") for k, d in zip(ORDER, DESCENDING, strict=True)]
    block = rows.sort_by(order)
    n_scored, _, total_chars = block_totals(block)
    table, _ = select_block(block, Position(0, 0, n_scored, total_chars), operator, policy)
    return table
