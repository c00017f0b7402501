"""Query the committed output tables with DuckDB (``curate query``, ``curate tables``).

Every Iceberg table of the output's catalog is registered as a view of the same name. Only committed
nights are visible: for each run date, the snapshot ids its latest committed ``runs`` row recorded
are planned (``plan_files``) and only those data files are read, so a reader never sees a
half-written or replaced night. DuckDB reads the Parquet files itself, pushing column projection and
row filters down. ``--as-of RUN_ID`` shows the tables as they were when that run committed. ``runs``
holds every run (failed ones too).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv

from jobs.errors import UserError
from jobs.ops.readonly import (
    add_empty_view,
    add_view,
    check_read_only,
    lock_down,
    one_line,
    read_only_connection,
    sql_ident,
    sql_string,
    table_of_error,
    tables_named,
)
from pipelines.tables import (
    RUNS,
    CatalogError,
    NothingCommitted,
    Output,
    committed_views,
    load_table,
    open_output,
    runs_files,
    table_names,
)

PARTITION_PREFIX = "run_date="


@dataclass(frozen=True)
class Partition:
    """One visible date of a table: its files (full URLs), row count and the run that committed it."""

    table: str
    run_date: str
    files: tuple[str, ...]
    rows: int
    manifest: dict = field(default_factory=dict)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (plain paths; DuckDB reads them itself)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def output_of(output: str | Output, catalog: dict | None = None) -> Output:
    """``output`` itself, or the output at that URL (``catalog``: pyiceberg properties; default the
    embedded one)."""
    return output if isinstance(output, Output) else open_output(output, catalog)


def partitions(output: str | Output, date: str | None = None, as_of: str | None = None,
               catalog: dict | None = None) -> dict[str, list[Partition]]:
    """Visible dates by table (tables without any are left out), oldest date first. Empty when
    nothing was ever committed; a catalog that cannot be opened is a ``UserError``."""
    try:
        cat = output_of(output, catalog).catalog()
        views_ = committed_views(cat, date, as_of)
    except NothingCommitted as err:
        if as_of is not None:
            raise UserError(str(err)) from None
        return {}
    except CatalogError as err:
        raise UserError(str(err)) from None
    found = {name: [Partition(name, d, tuple(files), view.rows_by_date[d],
                              {"run_id": view.run_by_date[d]})
                    for d, files in view.files_by_date.items()]
             for name, view in views_.items()}
    run_files = runs_files(cat, date)
    if run_files:
        found[RUNS] = [Partition(RUNS, date or "*", tuple(run_files), 0)]
    return found


def _readable(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path.removeprefix("file://") if is_local(fs) else path


def connect(output: str | Output, date: str | None = None, as_of: str | None = None,
            catalog: dict | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table over its committed files (``date``: only it)."""
    out = output_of(output, catalog)
    fs = out.fs
    con = duckdb.connect()
    if not is_local(fs):
        con.register_filesystem(fs)
    for table, parts in partitions(out, date, as_of).items():
        files = [_readable(fs, f) for p in parts for f in p.files]
        if not files:
            continue
        listed = ", ".join(sql_string(f) for f in files)
        con.execute(f"CREATE VIEW {sql_ident(table)} AS SELECT * FROM read_parquet([{listed}], "
                    "union_by_name=true, hive_partitioning=false)")
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the table views registered on ``con``."""
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def query(output: str | Output, sql: str, date: str | None = None, as_of: str | None = None) -> pa.Table:
    """Run ``sql`` over the committed tables (as of run ``as_of``), read-only (``jobs.ops.readonly``:
    lazy views, only read statements, no other file, no extension); DuckDB errors become ``UserError``."""
    output = output_of(output)
    con = read_only_connection()
    files: dict[str, list[str]] = {}
    try:
        check_read_only(con, sql)
        files, available = _lazy_views(con, output, sql, date, as_of)  # issue 22: read-only, lazy
        lock_down(con, [f for fs in files.values() for f in fs])
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.CatalogException as err:
        shown = ", ".join(available) or f"none: nothing committed under {output.url}"
        raise UserError(f"{one_line(err)}\navailable tables: {shown}") from None
    except duckdb.Error as err:
        table = table_of_error(err, files)
        where = f"table {table}: cannot read its committed files: " if table else "query failed: "
        raise UserError(where + (one_line(err) if table else str(err))) from None
    finally:
        con.close()


def _lazy_views(con: duckdb.DuckDBPyConnection, output: Output, sql: str, date: str | None,
                as_of: str | None) -> tuple[dict[str, list[str]], list[str]]:
    """Views of the tables ``sql`` names (``jobs.ops.readonly``); ({table: its files}, every table name)."""
    fs = output.fs
    if not is_local(fs):
        con.register_filesystem(fs)
    files = {t: [_readable(fs, f) for p in parts for f in p.files]
             for t, parts in partitions(output, date, as_of).items()}
    empty = _empty_tables(output, set(files))
    named = tables_named(sql, [*files, *empty])
    for table in named:
        if table in files:
            add_view(con, table, files[table])
        else:
            add_empty_view(con, table, empty[table])
    return {t: files[t] for t in named if t in files}, sorted([*files, *empty])


def _empty_tables(output: Output, visible: set[str]) -> dict[str, pa.Schema]:
    """Tables of the catalog with no visible rows, and their columns (they are shown as empty views)."""
    try:
        cat = output.catalog()
        names = [n for n in table_names(cat) if n not in visible and n != RUNS]
        return {n: table.schema().as_arrow() for n in names if (table := load_table(cat, n)) is not None}
    except CatalogError:
        return {}


def list_tables(output: str | Output) -> list[dict]:
    """One entry per table: name, total rows and its partitions (run_date, rows, files)."""
    return [{"table": table, "rows": sum(p.rows for p in parts),
             "partitions": [{"run_date": p.run_date, "rows": p.rows, "files": len(p.files),
                             "run_id": p.manifest.get("run_id")} for p in parts]}
            for table, parts in partitions(output).items() if table != RUNS]


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
    from jobs.ops.target import output_from_args

    output = output_from_args(args)
    if not partitions(output):
        raise UserError(f"nothing is committed under {output.url} (run a pipeline first)")
    print(format_result(query(output, args.sql, args.date, getattr(args, "as_of", None)), args.format))
    return 0


def tables_command(args: argparse.Namespace) -> int:
    """``curate tables``: tables, their dates and row counts (from the committed snapshots)."""
    from jobs.ops.target import output_from_args

    output = output_from_args(args)
    entries = list_tables(output)
    print(format_tables(entries) if entries else f"nothing is committed under {output.url}")
    return 0
