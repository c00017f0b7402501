"""What every operator shares: its resource declaration, its stage config, its batch interface.

An operator computes new columns for a batch of documents (a pyarrow Table). It does not know
where it runs: the pipeline builder wraps it in a Ray Data actor stage sized by ``Resources``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(StrictModel):
    """Where and how a stage runs. Every field maps onto Ray Data ``map_batches``."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor (fractions allowed).")
    concurrency: int | tuple[int, int] = Field(
        1, description="Actors in the pool: a fixed size, or (min, max) to autoscale."
    )
    batch_size: int = Field(256, gt=0, description="Rows per batch handed to the operator.")


class Operator(Protocol):
    """A constructed operator, living inside one Ray actor (loaded once, reused for every batch)."""

    def output_schema(self) -> pa.Schema:
        """The columns this operator adds (names and types), also for rows it does not process."""
        ...

    def process(self, batch: pa.Table) -> pa.Table:
        """Return the new columns for ``batch`` (same number of rows, same order)."""
        ...


class StageConfig(StrictModel):
    """Config of one pipeline stage. Subclasses set ``op`` as a Literal and implement ``build``."""

    op: str
    name: str | None = Field(None, description="Stage name in summaries; defaults to the op.")
    resources: Resources = Resources()

    #: Columns the stage reads; the plan checks that an earlier stage or the input provides them.
    requires: ClassVar[tuple[str, ...]] = ("text",)
    #: True for operators that never use a GPU: asking for one is a config error.
    cpu_only: ClassVar[bool] = False

    @model_validator(mode="after")
    def _no_gpu_for_cpu_only(self) -> StageConfig:
        if self.cpu_only and self.resources.num_gpus:
            raise ValueError(f"resources.num_gpus: {self.op} runs on CPU; set num_gpus to 0")
        return self

    @property
    def stage_name(self) -> str:
        return self.name or self.op

    def build(self) -> Operator:
        """Construct the operator (called once inside each actor)."""
        raise NotImplementedError

    def finalize(self, ctx: Any) -> dict[str, pa.Table]:
        """Global, whole-run work after the streaming pass (e.g. a selection threshold).

        Receives a ``pipelines.finalize.FinalizeContext``; returns extra tables by name.
        """
        return {}
