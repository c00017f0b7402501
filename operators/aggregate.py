"""Ray Data building blocks for whole-run finalizers: the work over every row runs on the cluster.

Three shapes cover the finalizers (token premium, the global selections):

* ``colocated(ds, key)``: the rows reshuffled so that every row of one ``key`` value is in one
  block (a hash partition, as ``GroupedData.map_groups`` does), for per-group work vectorised
  over a whole block instead of one Python call per group;
* ``fold_sums(ds, keys)``: per-block partial sums combined one batch at a time on the driver,
  whose memory is the number of groups (languages, not documents);
* ``ordered_blocks(ds, keys, descending)``: a distributed sort whose blocks stay in the object
  store, in order; the driver holds one reference per block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

if TYPE_CHECKING:
    import ray

#: Rows per block after ``colocated`` (the per-group work holds one block in a worker's memory).
ROWS_PER_BLOCK = 250_000


def partitions_for(rows: int) -> int:
    """Blocks for ``rows`` rows: ⌈rows / ROWS_PER_BLOCK⌉, at least one per cluster CPU (when each
    gets at least 10,000 rows), at least 1."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, math.ceil(rows / ROWS_PER_BLOCK), min(cpus, rows // 10_000))


def colocated(ds: ray.data.Dataset, key: str, partitions: int) -> ray.data.Dataset:
    """``ds`` in ``partitions`` blocks, every row of one ``key`` value in the same block.

    The same shuffle as ``GroupedData.map_groups``: a hash partition on ``key`` (never split into
    smaller blocks), or a sort on ``key`` where the shuffle strategy has no hash partition. A
    ``map_batches(..., batch_size=None)`` after it sees whole groups.
    """
    from ray.data.context import ShuffleStrategy

    hashed = (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.GPU_SHUFFLE)
    if ds.context.shuffle_strategy in hashed:
        return ds.repartition(partitions, keys=[key])
    return ds.sort(key)


def fold_sums(ds: ray.data.Dataset, keys: list[str]) -> pl.DataFrame:
    """Σ of every other column of ``ds`` per ``keys``: the blocks' partial sums folded one batch
    at a time on the driver (memory: the number of distinct keys, not of rows)."""
    total: pl.DataFrame | None = None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        part = pl.from_arrow(batch)
        if not isinstance(part, pl.DataFrame) or part.height == 0:
            continue
        total = part if total is None else pl.concat([total, part], how="vertical_relaxed")
        values = [c for c in total.columns if c not in keys]
        total = total.group_by(keys, maintain_order=True).agg(pl.col(values).sum())
    return total if total is not None else pl.DataFrame()


def sum_partials(partials: pa.Table, keys: list[str]) -> pl.DataFrame:
    """``fold_sums`` of partial sums already on the driver (a small run's single block)."""
    frame = pl.from_arrow(partials)
    if not isinstance(frame, pl.DataFrame) or frame.height == 0:
        return pl.DataFrame()
    values = [c for c in frame.columns if c not in keys]
    return frame.group_by(keys, maintain_order=True).agg(pl.col(values).sum())


def ordered_blocks(ds: ray.data.Dataset, keys: list[str], descending: list[bool]) -> list[ray.ObjectRef]:
    """``ds`` sorted by ``keys`` on the cluster: references to its blocks (pyarrow tables), in
    order (the blocks themselves stay in the object store)."""
    return ds.sort(keys, descending=descending).to_arrow_refs()
