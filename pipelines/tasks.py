"""The run's read and write tasks: Ray tasks, not actors.

They live apart from ``pipelines.runner`` so that a worker running them imports only Arrow, fsspec
and the staging helpers, not every operator's config and torch: a task's first call pays its
imports, and on a small machine those seconds fall at the head (read) and tail (write) of a run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.cache import CachePlan
from pipelines.cache_stage import split_cache_rows
from pipelines.io import batch_key, read_shard
from pipelines.lost import LOST_COLUMN, STATS_KEY, lost_of
from pipelines.stage_runner import TIMING_PREFIX, fold_timing
from pipelines.staging import encode_files, stage_rows
from pipelines.storage import apply_storage
from pipelines.tables import RunLayout


def read_shards(batch: pa.Table, input_cfg: dict, storage: object = None) -> Iterator[pa.Table]:
    """The read task: the rows of the shards whose URLs are in ``batch`` (``pipelines.io.read_shard``)."""
    apply_storage(storage)  # input shards on the output's object store use its settings
    for url in batch.column("url").to_pylist():
        yield from read_shard(url, **input_cfg)


def write_staged(batch: pa.Table, layout: RunLayout, cache: CachePlan | None = None) -> pa.Table:
    """Last step (a Ray task per batch): write the batch's documents and quarantine rows to staging;
    emit its stats row, which names the files written (``files``: encoded ``StagedFile``s)."""
    # result cache (issue 26): stage the new entries and hit records, drop the cache's columns
    batch, cache_files, cache_counts = split_cache_rows(batch, layout, cache, f"part-{batch_key(batch)}")
    timing = fold_timing(batch)
    batch = batch.drop_columns([c for c in batch.column_names if c.startswith(TIMING_PREFIX)])
    bad = pc.is_valid(batch.column("quarantine_reason"))
    key = batch_key(batch)
    docs, quarantined = batch.filter(pc.invert(bad)), batch.filter(bad)
    written = list(cache_files)
    for table, rows in (("documents", docs), ("quarantine", quarantined)):
        if rows.num_rows:
            rows = rows.drop_columns([c for c in ("quarantine_reason", "quarantine_stage", "text_bytes",
                                                  LOST_COLUMN)
                                      if c in rows.column_names]) if table == "documents" else rows
            written.append(stage_rows(layout.output, table, layout.run_date, layout.run_id,
                                      f"part-{key}", rows))
    by_stage = Counter(quarantined.column("quarantine_stage").to_pylist())
    return pa.table({"key": [key], "rows": [batch.num_rows],
                     "quarantined_by": [json.dumps(by_stage)], "timing_by": [json.dumps(timing)],
                     "files": pa.array([encode_files(written)], pa.binary()),
                     "cache_by": [json.dumps(cache_counts)],
                     STATS_KEY: [lost_of(quarantined)]})  # rows lost in unreadable parts (pipelines.lost)
