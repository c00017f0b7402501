"""Reading input shards and writing staged batches, over any fsspec URL.

Reading turns each shard into normalised batches: ``id``, ``text``, the shard's other columns,
``source_file``/``source_row`` (lineage) and ``quarantine_reason``/``quarantine_stage``. Problems
become quarantine rows naming the file, row and field; nothing is dropped silently:

* an unreadable file yields one quarantine record for the file (its rows cannot be counted);
* a shard without ``text``, or with a non-string ``text``, quarantines every row of the shard;
* null, empty or whitespace text, invalid UTF-8, control characters and over-long text quarantine
  that row.

``id`` is kept when present; otherwise it is derived as a stable content hash of the text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LINEAGE = ("source_file", "source_row")
QUARANTINE = ("quarantine_reason", "quarantine_stage")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STRING_TYPES = (pa.string(), pa.large_string())
_BINARY_TYPES = (pa.binary(), pa.large_binary())


class InputError(ValueError):
    """The input as a whole cannot be read (no shards, bad URL)."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for ``url`` (plain paths are local)."""
    return fsspec.core.url_to_fs(url)


def is_process_local(url: str) -> bool:
    """True for filesystems that live in one process (``memory://``): Ray workers can't see them."""
    fs, _ = url_to_fs(url)
    return "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def list_shards(url: str) -> list[str]:
    """Every ``*.parquet`` under a directory (or matching a glob), sorted, as full URLs."""
    fs, path = url_to_fs(url)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".parquet")]
    elif fs.exists(path):
        found = [path]
    else:
        raise InputError(f"input not found: {url}")
    found = sorted(p for p in found if not _hidden(p.removeprefix(path)))
    if not found:
        raise InputError(f"input {url} holds no .parquet files")
    return [fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p
            for p in found]


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/") if part)


def content_id(text: str) -> str:
    """Stable document id: the first 16 hex digits of sha1(utf-8 text)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_shard(url: str, text_column: str = "text", id_column: str = "id",
               batch_rows: int = 1024, max_text_bytes: int = 10_000_000) -> Iterator[pa.Table]:
    """Yield normalised batches of one shard; never raises for bad data (it quarantines)."""
    fs, path = url_to_fs(url)
    try:
        handle = fs.open(path, "rb")
        parquet = pq.ParquetFile(handle)
    except Exception as err:  # noqa: BLE001 - any failure to open is reported, not raised
        yield _file_record(url, f"unreadable Parquet file {url}: {type(err).__name__}: {err}")
        return
    with handle:
        schema = parquet.schema_arrow
        problem = _schema_problem(schema, text_column, url)
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                table = pa.Table.from_batches([batch])
                yield normalise(table, url, row, text_column, id_column, max_text_bytes, problem)
                row += table.num_rows
        except Exception as err:  # noqa: BLE001 - a corrupt row group quarantines the rest
            yield _file_record(url, f"corrupt Parquet data in {url} after row {row}: {err}", row)


def _schema_problem(schema: pa.Schema, text_column: str, url: str) -> str | None:
    if text_column not in schema.names:
        return f"shard {url} has no '{text_column}' column (columns: {', '.join(schema.names)})"
    kind = schema.field(text_column).type
    if kind not in _STRING_TYPES + _BINARY_TYPES:
        return f"column '{text_column}' in {url} has type {kind}, expected string"
    return None


def _file_record(url: str, reason: str, row: int | None = None) -> pa.Table:
    return pa.table({
        "id": pa.array([None], pa.string()), "text": pa.array([None], pa.string()),
        "source_file": [url], "source_row": pa.array([row], pa.int64()),
        "quarantine_reason": [reason], "quarantine_stage": ["read"],
    })


def normalise(table: pa.Table, url: str, first_row: int, text_column: str, id_column: str,
              max_text_bytes: int, shard_problem: str | None = None) -> pa.Table:
    """Standard columns for one batch read from ``url``; bad rows get a quarantine reason."""
    n = table.num_rows
    if shard_problem is None:
        texts, reasons = _check_texts(table.column(text_column), url, first_row, max_text_bytes)
    else:
        texts, reasons = [None] * n, [shard_problem] * n
    ids = _ids(table, id_column, texts)
    extra = [c for c in table.column_names if c not in (text_column, id_column, *LINEAGE, *QUARANTINE)]
    columns = {
        "id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        **{c: table.column(c) for c in extra},
        "source_file": pa.array([url] * n, pa.string()),
        "source_row": pa.array(range(first_row, first_row + n), pa.int64()),
        "quarantine_reason": pa.array(reasons, pa.string()),
        "quarantine_stage": pa.array([None if r is None else "read" for r in reasons], pa.string()),
    }
    return pa.table(columns)


def _ids(table: pa.Table, id_column: str, texts: list[str | None]) -> list[str | None]:
    given = table.column(id_column).cast(pa.string()).to_pylist() if id_column in table.column_names \
        else [None] * table.num_rows
    return [g if g is not None else (content_id(t) if t is not None else None)
            for g, t in zip(given, texts, strict=True)]


def _check_texts(column: pa.ChunkedArray, url: str, first_row: int,
                 max_text_bytes: int) -> tuple[list[str | None], list[str | None]]:
    binary = column.type in _BINARY_TYPES
    texts: list[str | None] = []
    reasons: list[str | None] = []
    for offset, value in enumerate(column.to_pylist()):
        where = f"{url} row {first_row + offset}"
        text, reason = value, None
        if value is None:
            reason = f"null text ({where})"
        elif binary:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as err:
                text, reason = None, f"invalid UTF-8 at byte {err.start} ({where})"
        if text is not None and reason is None:
            reason = _text_problem(text, where, max_text_bytes)
        texts.append(text if reason is None else None)
        reasons.append(reason)
    return texts, reasons


def _text_problem(text: str, where: str, max_text_bytes: int) -> str | None:
    if not text.strip():
        return f"empty or whitespace-only text ({where})"
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return f"text is {size} bytes, over input.max_text_bytes={max_text_bytes} ({where})"
    bad = _CONTROL.search(text)
    if bad:
        return f"control character U+{ord(bad.group()):04X} at offset {bad.start()} ({where})"
    return None


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write ``table`` to ``path`` so that a reader never sees a partial file."""
    fs.makedirs(path.rsplit("/", 1)[0] if "/" in path else ".", exist_ok=True)
    tmp = f"{path}.inprogress"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(tmp, path)


def batch_key(batch: pa.Table) -> str:
    """Deterministic name for a batch from its lineage, so a retried task overwrites, not adds."""
    h = hashlib.sha1()
    for name in LINEAGE:
        col = batch.column(name)
        h.update(pc.cast(col, pa.string()).to_pylist().__repr__().encode())
    return h.hexdigest()[:20]
