"""Whole-run steps after the streaming pass: what a stage's ``finalize`` gets to work with.

Global decisions (a selection threshold over the run, premiums over all languages) cannot be made
per batch; they read the staged ``documents`` table lazily (only the columns they need) here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.dataset as pads
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines.tables import RunLayout


@dataclass
class FinalizeContext:
    """The staged run a finalizer reads, and where it may put report files."""

    layout: RunLayout
    report_dir: Path
    #: The run reads part of a night (a quarantine replay): skip checks that need the whole corpus.
    partial: bool = False

    def scan_documents(self) -> pl.LazyFrame:
        """Lazy frame over the staged ``documents`` of this run (quarantined rows excluded)."""
        return scan_staged(self.layout, ["documents"])


def scan_staged(layout: RunLayout, tables: list[str]) -> pl.LazyFrame:
    """Lazy union of staged tables (missing columns become null)."""
    files = []
    for table in tables:
        staged = layout.staging_dir(table)
        if layout.fs.exists(staged):
            files += sorted(p for p in layout.fs.find(staged) if p.endswith(".parquet"))
    if not files:
        return pl.LazyFrame({"id": []}, schema={"id": pl.String})
    filesystem = PyFileSystem(FSSpecHandler(layout.fs))
    frames = [pl.scan_pyarrow_dataset(pads.dataset(f, filesystem=filesystem, format="parquet"))
              for f in files]
    return pl.concat(frames, how="diagonal_relaxed")
