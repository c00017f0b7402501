"""Iceberg tables you can trust: one run per date, a night is one unit, preflight, kills mid-commit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from conftest import commit_tables, tiny_pipeline, wait_for_lease_end

from jobs.cli.main import main
from jobs.ops.query import query
from operators.base import RunFailed
from pipelines.config import parse_config
from pipelines.lock import held_locks
from pipelines.runner import run_pipeline
from pipelines.tables import open_output, runs_table

ROOT = Path(__file__).resolve().parents[2]
DATE = "2026-02-01"


def _count(out: Path, table: str, date: str = DATE) -> int:
    return query(str(out), f"SELECT count(*) AS n FROM {table}", date=date).column("n")[0].as_py()


def test_second_run_of_a_running_date_is_refused_naming_the_holder(tmp_path, small_corpus, capsys):
    """Probe 1: a second process runs the same (output, date); `curate run` refuses, naming it."""
    out = tmp_path / "out"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(out))))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pipelines.lock import RunLock
        from pipelines.tables import open_output
        RunLock(open_output({str(out)!r}).catalog(create=True), {DATE!r}, run_id="first").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(tmp_path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", str(pipeline), "--date", DATE]) == 2
        err = capsys.readouterr().err
        assert "already going" in err and f"run first (pid {holder.pid} on " in err and "since 20" in err
        assert main(["run", str(pipeline), "--date", "2026-02-02", "--input", str(tmp_path / "none")]) == 2
        assert "input not found" in capsys.readouterr().err  # other dates are not locked
    finally:
        holder.kill()
        holder.wait()
    # a dead holder's lock stays until its lease ends; the next run then takes it over
    assert held_locks(open_output(str(out)).catalog())[DATE]["run_id"] == "first"


def test_rerun_replaces_every_tables_date_including_quarantine(tmp_path):
    """Probe 2: tables the rerun did not produce lose that date's rows; other dates stay."""
    out = str(tmp_path / "out")
    commit_tables(out, DATE, "r1", {"documents": pa.table({"id": ["a"]}),
                                    "quarantine": pa.table({"id": ["bad"] * 5, "quarantine_reason": ["x"] * 5})})
    commit_tables(out, "2026-02-02", "r2", {"quarantine": pa.table({"id": ["other"], "quarantine_reason": ["y"]})})
    commit_tables(out, DATE, "r3", {"documents": pa.table({"id": ["a", "bad"]})})
    assert query(out, "SELECT id FROM documents ORDER BY id").column("id").to_pylist() == ["a", "bad"]
    assert query(out, "SELECT id, run_date FROM quarantine").to_pylist() == [{"id": "other", "run_date": "2026-02-02"}]


def test_failed_rerun_leaves_the_previous_night_intact(tmp_path, small_corpus, local_ray):
    """Probe 3: a rerun that fails (error budget) commits nothing and records `failed` with its reason."""
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    run_pipeline(parse_config(raw), DATE)
    before = {t: query(str(out), f"SELECT * FROM {t} ORDER BY ALL") for t in ("documents", "quarantine",
                                                                              "token_premium")}
    with pytest.raises(RunFailed):
        run_pipeline(parse_config(raw | {"max_quarantine_share": 0.0}), DATE)
    for table, rows in before.items():
        assert query(str(out), f"SELECT * FROM {table} ORDER BY ALL").equals(rows), table
    runs = query(str(out), "SELECT status, error FROM runs ORDER BY committed_at").to_pylist()
    assert [r["status"] for r in runs] == ["committed", "failed"] and "quarantine" in runs[1]["error"]


def test_output_that_is_a_file_fails_in_preflight(tmp_path, small_corpus, capsys):
    """Probe 4: before any compute, a clear error (no traceback); a usable catalog gets a runs row."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(blocked))))
    started = time.perf_counter()
    assert main(["run", str(pipeline), "--date", DATE]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err
    assert time.perf_counter() - started < 20

    # a catalog elsewhere (as on a cluster) is usable: the failure is recorded in its runs table
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/cat.db", "warehouse": f"file://{tmp_path}/wh"}
    raw = tiny_pipeline(str(small_corpus), str(blocked))
    raw["output"]["catalog"] = catalog
    pipeline.write_text(yaml.safe_dump(raw))
    assert main(["run", str(pipeline), "--date", DATE]) == 2
    rows = runs_table(open_output(str(blocked), catalog).catalog()).scan().to_arrow().to_pylist()
    assert [(r["status"], r["run_date"]) for r in rows] == [("failed", DATE)]
    assert "is a file" in rows[0]["error"]


def _snapshot(out: Path) -> dict[str, list]:
    return {t: sorted(map(str, query(str(out), f"SELECT * FROM {t}").to_pylist()))
            for t in ("documents", "quarantine", "token_premium")}


@pytest.mark.parametrize("point", ["after:documents", "before:runs"])
def test_kill_during_commit_then_rerun_equals_an_uninterrupted_run(tmp_path, small_corpus, local_ray, point):
    """kill -9 of the driver mid-commit: readers still see the previous night whole; a rerun then
    gives the tables an uninterrupted run gives."""
    out = tmp_path / "out"
    old = tmp_path / "old"
    old.mkdir()
    (old / "o.parquet").write_bytes((small_corpus / "a.parquet").read_bytes())
    run_pipeline(parse_config(tiny_pipeline(str(old), str(out))), DATE)
    previous = _snapshot(out)
    raw = tiny_pipeline(str(small_corpus), str(out))
    script = textwrap.dedent(f"""
        import ray
        from pipelines.config import parse_config
        from pipelines.runner import run_pipeline
        ray.init(num_cpus=2, include_dashboard=False)
        run_pipeline(parse_config({raw!r}), {DATE!r})
    """)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "CURATE_COMMIT_HOOK": f"{point}:kill",
                                         "CURATE_LOCK_LEASE_S": "5"})
    assert died.returncode == -9, died.stderr[-2000:]
    assert _snapshot(out) == previous  # documents got a new snapshot, but no runs row records it
    wait_for_lease_end(out, DATE)  # the killed run's lock

    run_pipeline(parse_config(raw), DATE)
    clean = tmp_path / "clean"
    run_pipeline(parse_config(tiny_pipeline(str(small_corpus), str(clean))), DATE)
    assert _snapshot(out) == _snapshot(clean)


def test_as_of_reads_an_earlier_nights_view(tmp_path, capsys):
    out = str(tmp_path / "out")
    commit_tables(out, DATE, "r1", {"documents": pa.table({"id": ["old"]})})
    commit_tables(out, DATE, "r2", {"documents": pa.table({"id": ["new1", "new2"]})})
    assert query(out, "SELECT id FROM documents ORDER BY id").column("id").to_pylist() == ["new1", "new2"]
    assert query(out, "SELECT id FROM documents", as_of="r1").column("id").to_pylist() == ["old"]
    assert main(["query", "SELECT id FROM documents", "--output", out, "--as-of", "r1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"id"', '"old"']
    assert main(["query", "SELECT 1", "--output", out, "--as-of", "nope"]) == 2
    assert "no committed run 'nope'" in capsys.readouterr().err
