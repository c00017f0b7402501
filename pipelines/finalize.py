"""Whole-run steps after the streaming pass: what a stage's ``finalize`` gets to work with.

Global decisions (a selection threshold over the run, premiums over all languages) cannot be made
per batch. A finalizer reads the files the workers reported for this run (never a listing), either
lazily on the driver (``scan_documents``, for small aggregates) or as a Ray dataset
(``documents_dataset``), so that work over every row runs on the cluster. It returns its tables:
a ``pyarrow.Table`` (small: staged by the driver) or a ``ray.data.Dataset`` (staged by workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines.staging import StagedFile, decode_files, encode_files, stage_rows
from pipelines.tables import RunLayout

#: Runs with at most this many staged documents finalize on the driver (``FinalizeContext.on_cluster``).
LOCAL_ROWS = 200_000


def local_rows() -> int:
    """``$CURATE_FINALIZE_LOCAL_ROWS`` (tests set 0 to force the Ray path), else ``LOCAL_ROWS``."""
    return int(os.environ.get("CURATE_FINALIZE_LOCAL_ROWS", LOCAL_ROWS))


@dataclass
class FinalizeContext:
    """The staged run a finalizer reads, and where it may put report files."""

    layout: RunLayout
    report_dir: Path
    staged: list[StagedFile] = field(default_factory=list)
    #: The run reads part of a night (a quarantine replay): skip checks that need the whole corpus.
    partial: bool = False

    def documents_files(self) -> list[str]:
        """URLs of the staged ``documents`` files of this run."""
        return sorted(f.url for f in self.staged if f.table == "documents")

    def documents_schema(self) -> pa.Schema:
        """The union of the staged ``documents`` files' schemas, from the footers their writers
        reported (no file is opened); empty when none were staged."""
        schemas = [f.arrow_schema() for f in self.staged if f.table == "documents"]
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])

    def documents_rows(self) -> int:
        """Rows in the staged ``documents`` files (from the writers' reports)."""
        return sum(f.rows for f in self.staged if f.table == "documents")

    def scan_documents(self) -> pl.LazyFrame:
        """Lazy frame over the staged ``documents`` of this run (quarantined rows excluded)."""
        return scan_staged(self.layout, self.staged, ["documents"])

    @property
    def on_cluster(self) -> bool:
        """True when the run is large enough for the finalizers to run as Ray aggregations; below
        ``LOCAL_ROWS`` staged documents they apply the same per-block code to the run as one block
        on the driver (whose memory is then bounded by ``LOCAL_ROWS``), without Ray's fixed cost."""
        return self.documents_rows() > local_rows()

    def documents_table(self, columns: list[str] | None = None) -> pa.Table:
        """The staged ``documents`` as one table on the driver (small runs: ``on_cluster`` False)."""
        files = self.documents_files()
        if not files:
            return pa.table({c: pa.array([], pa.null()) for c in columns or ["id"]})
        fs = PyFileSystem(FSSpecHandler(self.layout.fs))
        paths = [self.layout.fs._strip_protocol(f) for f in files]
        return pads.dataset(paths, filesystem=fs, format="parquet",
                            schema=self.documents_schema()).to_table(columns=columns)

    def documents_dataset(self, columns: list[str] | None = None) -> ray.data.Dataset:
        """The staged ``documents`` as a Ray dataset (only ``columns`` when given), read by workers."""
        files = self.documents_files()
        if not files:
            return ray.data.from_arrow(pa.table({c: pa.array([], pa.null()) for c in columns or ["id"]}))
        fs = PyFileSystem(FSSpecHandler(self.layout.fs))
        paths = [self.layout.fs._strip_protocol(f) for f in files]
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns)

    def stage(self, table: str, rows: pa.Table | ray.data.Dataset, name: str) -> list[StagedFile]:
        """Stage a finalizer's table with this run: a small table from the driver, a dataset by the
        workers (one file per block); the files written."""
        if isinstance(rows, pa.Table):
            return [stage_rows(self.layout.output, table, self.layout.run_date, self.layout.run_id, name, rows)]
        return stage_dataset(self.layout, table, rows, name)


def _write_block(batch: pa.Table, layout: RunLayout, table: str, name: str) -> pa.Table:
    import uuid

    written = [] if batch.num_rows == 0 else [
        stage_rows(layout.output, table, layout.run_date, layout.run_id, f"{name}-{uuid.uuid4().hex[:12]}", batch)]
    return pa.table({"files": pa.array([encode_files(written)], pa.binary())})


def stage_dataset(layout: RunLayout, table: str, rows: ray.data.Dataset, name: str) -> list[StagedFile]:
    """Write ``rows`` as data files of ``table`` from Ray tasks; the files they report."""
    reports = rows.map_batches(_write_block, fn_kwargs={"layout": layout, "table": table, "name": name},
                               batch_size=None, batch_format="pyarrow").take_all()
    return decode_files(r["files"] for r in reports)


def scan_staged(layout: RunLayout, files: list[StagedFile], tables: list[str]) -> pl.LazyFrame:
    """Lazy union of the reported files of ``tables`` (missing columns become null)."""
    paths = sorted(layout.fs._strip_protocol(f.url) for f in files if f.table in tables)
    if not paths:
        return pl.LazyFrame({"id": []}, schema={"id": pl.String})
    filesystem = PyFileSystem(FSSpecHandler(layout.fs))
    frames = [pl.scan_pyarrow_dataset(pads.dataset(p, filesystem=filesystem, format="parquet"))
              for p in paths]
    return pl.concat(frames, how="diagonal_relaxed")
