"""PreSelect as a pipeline stage: score every document with the fastText scorer, then select.

Shum et al., "Predictive Data Selection" (arXiv:2503.00808). The math and the scorer live in
``operators.preselect``; this module is the thin stage around them:

* ``process`` (per batch, CPU actor pool): ``<score column> = P(__label__1 | text)`` from a fastText
  model loaded once per actor in ``build()``. The score column is ``preselect_score`` for the
  default stage name ``preselect`` and ``<name>_score`` for a stage named otherwise.
* ``finalize`` (once per run, over every staged document): a global selection policy,

      threshold:           keep d  iff  score(d) ≥ t
      top_fraction_chars:  keep the best-scored documents until they hold fraction · Σ_d n_chars(d)

  written to the ``selected`` table (one row per kept document; several selecting stages share
  the table and are told apart by ``operator``). NaN scores are never selected.
"""

from __future__ import annotations

import os
from typing import Annotated, ClassVar, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field

from operators.base import MiB, Resources, StageConfig, StrictModel
from operators.preselect import (
    load_scorer,
    normalize_column_for_fasttext,
    score_normalized,
    select_threshold,
    select_top_fraction_by_chars,
)

DEFAULT_STAGE = "preselect"

#: Columns of the shared ``selected`` table (plus lineage, so ids repeated across shards stay distinct).
SELECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("operator", pa.string()), ("policy", pa.string()),
    ("score", pa.float64()), ("n_chars", pa.int64()), ("rank", pa.int64()),
    ("source_file", pa.string()), ("source_row", pa.int64()),
])

#: Scorer loads in this process (one per actor); tests read it through ``scorer_loads()``.
_LOADS = 0


def scorer_loads() -> int:
    """How many fastText models ``PreSelectScorer`` has loaded in this process."""
    return _LOADS


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


SelectionPolicy = Annotated[ThresholdPolicy | TopFractionCharsPolicy, Field(discriminator="policy")]


class PreSelectConfig(StageConfig):
    """Score documents with a PreSelect fastText model and select the best globally."""

    op: Literal["preselect"] = "preselect"
    model: str = Field(description="fastText .bin trained by `curate preselect train`: path or fsspec URL.")
    selection: SelectionPolicy = TopFractionCharsPolicy()
    cpu_only: ClassVar[bool] = True
    default_memory: ClassVar[int] = 384 * MiB
    resources: Resources = Resources(num_cpus=1, concurrency=1, batch_size=4096)


    def provides(self) -> list[str]:
        return [self.score_column]

    @property
    def score_column(self) -> str:
        """``preselect_score`` for the default stage name, else ``<name>_score``."""
        return f"{self.stage_name}_score" if self.stage_name != DEFAULT_STAGE else "preselect_score"

    def build(self) -> PreSelectScorer:
        return PreSelectScorer(self.model, self.score_column)

    def finalize(self, ctx) -> dict[str, pa.Table]:
        return {"selected": select_documents(ctx.scan_documents(), self.score_column,
                                             self.stage_name, self.selection)}


class PreSelectScorer:
    """The operator: the fastText model, loaded once in the actor, scores each batch's texts."""

    def __init__(self, model: str, score_column: str) -> None:
        global _LOADS
        if "://" not in model and not os.path.exists(model):
            raise FileNotFoundError(f"preselect model not found: {model} "
                                    "(train one with `curate preselect train`)")
        self.model = load_scorer(model)
        _LOADS += 1
        self.score_column = score_column

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.score_column, pa.float64())])

    def process(self, batch: pa.Table) -> pa.Table:
        scores = score_normalized(self.model, normalize_column_for_fasttext(batch.column("text")))
        return pa.table({self.score_column: pa.array(scores, pa.float64())}, schema=self.output_schema())


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
