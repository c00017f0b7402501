"""``curate maintain``: snapshots outside the retention and orphan files go; what readers use stays."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import commit_tables, run_rows, tiny_pipeline, write_shard

from jobs.cli.main import main
from jobs.ops.query import query
from pipelines import maintain as m
from pipelines.config import parse_config
from pipelines.lock import lock_path
from pipelines.runner import run_pipeline
from pipelines.tables import open_output

ROOT = Path(__file__).resolve().parents[3]
D1, D2 = "2026-03-01", "2026-03-02"


def _ids(out: Path, as_of: str | None = None, date: str | None = None) -> list[str]:
    return sorted(query(str(out), "SELECT id || '/' || run_date AS k FROM documents", date=date,
                        as_of=as_of).column("k").to_pylist())


def _premiums(out: Path, as_of: str | None = None) -> list[tuple]:
    rows = query(str(out), "SELECT run_date, lang, docs FROM token_premium ORDER BY 1, 2", as_of=as_of)
    return [tuple(r.values()) for r in rows.to_pylist()]


def _staged(out: Path) -> set[str]:
    return {str(p.relative_to(out / "_data")) for p in (out / "_data").rglob("*.parquet")}


def _snapshots(out: Path, table: str) -> set[int]:
    catalog = open_output(str(out)).catalog()
    return {s.snapshot_id for s in catalog.load_table(f"curate.{table}").metadata.snapshots}


def _staging_process(out: Path, date: str, then: str) -> subprocess.Popen:
    """A process that runs a night as ``run_pipeline`` does, without the compute: it takes the date's
    lock, stages rows of two tables under its run id, prints ``staged``, then ``kill``s itself
    (SIGKILL: a killed run) or ``sleep``s holding the lock (a running night)."""
    script = textwrap.dedent(f"""
        import os, time
        import pyarrow as pa
        from pipelines.lock import acquire_lock, lock_path
        from pipelines.staging import stage_rows
        from pipelines.tables import open_output
        acquire_lock(lock_path({str(out)!r}, {date!r}))
        output, run = open_output({str(out)!r}), "20260301T000000-{then}"
        for i in range(3):
            stage_rows(output, "documents", {date!r}, run, f"part-{{i}}",
                       pa.table({{"id": [f"{then}{{i}}"], "text": ["staged"], "lang": ["eng_Latn"]}}))
        stage_rows(output, "token_premium", {date!r}, run, "part-token_premium",
                   pa.table({{"tokenizer": ["cl100k"], "lang": ["eng_Latn"], "docs": [3]}}))
        print("staged", flush=True)
        os.kill(os.getpid(), 9) if {then!r} == "kill" else time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged", proc.stderr.read()[-2000:]
    return proc


def test_maintain_removes_killed_runs_files_and_old_snapshots_but_keeps_every_retained_view(
        tmp_path, small_corpus, local_ray, capsys):
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    r1 = run_pipeline(parse_config(raw), D1).run_id
    write_shard(small_corpus / "c.parquet", id=["n1"], text=["A new document arrives."], lang=["deu_Latn"])
    r2 = run_pipeline(parse_config(raw), D1).run_id  # rerun of D1: r1's files are only in old snapshots
    r3 = "20260302T000000-r3"  # another date commits after r2 (same commit code, no compute)
    commit_tables(str(out), D2, r3, {
        "documents": pa.table({"id": ["q1"], "text": ["another night"], "lang": ["eng_Latn"]}),
        "token_premium": pa.table({"tokenizer": ["cl100k"], "lang": ["eng_Latn"], "docs": [1]})})
    r1_files = {f for f in _staged(out) if f"/{r1}/" in f}
    assert r1_files

    # a run of D1 killed (SIGKILL) after staging, before its commit: its files and stale lock stay
    killed = _staging_process(out, D1, "kill")
    assert killed.wait(timeout=60) == -9
    killed_files = _staged(out) - {f for f in _staged(out) if any(f"/{r}/" in f for r in (r1, r2, r3))}
    assert killed_files and lock_path(str(out), D1).exists()  # its files and its (stale) lock are left

    r1_view = _ids(out, r1)
    views = {None: (_ids(out), _premiums(out)), r2: (_ids(out, r2), _premiums(out, r2)),
             r3: (_ids(out, r3), _premiums(out, r3))}
    assert views[None][0] == views[r3][0] != r1_view

    # default retention: every run is recent, so only the killed run's files go
    before = _snapshots(out, "documents")
    assert main(["maintain", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"removed {len(killed_files)} orphan data file(s)" in printed and "removed 0 snapshot(s)" in printed
    assert not _staged(out) & killed_files and r1_files <= _staged(out)
    assert _snapshots(out, "documents") == before
    assert _ids(out, r1) == r1_view  # r1 is retained: still readable as of it

    # --dry-run with no retention: reports, removes nothing
    assert main(["maintain", "--output", str(out), "--retain-days", "0", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert _snapshots(out, "documents") == before and r1_files <= _staged(out)

    # no retention: r1 (superseded by r2) goes, with its files; the latest run of each date stays
    assert main(["maintain", "--output", str(out), "--retain-days", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"removed {len(r1_files)} orphan data file(s)" in printed
    assert "removed 0 snapshot(s)" not in printed
    assert _snapshots(out, "documents") < before
    assert not _staged(out) & r1_files
    assert {None: (_ids(out), _premiums(out)), r2: (_ids(out, r2), _premiums(out, r2)),
            r3: (_ids(out, r3), _premiums(out, r3))} == views
    assert main(["query", "SELECT count(*) FROM documents", "--output", str(out), "--as-of", r1]) == 2
    assert "was expired" in capsys.readouterr().err
    assert [r["run_id"] for r in run_rows(out) if r["status"] == "committed"] == [r1, r2, r3]

    # a second pass finds nothing left to do
    assert main(["maintain", "--output", str(out), "--retain-days", "0"]) == 0
    assert "removed 0 orphan data file(s), 0 bytes" in capsys.readouterr().out


def test_maintain_keeps_the_staging_of_a_running_night(tmp_path, small_corpus, local_ray, capsys):
    out = tmp_path / "out"
    run_pipeline(parse_config(tiny_pipeline(str(small_corpus), str(out))), D1)
    dead = _staging_process(out, D1, "kill")  # a killed run of D1: its files are orphans
    assert dead.wait(timeout=60) == -9
    live = _staging_process(out, D2, "sleep")  # a live run of D2, staged and holding the lock
    try:
        staged = _staged(out)
        running = {f for f in staged if f"run_date={D2}" in f}
        assert len(running) == 4
        assert main(["maintain", "--output", str(out), "--retain-days", "0"]) == 0
        printed = capsys.readouterr().out
        assert "removed 4 orphan data file(s)" in printed
        assert f"kept 4 staged file(s) of running night(s): {D2}" in printed
        assert _staged(out) == staged - {f for f in staged if "-kill/" in f}  # D2's all kept
        assert main(["maintain", "--output", str(out), "--dry-run"]) == 0
        assert "would remove 0 orphan data file(s)" in capsys.readouterr().out
    finally:
        live.kill()
        live.wait()
    # once that run is gone (its lock stale), its never-committed staging is an orphan too
    assert main(["maintain", "--output", str(out)]) == 0
    assert "removed 4 orphan data file(s)" in capsys.readouterr().out
    assert _ids(out, date=D1) and not (out / "_data" / "documents" / f"run_date={D2}").exists()


# ------------------------------------------------------------------------ selection (pure functions)

NOW = datetime(2026, 3, 20, tzinfo=UTC)


def _row(run_id: str, date: str, days_ago: float, snapshots: dict, status: str = "committed") -> dict:
    return {"run_id": run_id, "run_date": date, "status": status, "snapshots": json.dumps(snapshots),
            "committed_at": (NOW - timedelta(days=days_ago)).isoformat(timespec="microseconds")}


def test_protected_snapshots_are_the_views_of_retained_runs():
    rows = [_row("a", D1, 30, {"documents": 1}), _row("b", D1, 20, {"documents": 2}),
            _row("c", D2, 10, {"documents": 3}), _row("d", D2, 1, {"documents": 4}),
            _row("x", D1, 0, {"documents": 99}, status="failed")]
    cutoff = NOW - timedelta(days=14)
    assert [r["run_id"] for r in m.retained_runs(rows, cutoff)] == ["b", "c", "d"]
    # b is D1's latest; c's view reads b's D1 and c's D2; d reads b and d
    assert m.protected_snapshots(rows, cutoff) == {"documents": {2, 3, 4}}
    snaps = [(1, m._ms(NOW - timedelta(days=30))), (2, m._ms(NOW - timedelta(days=20))),
             (5, m._ms(NOW - timedelta(days=15))), (6, m._ms(NOW - timedelta(hours=1)))]
    assert m.expirable_snapshots(snaps, {2}, cutoff, None) == [1, 5]
    assert m.expirable_snapshots(snaps, {2}, NOW, None) == [1, 5, 6]
    assert m.expirable_snapshots(snaps, {2}, NOW, NOW - timedelta(days=16)) == [1]  # a live run's


def test_orphan_files_spare_referenced_files_live_dates_and_foreign_paths():
    files = {f"documents/run_date={D1}/r1/a.parquet": 10, f"documents/run_date={D1}/dead/b.parquet": 20,
             f"documents/run_date={D2}/live/c.parquet": 30, ".preflight-123": 2, "notes/readme.txt": 1}
    remove, kept = m.orphan_files(files, {"documents": {f"documents/run_date={D1}/r1/a.parquet"}}, {D2})
    assert remove == [(f"documents/run_date={D1}/dead/b.parquet", 20)]
    assert kept == [f"documents/run_date={D2}/live/c.parquet"]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: p.mkdir(), "no catalog"),
])
def test_maintain_of_a_missing_or_invalid_output_is_a_clear_error(tmp_path, capsys, make, message):
    make(tmp_path / "out")
    assert main(["maintain", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error:") and message in err and "Traceback" not in err


def test_retain_days_must_be_a_non_negative_number(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["maintain", "--output", str(tmp_path), "--retain-days", "-1"])
    assert "number of days >= 0" in capsys.readouterr().err
