"""Query the committed output tables with DuckDB (``curate query``, ``curate tables``).

Every top-level directory of the output that does not start with ``_`` or ``.`` (except ``reports``)
is a table, registered as a view of the same name. Only committed partitions are visible: a
partition counts only when it has ``_manifest.json``, and only the files that manifest lists are
read, so a reader never sees a half-written or replaced run. ``runs`` has no manifests (one file per
run, never replaced): all of its files are read. ``run_date`` comes from the partition directory.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobs.errors import UserError
from pipelines.commit import MANIFEST
from pipelines.io import url_to_fs

RUNS = "runs"
NOT_TABLES = {"reports"}
PARTITION_PREFIX = "run_date="


@dataclass(frozen=True)
class Partition:
    """One visible partition of a table: its date, its files (full paths) and row count."""

    table: str
    run_date: str
    files: tuple[str, ...]
    rows: int
    manifest: dict


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (plain paths; DuckDB reads them itself)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def table_names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Top-level directories of the output that are tables."""
    if not fs.isdir(root):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))
    return sorted(n for n in names if not n.startswith(("_", ".")) and n not in NOT_TABLES)


def partitions(output_url: str, date: str | None = None) -> dict[str, list[Partition]]:
    """Visible partitions by table (tables without any are left out), oldest date first."""
    fs, root = url_to_fs(output_url)
    root = root.rstrip("/")
    found: dict[str, list[Partition]] = {}
    for table in table_names(fs, root):
        parts = [p for p in (_partition(fs, table, d) for d in _date_dirs(fs, f"{root}/{table}"))
                 if p is not None and (date is None or p.run_date == date)]
        if parts:
            found[table] = parts
    return found


def _date_dirs(fs: fsspec.AbstractFileSystem, table_dir: str) -> list[str]:
    dirs = [p.rstrip("/") for p in fs.ls(table_dir, detail=False)]
    return sorted(p for p in dirs if p.rsplit("/", 1)[-1].startswith(PARTITION_PREFIX))


def _partition(fs: fsspec.AbstractFileSystem, table: str, path: str) -> Partition | None:
    run_date = path.rsplit("/", 1)[-1].removeprefix(PARTITION_PREFIX)
    if table == RUNS:
        files = tuple(sorted(p for p in fs.find(path) if p.endswith(".parquet")))
        rows = sum(_num_rows(fs, f) for f in files)
        return Partition(table, run_date, files, rows, {}) if files else None
    if not fs.exists(f"{path}/{MANIFEST}"):
        return None  # not committed (or a commit in flight): invisible
    with fs.open(f"{path}/{MANIFEST}") as f:
        manifest = json.load(f)
    files = tuple(f"{path}/{name}" for name in manifest.get("files", []))
    return Partition(table, run_date, files, int(manifest.get("rows", 0)), manifest)


def _num_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def connect(output_url: str, date: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table over its committed files (``date``: only it)."""
    fs, _ = url_to_fs(output_url)
    con = duckdb.connect()
    if not is_local(fs):
        con.register_filesystem(fs)
    for table, parts in partitions(output_url, date).items():
        files = [f if is_local(fs) else fs.unstrip_protocol(f) for p in parts for f in p.files]
        if not files:  # committed but empty (e.g. no quarantined rows): nothing to read
            continue
        listed = ", ".join(sql_string(f) for f in files)
        con.execute(f"CREATE VIEW {sql_ident(table)} AS SELECT * FROM read_parquet([{listed}], "
                    "union_by_name=true, hive_partitioning=true, hive_types={'run_date': VARCHAR})")
    return con


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_ident(value: str) -> str:
    """A quoted SQL identifier."""
    return '"' + value.replace('"', '""') + '"'


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the table views registered on ``con``."""
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def query(output_url: str, sql: str, date: str | None = None) -> pa.Table:
    """Run ``sql`` over the committed tables; DuckDB errors become ``UserError``."""
    con = connect(output_url, date)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.CatalogException as err:
        available = ", ".join(views(con)) or f"none: nothing committed under {output_url}"
        raise UserError(f"{err}\navailable tables: {available}") from None
    except duckdb.Error as err:
        raise UserError(f"query failed: {err}") from None
    finally:
        con.close()


def list_tables(output_url: str) -> list[dict]:
    """One entry per table: name, total rows and its partitions (run_date, rows, files)."""
    return [{"table": table, "rows": sum(p.rows for p in parts),
             "partitions": [{"run_date": p.run_date, "rows": p.rows, "files": len(p.files),
                             "run_id": p.manifest.get("run_id"),
                             "committed_at": p.manifest.get("committed_at")} for p in parts]}
            for table, parts in partitions(output_url).items()]


def format_table(table: pa.Table, max_width: int = 60) -> str:
    """Aligned text table (cells cut at ``max_width``), with a row count."""
    names = table.column_names
    rows = [[_cell(v, max_width) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    line = "  ".join
    out = [line(n.ljust(w) for n, w in zip(names, widths, strict=True)),
           line("-" * w for w in widths)]
    out += [line(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out = [o.rstrip() for o in out]
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out)


def _cell(value: object, max_width: int) -> str:
    text = "NULL" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def format_result(table: pa.Table, fmt: str) -> str:
    """``table`` (aligned text), ``csv`` (with header) or ``json`` (one object per line)."""
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue().decode().rstrip("\n")
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in table.to_pylist())
    return format_table(table)


def format_tables(entries: list[dict]) -> str:
    """``curate tables`` listing: one line per partition, then a total per table."""
    lines = [f"{'table':<20}{'run_date':<12}{'rows':>12}{'files':>7}"]
    for e in entries:
        for p in e["partitions"]:
            lines.append(f"{e['table']:<20}{p['run_date']:<12}{p['rows']:>12}{p['files']:>7}")
        if len(e["partitions"]) > 1:
            lines.append(f"{'':<20}{'total':<12}{e['rows']:>12}")
    return "\n".join(lines)


def query_command(args: argparse.Namespace) -> int:
    """``curate query``: run SQL over the committed tables and print the result."""
    if not partitions(args.output):
        raise UserError(f"nothing is committed under {args.output} (run a pipeline first)")
    print(format_result(query(args.output, args.sql, args.date), args.format))
    return 0


def tables_command(args: argparse.Namespace) -> int:
    """``curate tables``: tables, their partitions and row counts (from the manifests)."""
    entries = list_tables(args.output)
    print(format_tables(entries) if entries else f"nothing is committed under {args.output}")
    return 0
