"""Staged data files: what a worker wrote, reported to the driver, which commits exactly those.

A worker writes each batch of a table as one Parquet file under
``<output>/_data/<table>/run_date=D/<run_id>/`` and returns a ``StagedFile``: the file's URL, rows,
bytes and Parquet footer (the ``FileMetaData`` the writer already holds). The commit turns each
footer into an Iceberg ``DataFile`` (as Ray's own Iceberg datasink does with the ``DataFile``s its
workers return) without opening any file again, and never lists a directory to find them: object
store listings are eventually consistent and cached, a worker's report is not.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table.metadata import TableMetadata

    from pipelines.tables import Output


@dataclass(frozen=True)
class StagedFile:
    """One data file a worker wrote for ``table``: its URL, rows, bytes and Parquet footer."""

    table: str
    url: str
    rows: int
    size: int
    footer: bytes  # pickled pyarrow.parquet.FileMetaData

    def metadata(self) -> pq.FileMetaData:
        return pickle.loads(self.footer)

    def arrow_schema(self) -> pa.Schema:
        return self.metadata().schema.to_arrow_schema()


def storable(table: pa.Table, run_date: str) -> pa.Table:
    """``table`` as a data file holds it: a ``run_date`` column, no null-typed columns."""
    table = table.drop_columns([f.name for f in table.schema if pa.types.is_null(f.type)])
    if "run_date" in table.column_names:
        table = table.drop_columns(["run_date"])
    return table.append_column("run_date", pa.array([run_date] * table.num_rows, pa.string()))


def stage_rows(output: Output, table: str, run_date: str, run_id: str, name: str,
               rows: pa.Table) -> StagedFile:
    """Write ``rows`` as one data file of ``table`` for this run (invisible until committed)."""
    path = f"{output.data_dir(table, run_date, run_id)}/{name}.parquet"
    data = storable(rows, run_date)
    fs = output.fs
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    collected: list[pq.FileMetaData] = []
    if output.is_local:  # a local reader must never see a partial file: write aside, then rename
        tmp = f"{path}.inprogress"
        with fs.open(tmp, "wb") as f:
            pq.write_table(data, f, compression="zstd", metadata_collector=collected)
            size = f.tell()
        fs.mv(tmp, path)
    else:  # an object appears whole when its upload completes
        with fs.open(path, "wb") as f:
            pq.write_table(data, f, compression="zstd", metadata_collector=collected)
            size = f.tell()
    return StagedFile(table, output.url_of(path), data.num_rows, size, pickle.dumps(collected[0]))


def by_table(files: Iterable[StagedFile]) -> dict[str, list[StagedFile]]:
    """``files`` grouped by table, each list sorted by URL (a stable commit order)."""
    grouped: dict[str, list[StagedFile]] = {}
    for f in files:
        grouped.setdefault(f.table, []).append(f)
    return {t: sorted(fs, key=lambda f: f.url) for t, fs in sorted(grouped.items())}


def encode_files(files: list[StagedFile]) -> bytes:
    """``files`` as one value of a stats row (Ray moves it to the driver)."""
    return pickle.dumps(files)


def decode_files(blobs: Iterable[bytes | None]) -> list[StagedFile]:
    """Every ``StagedFile`` of the stats rows' encoded values."""
    return [f for blob in blobs if blob for f in pickle.loads(blob)]


def data_file(metadata: TableMetadata, staged: StagedFile) -> DataFile:
    """The Iceberg ``DataFile`` of ``staged`` for a table with ``metadata``, from its reported footer
    (pyiceberg's ``parquet_file_to_data_file``, minus reading the footer back)."""
    from pyiceberg.io.pyarrow import (
        _check_pyarrow_schema_compatible,
        compute_statistics_plan,
        data_file_statistics_from_parquet_metadata,
        parquet_path_to_id_mapping,
    )
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

    footer = staged.metadata()
    schema = metadata.schema()
    _check_pyarrow_schema_compatible(schema, footer.schema.to_arrow_schema(),
                                     format_version=metadata.format_version)
    statistics = data_file_statistics_from_parquet_metadata(
        parquet_metadata=footer,
        stats_columns=compute_statistics_plan(schema, metadata.properties),
        parquet_column_mapping=parquet_path_to_id_mapping(schema),
    )
    return DataFile.from_args(
        content=DataFileContent.DATA, file_path=staged.url, file_format=FileFormat.PARQUET,
        partition=statistics.partition(metadata.spec(), schema), file_size_in_bytes=staged.size,
        sort_order_id=None, spec_id=metadata.default_spec_id, equality_ids=None, key_metadata=None,
        **statistics.to_serialized_dict(),
    )


def discard(output: Output, files: Iterable[StagedFile]) -> None:
    """Delete the files of a run that must not commit (no snapshot references them)."""
    fs = output.fs
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(fs._strip_protocol(f.url))
