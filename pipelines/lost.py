"""Rows the reader could not read, counted as what the file's metadata declares (for the error budget).

The read stage turns an unreadable part of a shard into one quarantine record (``pipelines.io``):

* a corrupt row group: its record carries ``rows_lost``, the rows the row-group metadata declares;
* an unreadable file (a truncated shard, no footer): its record has no ``source_row``; a file whose
  footer cannot be read declares nothing, so it counts as one unreadable file, with its own budget
  ``max_unreadable_files`` (default 0).

Each writer batch reports ``{"rows": Σ (rows_lost - 1), "files": [unreadable file URLs]}``; folded over
the run, the read stage's counts become::

    read rows_in      = records read        + Σ (rows_lost - 1)
    read quarantined  = records quarantined + Σ (rows_lost - 1)

so a corrupt row group of 10 rows counts 10 quarantined rows, not 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

#: Column of a file record: rows of the unreadable row group, as its metadata declares.
LOST_COLUMN = "rows_lost"
STATS_KEY = "lost"
READ_STAGE = "read"


class _Counts(Protocol):
    name: str
    rows_in: int
    rows_out: int
    quarantined: int


@dataclass
class Lost:
    """What a run could not read: extra rows beyond one per record, and the unreadable files."""

    rows: int = 0
    files: list[str] = field(default_factory=list)


def lost_of(quarantined: pa.Table) -> str:
    """JSON ``{"rows": Σ (rows_lost - 1), "files": [...]}`` of a batch's quarantine rows."""
    rows, files = 0, []
    if quarantined.num_rows and "quarantine_stage" in quarantined.column_names:
        read = quarantined.filter(pc.equal(quarantined.column("quarantine_stage"), READ_STAGE))
        if LOST_COLUMN in read.column_names:
            declared = pc.drop_null(read.column(LOST_COLUMN)).to_pylist()
            rows = sum(max(n - 1, 0) for n in declared)
        if read.num_rows and "source_row" in read.column_names:
            whole = read.filter(pc.is_null(read.column("source_row")))
            files = whole.column("source_file").to_pylist()
    return json.dumps({"rows": rows, "files": files})


def fold_lost(stats_rows: list[dict]) -> Lost:
    """Sum the writer batches' ``lost`` reports (rows without one report nothing)."""
    lost = Lost()
    for row in stats_rows:
        got = json.loads(row.get(STATS_KEY) or "{}")
        lost.rows += int(got.get("rows", 0))
        lost.files += [f for f in got.get("files", []) if f not in lost.files]
    return lost


def count_lost(stages: list[_Counts], lost: Lost) -> None:
    """Add the rows lost in unreadable row groups to the read stage's rows in and quarantined."""
    for stage in stages:
        if stage.name == READ_STAGE:
            stage.rows_in += lost.rows
            stage.quarantined += lost.rows
            return
