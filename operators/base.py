"""What every operator shares: its resource declaration, its stage config, its batch interface.

An operator computes new columns for a batch of documents (a pyarrow Table). It does not know
where it runs: the pipeline builder wraps it in a Ray Data actor stage sized by ``Resources``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import ray

MiB = 1 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a size string: ``936MiB``, ``1.5GiB``, ``512M`` (binary units)."""
    if isinstance(value, int | float):
        return int(value)
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (bytes, or a number with KiB/MiB/GiB/TiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()[:1]])


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
    memory: int | None = Field(
        None, gt=0, description="Bytes of RAM reserved per actor (or '2GiB'); default: the stage's measured "
        "need (``StageConfig.memory_bytes``).")
    nice: int = Field(
        0, ge=0, le=19, description="Added to the niceness of the stage's actor processes (Unix), before the "
        "operator is built. A light stage with nice > 0 leaves the cores to a model stage's load and batches "
        "when they compete (a small machine); on an idle node it changes nothing.")
    share: str | None = Field(
        None, min_length=1, description="A label: consecutive stages with the same label run in one actor pool, "
        "each actor passing every batch through their operators in order (pipelines.pools): one process "
        "instead of several for light stages next to each other. They must agree on concurrency and "
        "num_gpus; the pool takes the largest num_cpus and nice, the smallest batch_size and the sum of "
        "their memory.")

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("concurrency")
    @classmethod
    def _pool_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1:
            raise ValueError("an actor pool needs at least 1 actor: use n >= 1, or [min, max] with min >= 1")
        if high < low:
            raise ValueError(f"[min, max] with max < min: {list(value)}")  # type: ignore[arg-type]
        return value

    @property
    def min_actors(self) -> int:
        """Actors that must run at once (the pool size, or its minimum)."""
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]


class Operator(Protocol):
    """A constructed operator, living inside one Ray actor (loaded once, reused for every batch)."""

    def output_schema(self) -> pa.Schema:
        """The columns this operator adds (names and types), also for rows it does not process."""
        ...

    def process(self, batch: pa.Table) -> pa.Table:
        """Return the new columns for ``batch`` (same number of rows, same order)."""
        ...


class Need(NamedTuple):
    """A column a stage reads that an earlier stage must make, and the config field that asks for it.

    ``columns`` are alternatives (any one will do). With ``prefix`` the field's value is a column
    prefix (a model name, ``<prefix>__<suffix>``): the plan check then lists, as the valid
    choices, the prefixes whose columns of the same suffix earlier stages make.
    """

    columns: tuple[str, ...]
    field: str
    value: Any
    hint: str = ""
    prefix: bool = False


class PlanError(ValueError):
    """A stage's reference that the rest of the plan does not satisfy (raised by ``bind``)."""

    def __init__(self, field: str, value: Any, message: str, choices: list[str] | None = None) -> None:
        self.field, self.value, self.choices = field, value, choices
        super().__init__(message)


class RunFailed(RuntimeError):
    """The night cannot commit a meaningful result (error budget passed, a whole-run check failed).

    The run is recorded as ``failed`` with this message and commits no table.
    """


#: Base columns every batch has after the read (see ``pipelines.io.read_shard``).
BASE_COLUMNS = ("id", "text", "source_file", "source_row")


class StageConfig(StrictModel):
    """Config of one pipeline stage. Subclasses set ``op`` as a Literal and implement ``build``."""

    op: str
    name: str | None = Field(None, description="Stage name in summaries; defaults to the op.")
    resources: Resources = Resources()
    max_quarantine_share: float | None = Field(
        None, ge=0, le=1, description="Fail the run when this stage quarantines more than this share "
        "of the rows it receives (default: only the run's budget applies).")

    #: True for operators that never use a GPU: asking for one is a config error.
    cpu_only: ClassVar[bool] = False
    #: RAM one actor uses, measured on the demo data (docs/config.md, "Memory defaults"); ``resources.memory`` overrides.
    default_memory: ClassVar[int] = 512 * MiB
    #: Result cache (``pipelines.cache``): bump when the operator computes something else for the same
    #: text and config, so the cached results of the older code miss.
    cache_version: ClassVar[int] = 1
    #: Config fields that never change a row's output (resources, finalize-only settings): left out
    #: of the cache key. Subclasses add theirs (``StageConfig.cache_ignore | {...}``).
    cache_ignore: ClassVar[frozenset[str]] = frozenset({"name", "resources", "max_quarantine_share"})
    #: Distributions whose code computes the output: their versions are part of the cache key.
    cache_packages: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _no_gpu_for_cpu_only(self) -> StageConfig:
        if self.cpu_only and self.resources.num_gpus:
            raise ValueError(f"resources.num_gpus: {self.op} runs on CPU; set num_gpus to 0")
        return self

    @property
    def stage_name(self) -> str:
        return self.name or self.op

    def requires(self) -> list[Need]:
        """Columns made by earlier stages that this stage reads (``text`` and input columns aside)."""
        return []

    def provides(self) -> list[str]:
        """Columns this stage adds to every row (those known from the config)."""
        return []

    def bind(self, earlier: list[StageConfig]) -> StageConfig:
        """Resolve references to earlier stages (raise ``PlanError``); returns the stage to run."""
        return self

    def memory_bytes(self) -> int:
        """RAM reserved per actor: ``resources.memory``, else the stage's measured default."""
        return self.resources.memory or self.default_memory

    def build(self) -> Operator:
        """Construct the operator (called once inside each actor)."""
        raise NotImplementedError

    def finalize(self, ctx: Any) -> dict[str, pa.Table | ray.data.Dataset]:
        """Global, whole-run work after the streaming pass (e.g. a selection threshold).

        Receives a ``pipelines.finalize.FinalizeContext``; returns extra tables by name: a small
        ``pyarrow.Table`` (staged by the driver) or a ``ray.data.Dataset`` (staged by workers).
        Work over every row runs on the cluster (``ctx.documents_dataset``), so that the driver's
        memory does not grow with the number of rows.
        """
        return {}
