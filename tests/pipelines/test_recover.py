"""A broken file, a broken or lost catalog, a copied output (issue 22): one clear line, and a way back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from conftest import commit_tables as commit
from conftest import tiny_pipeline, write_shard

from jobs.cli.main import main
from jobs.ops.query import query
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
from pipelines.tables import CatalogError

D1, D2 = "2026-01-01", "2026-01-02"


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """Two committed nights: documents on both, token_premium on the first."""
    out = tmp_path / "out"
    commit(str(out), D1, "r1", {"documents": pa.table({"id": ["a", "b"], "text": ["x", "yy"]}),
                                "token_premium": pa.table({"lang": ["eng_Latn"], "premium": [1.0]})})
    commit(str(out), D2, "r2", {"documents": pa.table({"id": ["c"], "text": ["zzz"]})})
    return out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("curate: error: ")
    return line


def newest_metadata(out: Path, table: str) -> Path:
    return max((out / "curate" / table / "metadata").glob("*.metadata.json"))


def test_check_finds_a_missing_data_file_naming_table_date_and_file(output, capsys):
    assert cli(capsys, "check", "--output", str(output))[0] == 0
    (gone,) = output.glob(f"_data/documents/run_date={D2}/*/*.parquet")
    gone.unlink()
    rc, out, _ = cli(capsys, "check", "--output", str(output))
    assert rc == 1 and f"documents: data file of {D2} is missing (rerun that night): {gone}" in out
    (broken,) = output.glob(f"_data/token_premium/run_date={D1}/*/*.parquet")
    broken.write_bytes(broken.read_bytes()[:20])
    rc, out, _ = cli(capsys, "check", "--output", str(output))
    assert f"token_premium: data file of {D1} does not open (ArrowInvalid" in out and "2 problem(s)" in out


def test_a_lost_metadata_file_is_one_line_then_recover_rolls_the_table_back(output, capsys):
    gone = newest_metadata(output, "documents")
    gone.unlink()
    for argv in (["query", "SELECT count(*) FROM documents"], ["tables"]):
        line = one_error_line(cli(capsys, *argv, "--output", str(output))[2])
        assert line.startswith("curate: error: table documents: cannot read ") and str(gone) in line

    rc, out, _ = cli(capsys, "recover", "--output", str(output))
    assert "documents: rolled back to " in out
    assert rc == 1 and "documents: snapshot" in out and D2 in out  # that night's snapshot went with the file
    commit(str(output), D2, "r3", {"documents": pa.table({"id": ["c"], "text": ["zzz"]})})  # rerun it
    assert cli(capsys, "check", "--output", str(output))[0] == 0
    ids = query(str(output), "SELECT id FROM documents ORDER BY id")["id"].to_pylist()
    assert ids == ["a", "b", "c"]


def test_a_truncated_catalog_is_one_line_then_recover_registers_every_table(output, capsys):
    db = output / "_catalog" / "catalog.db"
    db.write_bytes(db.read_bytes()[:100])
    for argv in (["query", "SELECT 1 FROM runs"], ["tables"]):
        line = one_error_line(cli(capsys, *argv, "--output", str(output))[2])
        assert f"catalog of {output}" in line and "curate check" in line

    rc, out, _ = cli(capsys, "recover", "--output", str(output))
    assert rc == 0 and f"catalog {db} could not be read" in out
    assert {"documents: registered", "runs: registered", "token_premium: registered"} <= \
        {line.split(" to ")[0] for line in out.splitlines()}
    assert list(output.glob("_catalog/catalog.db.broken-*"))  # the broken database is kept aside
    rows = query(str(output), "SELECT run_date, count(*) AS n FROM documents GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"run_date": D1, "n": 2}, {"run_date": D2, "n": 1}]


def test_a_run_never_replaces_a_lost_catalog(output, tmp_path, capsys):
    db = output / "_catalog" / "catalog.db"
    db.unlink()
    write_shard(tmp_path / "in" / "a.parquet", text=["a new night"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(str(tmp_path / "in"), str(output))))
    line = one_error_line(cli(capsys, "run", str(path), "--date", "2026-01-03")[2])
    assert f"the catalog {db} is missing, but table metadata exists" in line
    assert f"curate recover --output {output}" in line
    assert not db.exists()  # no new, empty catalog hides the earlier nights

    assert cli(capsys, "recover", "--output", str(output))[0] == 0
    assert query(str(output), "SELECT count(*) AS n FROM documents")["n"].to_pylist() == [3]
    assert len(query(str(output), "SELECT * FROM runs")) == 2  # the history is back too


def test_a_run_into_a_copied_output_is_refused_and_the_original_untouched(output, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, symlinks=True)
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    write_shard(tmp_path / "in" / "a.parquet", text=["a new night"])
    with pytest.raises(CatalogError, match=r"the catalog of .*copy points at tables outside it \(documents: "
                                           rf"file://{output}/curate/documents/metadata/.*a copied or moved output"):
        run_pipeline(parse_config(tiny_pipeline(str(tmp_path / "in"), str(copy))), D2)
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
