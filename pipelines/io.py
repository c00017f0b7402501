"""Reading input shards and writing staged batches, over any fsspec URL.

Reading turns each shard into normalised batches: ``id``, ``text``, the shard's other columns,
``source_file``/``source_row`` (lineage), ``text_bytes`` (raw bytes of text that is not valid
UTF-8, else null), ``n_control_chars`` and ``quarantine_reason``/``quarantine_stage``. Problems
become quarantine rows naming the file, row and column; nothing is dropped silently, and a
quarantined row keeps its content (``text``, or the raw bytes in ``text_bytes``):

* an unreadable file (or row group) yields one quarantine record for it; a row group's record carries
  ``rows_lost``, the rows its metadata declares, which the error budget counts (``pipelines.lost``);
* a shard without ``text``, or with a non-string ``text``, quarantines every row of the shard (the
  value is kept as a string);
* a value that cannot be read (invalid UTF-8 in any string column, an ``id`` that is no string or
  integer) quarantines its row; the shard's other rows go on;
* null, empty or whitespace text and over-long text quarantine that row;
* control characters are real data: ``input.control_chars`` keeps (default), strips or quarantines
  them; ``n_control_chars`` counts them either way.

``dictionary<...>`` columns (pandas categoricals) are decoded. Input columns named like ours
(``source_file``, ``quarantine_reason``, ...) are renamed ``input_<name>``, never dropped.
``id`` is kept when present; otherwise it is derived as a stable content hash of the text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LINEAGE = ("source_file", "source_row")
QUARANTINE = ("quarantine_reason", "quarantine_stage")
#: Columns the reader adds besides ``id``/``text``, lineage and quarantine.
READ_COLUMNS = ("text_bytes", "n_control_chars")
#: Names an input column may not keep: it is renamed ``input_<name>`` (``run_date`` is the partition).
RESERVED = (*LINEAGE, *QUARANTINE, *READ_COLUMNS, "run_date", "rows_lost")
CONTROL_CHARS = ("keep", "strip", "quarantine")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STRING_TYPES = (pa.string(), pa.large_string())
_BINARY_TYPES = (pa.binary(), pa.large_binary())


class InputError(ValueError):
    """The input as a whole cannot be read (no shards, bad URL, conflicting column types)."""


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for ``url`` (plain paths are local)."""
    return fsspec.core.url_to_fs(url)


def is_process_local(url: str) -> bool:
    """True for filesystems that live in one process (``memory://``): Ray workers can't see them."""
    fs, _ = url_to_fs(url)
    return "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def list_shards(url: str) -> list[str]:
    """Every ``*.parquet`` under a directory (or matching a glob), sorted, as full URLs.

    Files or directories starting with ``_`` or ``.`` below the directory (or the glob's fixed
    root) are skipped; the path above it may hold such names.
    """
    fs, path = url_to_fs(url)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
        root = _glob_root(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".parquet")]
        root = path
    elif fs.exists(path):
        found, root = [path], path
    else:
        raise InputError(f"input not found: {url}")
    found = sorted(p for p in found if not _hidden(_below(p, root)))
    if not found:
        raise InputError(f"input {url} holds no .parquet files")
    return [fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p
            for p in found]


def _glob_root(path: str) -> str:
    """The part of a glob before its first component holding a wildcard."""
    parts = path.split("/")
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed)


def _below(found: str, root: str) -> str:
    root = root.rstrip("/")
    for candidate in (root, root.lstrip("/")):
        if candidate and found.startswith(candidate + "/"):
            return found[len(candidate):]
    return "" if found.rstrip("/") in (root, root.lstrip("/")) else found


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/") if part)


def content_id(text: str) -> str:
    """Stable document id: the first 16 hex digits of sha1(utf-8 text)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def input_name(name: str, taken: set[str]) -> str:
    """``input_<name>`` (prefixed again while that is taken too)."""
    name = f"input_{name}"
    while name in taken:
        name = f"input_{name}"
    return name


def renamed_columns(names: list[str], text_column: str = "text", id_column: str = "id") -> dict[str, str]:
    """Input columns that collide with ours, and the names they get: ``{old: new}``."""
    ours = set(RESERVED) | ({"text"} - {text_column}) | ({"id"} - {id_column})
    taken = set(names)
    renames = {}
    for name in names:
        if name in ours and name not in (text_column, id_column):
            renames[name] = input_name(name, taken | set(renames.values()))
    return renames


def read_shard(url: str, text_column: str = "text", id_column: str = "id",
               batch_rows: int = 1024, max_text_bytes: int = 10_000_000,
               control_chars: str = "keep") -> Iterator[pa.Table]:
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
        for group in range(parquet.num_row_groups):
            try:
                batches = list(parquet.iter_batches(batch_size=batch_rows, row_groups=[group]))
            except Exception as err:  # noqa: BLE001 - a corrupt row group quarantines that group
                declared = parquet.metadata.row_group(group).num_rows
                yield _file_record(url, f"corrupt Parquet data in {url} row group {group} (rows {row} to "
                                        f"{row + declared - 1}, {declared} rows lost): "
                                        f"{type(err).__name__}: {err}", row, declared)
                row += declared
                continue
            for batch in batches:
                table = pa.Table.from_batches([batch])
                yield normalise(table, url, row, text_column, id_column, max_text_bytes, problem,
                                control_chars)
                row += table.num_rows


def _schema_problem(schema: pa.Schema, text_column: str, url: str) -> str | None:
    if text_column not in schema.names:
        return f"shard {url} has no '{text_column}' column (columns: {', '.join(schema.names)})"
    kind = schema.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if kind not in _STRING_TYPES + _BINARY_TYPES:
        return f"column '{text_column}' in {url} has type {kind}, expected string"
    return None


def _file_record(url: str, reason: str, row: int | None = None, rows_lost: int | None = None) -> pa.Table:
    """One quarantine record for an unreadable file (``row`` None) or row group (``rows_lost`` rows)."""
    return pa.table({
        "id": pa.array([None], pa.string()), "text": pa.array([None], pa.string()),
        "source_file": [url], "source_row": pa.array([row], pa.int64()),
        "text_bytes": pa.array([None], pa.binary()), "n_control_chars": pa.array([None], pa.int64()),
        "quarantine_reason": [reason], "quarantine_stage": ["read"],
        "rows_lost": pa.array([rows_lost], pa.int64()),
    })


def normalise(table: pa.Table, url: str, first_row: int, text_column: str, id_column: str,
              max_text_bytes: int, shard_problem: str | None = None,
              control_chars: str = "keep") -> pa.Table:
    """Standard columns for one batch read from ``url``; bad rows get a quarantine reason."""
    n = table.num_rows
    reasons: list[str | None] = [None] * n

    def flag(row: int, why: str) -> None:
        if reasons[row] is None:
            reasons[row] = why

    table = table.rename_columns(
        [renamed_columns(table.column_names, text_column, id_column).get(c, c) for c in table.column_names])
    raw, unreadable = {}, []
    for name in table.column_names:
        if name == id_column:
            continue
        if name == text_column:  # invalid UTF-8 text is checked (and kept) as bytes below
            column = table.column(name)
            column = column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
            raw[name] = column if _valid_utf8(column) else as_binary(column)
            continue
        column, bad = readable_column(table.column(name))
        raw[name] = column
        unreadable += [(row, f"column '{name}' holds invalid UTF-8 {value[:40]!r} ({url} row {first_row + row})")
                       for row, value in bad.items()]
    if shard_problem is None:
        texts, raw_bytes, counts, text_reasons = _check_texts(
            raw[text_column], url, first_row, max_text_bytes, control_chars, text_column)
    else:
        texts, raw_bytes, counts = _as_text(raw.get(text_column), n), [None] * n, [None] * n
        text_reasons = [shard_problem] * n
    for row, why in enumerate(text_reasons):
        if why is not None:
            flag(row, why)
    for row, why in unreadable:
        flag(row, why)
    ids = _ids(table, id_column, texts, url, first_row, flag)
    extra = [c for c in table.column_names if c not in (text_column, id_column)]
    columns = {
        "id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.string()),
        **{c: raw[c] for c in extra},
        "source_file": pa.array([url] * n, pa.string()),
        "source_row": pa.array(range(first_row, first_row + n), pa.int64()),
        "text_bytes": pa.array(raw_bytes, pa.binary()),
        "n_control_chars": pa.array(counts, pa.int64()),
        "quarantine_reason": pa.array(reasons, pa.string()),
        "quarantine_stage": pa.array([None if r is None else "read" for r in reasons], pa.string()),
    }
    return pa.table(columns)


def readable_column(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray | pa.Array, dict[int, bytes]]:
    """``column`` with dictionaries decoded and invalid UTF-8 strings nulled; ``{row: raw bytes}`` of those."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if _valid_utf8(column):
        return column, {}
    binary = pa.binary() if column.type == pa.string() else pa.large_binary()
    bad, kept = {}, []
    for row, value in enumerate(as_binary(column).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                bad[row], value = value, None
        kept.append(value)
    return pa.array(kept, binary).cast(column.type), bad


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    """False only for a string column holding invalid UTF-8 (Parquet readers do not check it)."""
    if column.type not in _STRING_TYPES:
        return True
    try:
        column.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def as_binary(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column's bytes as a binary column, without decoding (nothing is validated)."""
    binary = pa.binary() if column.type == pa.string() else pa.large_binary()
    return pa.chunked_array([chunk.view(binary) for chunk in column.chunks], binary)


def _as_text(column: pa.ChunkedArray | None, n: int) -> list[str | None]:
    """Text that is not a string, kept as a string (JSON for nested values), for the quarantine row."""
    if column is None:
        return [None] * n
    try:
        return column.cast(pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]


def _ids(table: pa.Table, id_column: str, texts: list[str | None], url: str, first_row: int,
         flag) -> list[str | None]:  # noqa: ANN001
    n = table.num_rows
    given: list[str | None] = [None] * n
    if id_column in table.column_names:
        column, bad = readable_column(table.column(id_column))
        for row, value in bad.items():
            flag(row, f"column '{id_column}' holds invalid UTF-8 {value[:40]!r} ({url} row {first_row + row})")
        nested = pa.types.is_nested(column.type) or column.type in _BINARY_TYPES
        try:
            given = [None] * n if nested else column.cast(pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            nested = True
        if nested:
            for row, value in enumerate(column.to_pylist()):
                if value is not None:
                    flag(row, f"column '{id_column}' has type {column.type}, expected a string or integer "
                              f"(value {str(value)[:40]}) ({url} row {first_row + row})")
    return [g if g is not None else (content_id(t) if t is not None else None)
            for g, t in zip(given, texts, strict=True)]


def _check_texts(column: pa.ChunkedArray, url: str, first_row: int, max_text_bytes: int,
                 control_chars: str = "keep", name: str = "text") -> tuple[list, list, list, list]:
    """Per row: text, raw bytes (invalid UTF-8 only), control character count, quarantine reason."""
    binary = column.type in _BINARY_TYPES
    texts, raw, counts, reasons = [], [], [], []
    for offset, value in enumerate(column.to_pylist()):
        where = f"{url} row {first_row + offset}"
        text, kept, reason, count = value, None, None, None
        if value is None:
            reason = f"null text ({where})"
        elif binary:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as err:
                text, kept = None, value
                reason = f"invalid UTF-8 at byte {err.start} in column '{name}' ({where})"
        if text is not None:
            count = len(_CONTROL.findall(text))
            if count and control_chars == "strip":
                text = _CONTROL.sub("", text)
            if reason is None:
                reason = _text_problem(text, where, max_text_bytes, control_chars)
        texts.append(text)
        raw.append(kept)
        counts.append(count)
        reasons.append(reason)
    return texts, raw, counts, reasons


def _text_problem(text: str, where: str, max_text_bytes: int, control_chars: str = "keep") -> str | None:
    if not text.strip():
        return f"empty or whitespace-only text ({where})"
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        return f"text is {size} bytes, over input.max_text_bytes={max_text_bytes} ({where})"
    if control_chars == "quarantine":
        bad = _CONTROL.search(text)
        if bad:
            return f"control character U+{ord(bad.group()):04X} at offset {bad.start()} ({where})"
    return None


def _comparable(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}.get(kind, kind)


def types_agree(a: pa.DataType, b: pa.DataType) -> bool:
    """Same type once dictionaries are decoded; integers of any width agree, as do floats (the
    table widens them), and a column that is all null agrees with anything."""
    a, b = _comparable(a), _comparable(b)
    if a == b or pa.types.is_null(a) or pa.types.is_null(b):
        return True
    return (pa.types.is_integer(a) and pa.types.is_integer(b)) or \
        (pa.types.is_floating(a) and pa.types.is_floating(b))


def shard_schema(url: str) -> pa.Schema | None:
    """The Arrow schema in a shard's footer; None when the file cannot be opened (read quarantines it)."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow
    except Exception:  # noqa: BLE001 - an unreadable file is quarantined at read, not here
        return None


def check_schemas(shards: list[str], text_column: str = "text", id_column: str = "id",
                  table: pa.Schema | None = None, table_name: str = "documents") -> list[str]:
    """Check every shard's column types up front; raise ``InputError`` naming the shard and column.

    The first shard's schema is the reference; a column also in ``table`` (the committed table's
    schema) must agree with it too. ``text``/``id`` are left to the reader (it quarantines bad
    values per row). Returns warnings: input columns renamed because they collide with ours.
    """
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(shard_schema, shards))
    first: dict[str, tuple[pa.DataType, str]] = {}
    errors, warnings = [], []
    for url, schema in zip(shards, schemas, strict=True):
        if schema is None:
            continue
        renames = renamed_columns(schema.names, text_column, id_column)
        if renames:
            warnings.append(f"shard {url}: input column(s) renamed, they collide with curate's: "
                            + ", ".join(f"{old} -> {new}" for old, new in renames.items()))
        for field in schema:
            name = renames.get(field.name, field.name)
            if field.name in (text_column, id_column):
                continue
            seen = first.setdefault(name, (field.type, url))
            if not types_agree(seen[0], field.type):
                errors.append(f"shard {url}: column '{name}' has type {field.type}, but {seen[0]} in "
                              f"{seen[1]}")
            if table is not None and name in table.names and not types_agree(table.field(name).type, field.type):
                errors.append(f"shard {url}: column '{name}' has type {field.type}, but the {table_name} "
                              f"table has {table.field(name).type}")
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise InputError("input column types conflict (fix the shards, or cast them):\n"
                         + "\n".join(errors[:20]) + more)
    return warnings


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
