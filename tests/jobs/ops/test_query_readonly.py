"""``curate query`` reads the committed tables and nothing else; a broken file breaks only its table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from conftest import commit_tables as commit

from jobs.cli.main import main
from jobs.ops.query import query
from jobs.ops.readonly import tables_named

DATE = "2026-01-01"


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    commit(str(out), DATE, "r1", {
        "documents": pa.table({"id": ["a", "b"], "text": ["x", "yy"]}),
        "token_premium": pa.table({"tokenizer": ["t"], "lang": ["eng_Latn"], "premium": [1.0]}),
        "quarantine": pa.table({"id": ["q"], "text": [""], "quarantine_reason": ["empty"]}),
    })
    return out


def curate_query(output: Path, sql: str, capsys) -> tuple[int, str, str]:
    rc = main(["query", sql, "--output", str(output)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def committed_file(output: Path, table: str) -> Path:
    (path,) = output.glob(f"_data/{table}/run_date={DATE}/*/*.parquet")
    return path


@pytest.mark.parametrize(("sql", "refused"), [
    ("COPY (SELECT id, text FROM documents) TO '{tmp}/x.csv'", "a COPY statement is refused"),
    ("ATTACH '{tmp}/y.db' AS y; CREATE TABLE y.t AS SELECT * FROM documents", "a ATTACH statement is refused"),
    ("CREATE TABLE t AS SELECT 1", "a CREATE statement is refused"),
    ("INSTALL httpfs", "a LOAD statement is refused"),
    ("LOAD httpfs", "a LOAD statement is refused"),
    ("SET enable_external_access = true", "a SET statement is refused"),
    ("SELECT 1; INSERT INTO documents VALUES ('c', 'z')", "a INSERT statement is refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", 'Cannot access file "/etc/passwd"'),
    ("SELECT * FROM read_text('/etc/hostname')", 'Cannot access file "/etc/hostname"'),
    ("SELECT * FROM read_parquet('{tmp}/out/_data/*/*/*/*.parquet')", "file system operations are disabled"),
])
def test_every_write_or_foreign_read_is_refused_with_one_line(output, tmp_path, capsys, sql, refused):
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    rc, out, err = curate_query(output, sql.format(tmp=tmp_path), capsys)
    assert rc == 2 and out == ""
    assert err.startswith("curate: error: ") and refused in err and "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before  # nothing written


def test_a_copy_onto_a_committed_data_file_is_refused_and_the_file_kept(output, capsys):
    target = committed_file(output, "documents")
    before = target.read_bytes()
    sql = f"COPY (SELECT 'x' AS id) TO '{target}' (FORMAT parquet, USE_TMP_FILE false)"
    assert curate_query(output, sql, capsys)[0] == 2
    assert target.read_bytes() == before
    assert query(str(output), "SELECT count(*) AS n FROM documents")["n"].to_pylist() == [2]


def test_reads_still_work_after_the_lock(output, capsys):
    sql = 'SELECT d.id, t.premium FROM documents d, "token_premium" t ORDER BY d.id'
    assert query(str(output), sql).to_pylist() == [{"id": "a", "premium": 1.0}, {"id": "b", "premium": 1.0}]
    assert query(str(output), "EXPLAIN SELECT * FROM documents").num_rows >= 1
    assert query(str(output), "SELECT current_setting('enable_external_access') AS e")["e"].to_pylist() == [False]
    assert query(str(output), "SELECT current_setting('lock_configuration') AS l")["l"].to_pylist() == [True]


def test_views_are_lazy_a_missing_documents_file_breaks_only_documents(output, capsys):
    missing = committed_file(output, "documents")
    missing.unlink()
    assert query(str(output), "SELECT premium FROM token_premium")["premium"].to_pylist() == [1.0]
    rc, _, err = curate_query(output, "SELECT count(*) FROM documents", capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("curate: error: table documents: cannot read its committed files: ")
    assert str(missing) in err


def test_tables_named():
    names = ["documents", "runs", "token_premium", "quarantine"]
    assert tables_named('SELECT * FROM Documents d JOIN "token_premium" t USING (id)', names) == \
        ["documents", "token_premium"]
    assert tables_named("SELECT 1", names) == []


def test_the_quarantine_view_exists_with_zero_rows_after_a_clean_rerun(output, capsys):
    commit(str(output), DATE, "r2", {"documents": pa.table({"id": ["a"], "text": ["x"]})})  # no quarantine
    assert query(str(output), "SELECT count(*) AS n FROM quarantine")["n"].to_pylist() == [0]
    columns = query(str(output), "SELECT * FROM quarantine").column_names
    assert {"id", "text", "quarantine_reason", "run_date"} <= set(columns)
