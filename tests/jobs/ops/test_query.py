"""``curate query`` / ``curate tables``: only committed partitions and the files their manifests list."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import commit_tables as commit

from jobs.cli.main import main
from jobs.errors import UserError
from jobs.ops.query import connect, list_tables, query, views


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    commit(str(out), "2026-01-01", "r1", {
        "documents": pa.table({"id": ["a", "b"], "text": ["x", "yy"], "score": [0.1, 0.9]}),
        "token_premium": pa.table({"tokenizer": ["t"], "lang": ["eng_Latn"], "premium": [1.0]}),
    })
    # the next night adds a column: union_by_name fills it with nulls for the older night
    commit(str(out), "2026-01-02", "r2", {
        "documents": pa.table({"id": ["c"], "text": ["zzz"], "score": [0.5], "lang": ["fra_Latn"]}),
    })
    # a run that staged files and died before its commit: no snapshot lists them
    data = out / "_data" / "documents" / "run_date=2026-01-02" / "r3"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["stray"]}), data / "part-stray.parquet")
    (out / "reports" / "run_date=2026-01-01").mkdir(parents=True)
    return out


def test_only_committed_files_are_visible(output):
    ids = query(str(output), "SELECT id FROM documents ORDER BY id")["id"].to_pylist()
    assert ids == ["a", "b", "c"]  # not the stray file, nor the staged run


def test_views_are_the_committed_tables(output):
    con = connect(str(output))
    # `reports` and `_data` are no tables
    assert views(con) == ["documents", "runs", "token_premium"]


def test_run_date_and_union_by_name(output):
    rows = query(str(output), "SELECT run_date, id, lang FROM documents ORDER BY id").to_pylist()
    assert rows == [{"run_date": "2026-01-01", "id": "a", "lang": None},
                    {"run_date": "2026-01-01", "id": "b", "lang": None},
                    {"run_date": "2026-01-02", "id": "c", "lang": "fra_Latn"}]
    runs = query(str(output), "SELECT run_date, run_id FROM runs ORDER BY 1").to_pylist()
    assert runs == [{"run_date": "2026-01-01", "run_id": "r1"}, {"run_date": "2026-01-02", "run_id": "r2"}]


def test_date_restricts_to_one_night(output):
    result = query(str(output), "SELECT count(*) AS n FROM documents", date="2026-01-02")
    assert result["n"].to_pylist() == [1]


def test_unknown_table_lists_the_available_ones(output):
    with pytest.raises(UserError, match="available tables: documents, runs, token_premium"):
        query(str(output), "SELECT * FROM selected")
    with pytest.raises(UserError, match="query failed: Parser Error"):
        query(str(output), "SELEC 1")


def test_list_tables_counts_from_snapshots(output):
    tables = {t["table"]: t for t in list_tables(str(output))}
    assert sorted(tables) == ["documents", "token_premium"]
    assert tables["documents"]["rows"] == 3
    assert [(p["run_date"], p["rows"], p["run_id"]) for p in tables["documents"]["partitions"]] == [
        ("2026-01-01", 2, "r1"), ("2026-01-02", 1, "r2")]


def test_cli_formats(output, capsys):
    sql = "SELECT id, score FROM documents ORDER BY id"
    assert main(["query", sql, "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "score"] and lines[2].split() == ["a", "0.1"]
    assert lines[-1] == "(3 rows)"

    assert main(["query", sql, "--output", str(output), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"id","score"', '"a",0.1', '"b",0.9', '"c",0.5']

    assert main(["query", sql, "--output", str(output), "--format", "json", "--date", "2026-01-02"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [{"id": "c", "score": 0.5}]

    assert main(["query", "SELECT * FROM nope", "--output", str(output)]) == 2
    assert "available tables: documents, runs, token_premium" in capsys.readouterr().err


def test_cli_tables(output, capsys):
    assert main(["tables", "--output", str(output)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["documents", "2026-01-01", "2", "1"] in lines
    assert ["documents", "2026-01-02", "1", "1"] in lines
    assert ["total", "3"] in lines
    assert ["token_premium", "2026-01-01", "1", "1"] in lines


def test_empty_output_is_a_clear_error(tmp_path, capsys):
    assert main(["query", "SELECT 1", "--output", str(tmp_path / "none")]) == 2
    assert "nothing is committed under" in capsys.readouterr().err
    assert main(["tables", "--output", str(tmp_path / "none")]) == 0
    assert "nothing is committed" in capsys.readouterr().out


def test_remote_output_needs_a_catalog(tmp_path, capsys):
    """The embedded SQLite catalog needs a local output; a remote one without output.catalog is a clear error."""
    from pipelines.tables import CatalogError, open_output

    with pytest.raises(CatalogError, match="not local: give its shared catalog"):
        open_output("memory://curate-query-test/out").catalog(create=True)
