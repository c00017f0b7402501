"""A DuckDB connection that reads the committed tables and nothing else (``curate query``).

* Only read statements run: ``SELECT`` (also ``WITH``, ``VALUES``, ``SHOW``, ``DESCRIBE``, ``SUMMARIZE``,
  ``FROM t``) and ``EXPLAIN``. ``COPY``, ``ATTACH``, ``CREATE``, ``INSERT``, ``INSTALL``/``LOAD``, ``SET``,
  ``PRAGMA``, ``CALL``, ``EXPORT`` ... are refused by statement type before anything runs.
* Extensions are never installed or loaded (auto-install, auto-load and community extensions off).
* Views are lazy: one only for each table the SQL names, so a broken file of one table does not break
  a query of another. A table of the catalog with no committed rows (the quarantine after a clean
  rerun) is an empty view with the table's columns.
* Once the views are registered, ``allowed_paths`` is exactly their files, external access is off
  (no other file, no URL, no Python variables) and the configuration is locked (``SET`` cannot undo it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import duckdb
import pyarrow as pa

from jobs.errors import UserError

#: DuckDB settings of a query connection from its start: no extension is installed or loaded.
CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
          "allow_community_extensions": False, "python_enable_replacements": False}
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
_WORD = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def read_only_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that cannot install or load extensions (views come next, then ``lock_down``)."""
    return duckdb.connect(config=CONFIG)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ``UserError`` unless every statement of ``sql`` only reads (see the module docstring)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise UserError(f"query failed: {err}") from None
    for statement in statements:
        if statement.type not in READ_STATEMENTS:
            kind = statement.type.name
            raise UserError(f"curate query only reads the committed tables: a {kind} statement is refused "
                            f"({statement.query.strip()[:80]!r}); use SELECT (or EXPLAIN)")


def tables_named(sql: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that appear in ``sql`` as a word or quoted identifier (case-insensitive), sorted."""
    words = {(quoted.replace('""', '"') if quoted else bare).lower() for quoted, bare in _WORD.findall(sql)}
    return sorted(n for n in names if n.lower() in words)


def add_view(con: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> None:
    """A view ``table`` over ``files``; ``UserError`` naming the table when they cannot be opened."""
    listed = ", ".join(sql_string(f) for f in files)
    try:
        con.execute(f"CREATE VIEW {sql_ident(table)} AS SELECT * FROM read_parquet([{listed}], "
                    "union_by_name=true, hive_partitioning=false)")
    except duckdb.Error as err:
        raise UserError(f"table {table}: cannot read its committed files: {one_line(err)} "
                        "(see: curate check)") from None


def add_empty_view(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema) -> None:
    """``table`` with its columns and no rows (a table of the catalog whose visible dates hold none)."""
    con.register(table, schema.empty_table())


def lock_down(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Allow reading only ``files``; turn external access off and lock the configuration."""
    con.execute("SET allowed_paths = [" + ", ".join(sql_string(f) for f in files) + "]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def table_of_error(err: Exception, files_by_table: dict[str, list[str]]) -> str | None:
    """The table whose file DuckDB's error names, if any."""
    text = str(err)
    for table, files in files_by_table.items():
        if any(f in text for f in files):
            return table
    return None


def one_line(err: Exception) -> str:
    """DuckDB's message without its ``LINE 1:`` excerpt of the SQL."""
    return str(err).split("\n\nLINE ", 1)[0].strip().replace("\n", " ")


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_ident(value: str) -> str:
    """A quoted SQL identifier."""
    return '"' + value.replace('"', '""') + '"'
