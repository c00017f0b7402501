"""PreSelect as a pipeline stage: score every document with the fastText scorer, then select.

Shum et al., "Predictive Data Selection" (arXiv:2503.00808). The math lives in
``operators.preselect.math``, the fastText scorer in ``operators.preselect.scorer`` and the policies in ``operators.selection``; this module is the thin stage around them:

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
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from operators.base import MiB, Resources, StageConfig
from operators.preselect.math import normalize_column_for_fasttext
from operators.preselect.scorer import load_scorer, score_normalized
from operators.selection import ThresholdPolicy, TopFractionCharsPolicy, select_run

if TYPE_CHECKING:
    import ray

DEFAULT_STAGE = "preselect"

SelectionPolicy = Annotated[ThresholdPolicy | TopFractionCharsPolicy, Field(discriminator="policy")]


class PreSelectConfig(StageConfig):
    """Score documents with a PreSelect fastText model and select the best globally."""

    op: Literal["preselect"] = "preselect"
    model: str = Field(description="fastText .bin trained by `curate preselect train`: path or fsspec URL.")
    selection: SelectionPolicy = TopFractionCharsPolicy()
    cpu_only: ClassVar[bool] = True
    default_memory: ClassVar[int] = 384 * MiB
    cache_ignore: ClassVar[frozenset[str]] = StageConfig.cache_ignore | {"selection"}
    cache_packages: ClassVar[tuple[str, ...]] = ("fasttext",)
    resources: Resources = Resources(num_cpus=1, concurrency=1, batch_size=4096)

    def provides(self) -> list[str]:
        return [self.score_column]


    @property
    def score_column(self) -> str:
        """``preselect_score`` for the default stage name, else ``<name>_score``."""
        return f"{self.stage_name}_score" if self.stage_name != DEFAULT_STAGE else "preselect_score"

    def build(self) -> PreSelectScorer:
        return PreSelectScorer(self.model, self.score_column)

    def finalize(self, ctx) -> dict[str, pa.Table | ray.data.Dataset]:
        return {"selected": select_run(ctx, self.score_column, self.stage_name, self.selection)}


class PreSelectScorer:
    """The operator: the fastText model, loaded once in the actor, scores each batch's texts."""

    def __init__(self, model: str, score_column: str) -> None:
        if "://" not in model and not os.path.exists(model):
            raise FileNotFoundError(f"preselect model not found: {model} "
                                    "(train one with `curate preselect train`)")
        self.model = load_scorer(model)
        self.score_column = score_column

    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.score_column, pa.float64())])

    def process(self, batch: pa.Table) -> pa.Table:
        scores = score_normalized(self.model, normalize_column_for_fasttext(batch.column("text")))
        return pa.table({self.score_column: pa.array(scores, pa.float64())}, schema=self.output_schema())
