"""``curate maintain``: snapshots outside the retention and orphan files go; what readers use stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import commit_tables, run_rows, tiny_pipeline, wait_for_lease_end, write_shard

from jobs.cli.main import main
from jobs.ops.query import query
from pipelines import maintain as m
from pipelines.config import parse_config
from pipelines.lock import held_locks
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


def _committed(out: Path) -> set[str]:
    """Data files (relative to ``_data``) of every table's current snapshot."""
    catalog = open_output(str(out)).catalog()
    files = set()
    for (_, name) in catalog.list_tables("curate"):
        table = catalog.load_table(f"curate.{name}")
        if table.current_snapshot() is not None:
            files |= {t.file.file_path.split("/_data/", 1)[1] for t in table.scan().plan_files()
                      if "/_data/" in t.file.file_path}  # runs keeps its rows in its own folder
    return files


def _snapshots(out: Path, table: str) -> set[int]:
    catalog = open_output(str(out)).catalog()
    return {s.snapshot_id for s in catalog.load_table(f"curate.{table}").metadata.snapshots}


def _age(paths, days: float = 2) -> None:
    """Set the modification time of ``paths`` back by ``days``."""
    for path in paths:
        when = Path(path).stat().st_mtime - days * 86400
        os.utime(path, (when, when))


def _age_staged(out: Path, staged: set[str], days: float = 2) -> None:
    _age([out / "_data" / f for f in staged], days)


def _staging_process(out: Path, date: str, then: str, lock: bool = True) -> subprocess.Popen:
    """A process that runs a night as ``run_pipeline`` does, without the compute: it takes the date's
    lock (unless not ``lock``; a 2 s lease when it is to be killed), stages rows of two tables under
    its run id, prints ``staged``, then ``kill``s itself (SIGKILL: a killed run) or ``sleep``s
    (a running night)."""
    lease = 2 if then == "kill" else 600
    script = textwrap.dedent(f"""
        import os, time
        import pyarrow as pa
        from pipelines.lock import RunLock
        from pipelines.staging import stage_rows
        from pipelines.tables import open_output
        output, run = open_output({str(out)!r}), "20260301T000000-{then}"
        if {lock!r}:
            RunLock(output.catalog(create=True), {date!r}, lease_s={lease}, run_id=run).acquire()
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

    # a run of D1 killed (SIGKILL) after staging, before its commit: its files stay, its lease ends
    killed = _staging_process(out, D1, "kill")
    assert killed.wait(timeout=60) == -9
    killed_files = _staged(out) - {f for f in _staged(out) if any(f"/{r}/" in f for r in (r1, r2, r3))}
    assert len(killed_files) == 4
    wait_for_lease_end(out, D1)
    _age_staged(out, _staged(out))  # all of it was written two days ago: older than the grace
    assert not (out / "_locks").exists()

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


def test_maintain_removes_old_orphans_and_keeps_young_ones_and_a_running_nights(tmp_path, small_corpus,
                                                                              local_ray, capsys):
    out = tmp_path / "out"
    run_pipeline(parse_config(tiny_pipeline(str(small_corpus), str(out))), D1)
    dead = _staging_process(out, D1, "kill")  # a killed run of D1: its files are orphans
    assert dead.wait(timeout=60) == -9
    wait_for_lease_end(out, D1)
    dead_files = {f for f in _staged(out) if "-kill/" in f}
    _age_staged(out, dead_files)  # killed two days ago
    unlocked = _staging_process(out, D1, "nolock", lock=False)  # staging now, seen by no lock
    live = _staging_process(out, D2, "sleep")  # a live run of D2, staged and holding the lock
    try:
        staged = _staged(out)
        running = {f for f in staged if f"run_date={D2}" in f}
        young = {f for f in staged if "-nolock/" in f}
        assert len(running) == len(young) == len(dead_files) == 4
        _age_staged(out, running)  # even old files of a date a live run holds are kept
        assert main(["maintain", "--output", str(out), "--retain-days", "0"]) == 0
        printed = capsys.readouterr().out
        assert "removed 4 orphan data file(s)" in printed
        assert f"kept 4 staged file(s) of running night(s): {D2}" in printed
        assert "kept 4 unreferenced data file(s) younger than 24 hour(s)" in printed
        assert _staged(out) == staged - dead_files  # the running nights' all kept
        assert main(["maintain", "--output", str(out), "--dry-run"]) == 0
        assert "would remove 0 orphan data file(s)" in capsys.readouterr().out
        # a grace of 0 hours removes the young ones too (the lock still guards D2)
        assert main(["maintain", "--output", str(out), "--grace-hours", "0"]) == 0
        assert "removed 4 orphan data file(s)" in capsys.readouterr().out
        assert _staged(out) == staged - dead_files - young
    finally:
        for proc in (live, unlocked):
            proc.kill()
            proc.wait()
    # that run is gone; once its lease has ended, its old staging is an orphan too
    catalog = open_output(str(out)).catalog()
    ended = datetime.fromisoformat(held_locks(catalog)[D2]["expires_at"]) + timedelta(seconds=1)
    assert held_locks(catalog, ended.timestamp()) == {}
    assert len(m.maintain(open_output(str(out)), now=ended).orphans) == 4
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


def test_orphan_files_spare_referenced_files_live_dates_young_files_and_foreign_paths():
    old, cut, new = 1000.0, 2000.0, 3000.0
    files = {f"documents/run_date={D1}/r1/a.parquet": (10, old), f"documents/run_date={D1}/dead/b.parquet": (20, old),
             f"documents/run_date={D1}/young/d.parquet": (40, new),
             f"documents/run_date={D1}/young/e.parquet": (50, cut),  # exactly at the cut: kept
             f"documents/run_date={D1}/unknown/f.parquet": (60, None),  # no time known: kept
             f"documents/run_date={D2}/live/c.parquet": (30, old), ".preflight-123": (2, old),
             "notes/readme.txt": (1, old)}
    remove, live, young = m.orphan_files(files, {"documents": {f"documents/run_date={D1}/r1/a.parquet"}},
                                         {D2}, cut)
    assert remove == [(f"documents/run_date={D1}/dead/b.parquet", 20)]
    assert live == [f"documents/run_date={D2}/live/c.parquet"]
    assert young == [f"documents/run_date={D1}/unknown/f.parquet", f"documents/run_date={D1}/young/d.parquet",
                     f"documents/run_date={D1}/young/e.parquet"]


def test_orphan_metadata_are_old_unreferenced_table_versions_and_manifests():
    files = {"t/metadata/00001-a.metadata.json": 10.0, "t/metadata/00002-b.metadata.json": 10.0,
             "t/metadata/00003-c.metadata.json": 99.0, "t/metadata/snap-1.avro": 10.0,
             "t/metadata/x-m0.avro": 10.0, "t/metadata/y-m0.avro": 10.0, "t/metadata/stats.puffin": 10.0,
             "t/metadata/00004-d.metadata.json": None}
    referenced = {"t/metadata/00002-b.metadata.json", "t/metadata/snap-1.avro", "t/metadata/x-m0.avro"}
    assert m.orphan_metadata(files, referenced, older_than=50.0) == [
        "t/metadata/00001-a.metadata.json", "t/metadata/y-m0.avro"]


def test_file_mtime_reads_local_and_object_store_listings():
    when = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # 1772366400 s after the epoch
    assert when.timestamp() == 1772366400
    assert m.file_mtime({"mtime": 1772366400.5, "created": 1.0}) == 1772366400.5  # local
    assert m.file_mtime({"LastModified": when}) == 1772366400  # s3fs
    assert m.file_mtime({"last_modified": when.replace(tzinfo=None)}) == 1772366400  # naive: UTC
    assert m.file_mtime({"updated": "2026-03-01T12:00:00.000Z"}) == 1772366400  # gcsfs
    assert m.file_mtime({"size": 3}) is None


def test_file_mtime_of_a_real_s3_listing(s3):
    fs = s3.filesystem()
    path = f"{s3.bucket}/mtime-probe/a.parquet"
    before = time.time()
    fs.pipe_file(path, b"x")
    info = fs.find(f"{s3.bucket}/mtime-probe", detail=True)[path]
    assert before - 2 <= m.file_mtime(info) <= time.time() + 2  # S3 keeps whole seconds


def test_maintain_removes_orphan_metadata_files_older_than_the_grace(tmp_path, small_corpus, local_ray, capsys):
    """Orphan metadata: a table version that lost a commit race (here: a stray copy in ``runs`` and in
    the lock table) is kept while young, removed when old; the tables read the same after."""
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    run_pipeline(parse_config(raw), D1)
    run_pipeline(parse_config(raw), D2)
    catalog = open_output(str(out)).catalog()
    tables = ["documents", "quarantine", "runs", "token_premium"]
    identifiers = [f"curate.{t}" for t in tables] + ["curate_locks.nights"]
    for identifier in ("curate.runs", "curate_locks.nights"):  # each lost a race: one stray version
        folder = Path(catalog.load_table(identifier).location().removeprefix("file://")) / "metadata"
        stray = sorted(folder.glob("*.metadata.json"))[-1]
        (folder / f"00999-{'0' * 8}-lost.metadata.json").write_bytes(stray.read_bytes())
    before = {t: _ids(out) if t == "documents" else query(str(out), f"SELECT * FROM {t} ORDER BY ALL")
              for t in tables}

    def referenced(identifier: str) -> set[Path]:
        table = catalog.load_table(identifier)
        urls = {table.metadata_location, *(e.metadata_file for e in table.metadata.metadata_log)}
        for snapshot in table.metadata.snapshots:
            urls |= {snapshot.manifest_list, *(mf.manifest_path for mf in snapshot.manifests(table.io))}
        return {Path(u.removeprefix("file://")) for u in urls}

    def listed(identifier: str) -> set[Path]:
        folder = Path(catalog.load_table(identifier).location().removeprefix("file://")) / "metadata"
        return set(folder.iterdir())

    orphans = {i: listed(i) - referenced(i) for i in identifiers}
    # runs are loaded before they are created: two nights left no orphan of their own, only the strays
    assert len(orphans["curate.runs"]) == 1 and len(orphans["curate_locks.nights"]) == 1
    # young: kept
    assert main(["maintain", "--output", str(out)]) == 0
    assert "removed 0 orphan metadata file(s)" in capsys.readouterr().out
    assert all(listed(i) >= orphans[i] for i in identifiers)
    # two days old: removed; what the tables reference stays, so they read the same
    _age([p for i in identifiers for p in listed(i)])
    assert main(["maintain", "--output", str(out)]) == 0
    assert f"removed {sum(map(len, orphans.values()))} orphan metadata file(s)" in capsys.readouterr().out
    assert all(listed(i) == referenced(i) for i in identifiers)
    assert {t: _ids(out) if t == "documents" else query(str(out), f"SELECT * FROM {t} ORDER BY ALL")
            for t in tables} == before


def test_maintain_during_a_run_deletes_nothing_the_run_needs_even_without_its_lock(
        tmp_path, small_corpus, local_ray, monkeypatch):
    """A run stages everything, then pauses right before its commit; meanwhile ``maintain`` runs
    with no retention, blind to locks (as from a host that could not see them). The run then
    commits, and its night reads whole."""
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    run_pipeline(parse_config(raw), D1)
    write_shard(small_corpus / "c.parquet", id=["n1"], text=["A new document arrives."], lang=["deu_Latn"])
    script = textwrap.dedent(f"""
        import ray
        from pipelines.config import parse_config
        from pipelines.runner import run_pipeline
        ray.init(num_cpus=2, include_dashboard=False)
        print("committed", run_pipeline(parse_config({raw!r}), {D1!r}).rows_out, flush=True)
    """)
    env = {**os.environ, "CURATE_COMMIT_HOOK": "before:documents:sleep=30"}
    run = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not any("/run_date=" in f and "part-token_premium" in f for f in _staged(out) - _committed(out)):
            assert run.poll() is None and time.time() < deadline, run.stderr.read()[-3000:] if run.stderr else ""
            time.sleep(0.5)  # the run has staged its finalizer's table: it is about to commit
        staged = _staged(out) - _committed(out)
        monkeypatch.setattr(m, "held_locks", lambda catalog, now=None: {})  # blind to locks
        report = m.maintain(open_output(str(out)), retain_days=0)
        assert report.live_dates == [] and report.orphans == [] and len(report.kept_young) == len(staged)
        assert staged <= _staged(out)
        out_text, err = run.communicate(timeout=300)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 0, err[-3000:]
    assert out_text.split() == ["committed", "6"]
    assert "n1/2026-03-01" in _ids(out) and len(_ids(out)) == 6


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
