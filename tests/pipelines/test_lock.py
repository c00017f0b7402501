"""The run lock in the catalog: one winner among hosts, leases, heartbeats, release by the holder only.

Every test runs on the embedded SQLite catalog and on a real Postgres catalog. "Hosts" are processes
with their own HOME and no shared state but the catalog.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pyiceberg.catalog import load_catalog

from pipelines.lock import (
    TABLE_PROPERTIES,
    LockHeld,
    LockLost,
    RunLock,
    entries,
    held_locks,
    lock_table,
    run_lock,
)

ROOT = Path(__file__).resolve().parents[2]
DATE = "2026-06-01"


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_props(request, tmp_path) -> dict:
    """Properties of a fresh, empty catalog (no lock table yet), warehouse on local disk."""
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        uri = request.getfixturevalue("postgres").new_database()
    return {"type": "sql", "uri": uri, "warehouse": f"file://{warehouse}"}


def _catalog(props: dict):  # noqa: ANN202 - a fresh catalog object, as another process would have
    return load_catalog("curate", **props)


HOST = textwrap.dedent("""
    import json, os, sys, time
    from pyiceberg.catalog import load_catalog
    from pipelines import lock as locks
    from pipelines.lock import LockHeld, RunLock
    props, date, run_id, lease, start_at, hold, delay = json.loads(sys.argv[1])
    swap = locks._swap
    def slow_swap(*args, **kwargs):  # widen the window between reading the entry and committing
        time.sleep(delay)
        return swap(*args, **kwargs)
    locks._swap = slow_swap
    catalog = load_catalog("curate", **props)
    catalog.list_namespaces()  # connect before the start line
    time.sleep(max(0.0, start_at - time.time()))
    lock = RunLock(catalog, date, lease_s=lease, run_id=run_id)
    try:
        lock.acquire()
    except LockHeld as err:
        print("held", err, flush=True)
        sys.exit(0)
    print("won", flush=True)
    while not os.path.exists(hold):  # hold it until the test says
        time.sleep(0.1)
    lock.release()
    print("released", flush=True)
""")


def _host(tmp_path: Path, name: str, props: dict, run_id: str, *, lease: float = 30, start_at: float = 0,
          hold: str = "", delay: float = 0) -> subprocess.Popen:
    """A process standing for another host: its own HOME, nothing shared but the catalog. It waits
    ``delay`` seconds between reading the lock table and each commit to it. Once it has the lock, it
    holds it until the file ``hold`` exists."""
    home = tmp_path / f"home-{name}"
    home.mkdir(exist_ok=True)
    args = json.dumps([props, DATE, run_id, lease, start_at, hold, delay])
    return subprocess.Popen([sys.executable, "-c", HOST, args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(home)})


def test_of_hosts_racing_for_one_date_exactly_one_wins_and_the_others_name_it(tmp_path, catalog_props):
    # no lock table yet: the hosts also race to create it. Each reads the free entry, then waits a
    # second before its commit, so all of them try to take the lock from the same state. The
    # catalog's own SQL tables exist first: pyiceberg's SqlCatalog creates them unguarded, and four
    # hosts opening a brand-new catalog at once can collide there ("table iceberg_tables already
    # exists"), before the race under test.
    load_catalog("curate", **catalog_props).list_namespaces()
    start_at = time.time() + 6
    done = tmp_path / "done"
    hosts = {f"run-{i}": _host(tmp_path, str(i), catalog_props, f"run-{i}", start_at=start_at,
                               hold=str(done), delay=1) for i in range(4)}
    first = {run_id: proc.stdout.readline() for run_id, proc in hosts.items()}  # all have tried
    done.touch()
    outputs = {}
    for run_id, proc in hosts.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs[run_id] = first[run_id] + out
    winners = [r for r, out in outputs.items() if out.startswith("won")]
    assert len(winners) == 1, outputs
    winner = winners[0]
    assert outputs[winner].split() == ["won", "released"]
    for run_id, out in outputs.items():
        if run_id != winner:
            assert out.startswith("held a run of 2026-06-01 is already going"), out
            assert f"run {winner} (pid {hosts[winner].pid} on " in out and "lease until 20" in out
    assert held_locks(_catalog(catalog_props)) == {}  # the winner released it


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(tmp_path, catalog_props, caplog):
    holder = _host(tmp_path, "a", catalog_props, "run-a", lease=3, hold=str(tmp_path / "never"))
    assert holder.stdout.readline().strip() == "won", holder.stderr.read()[-3000:]
    holder.kill()  # dies holding it: no release, no more heartbeats
    holder.wait()
    catalog = _catalog(catalog_props)
    with pytest.raises(LockHeld, match=f"run run-a \\(pid {holder.pid} on "):
        RunLock(catalog, DATE, lease_s=3, run_id="run-b").acquire()  # its lease has not ended yet
    time.sleep(3.2)
    assert held_locks(catalog) == {}  # expired: nobody holds it
    with caplog.at_level(logging.WARNING, logger="curate.lock"), run_lock(catalog, DATE, run_id="run-b") as lock:
        assert f"took over the expired lock of {DATE} from run run-a (pid {holder.pid}" in caplog.text
        assert held_locks(catalog)[DATE]["run_id"] == "run-b" == lock.holder["run_id"]
    assert held_locks(catalog) == {}


def test_heartbeats_keep_a_long_run_locked_past_its_lease(catalog_props):
    catalog, other = _catalog(catalog_props), _catalog(catalog_props)
    with run_lock(catalog, DATE, lease_s=1.5, run_id="long") as lock:
        first = lock.holder["expires_at"]
        time.sleep(5)  # more than three leases
        assert lock.holder["expires_at"] > first
        with pytest.raises(LockHeld, match="run long"):
            RunLock(other, DATE, lease_s=1.5, run_id="second").acquire()
        lock.check()  # still ours
        # an unrelated date is independent
        with run_lock(other, "2026-06-02", lease_s=1.5, run_id="other-night"):
            assert sorted(held_locks(other)) == [DATE, "2026-06-02"]
    assert held_locks(other) == {}


def test_a_run_whose_heartbeats_stopped_loses_its_lock_and_cannot_release_the_new_holders(catalog_props):
    catalog, other = _catalog(catalog_props), _catalog(catalog_props)
    stalled = RunLock(catalog, DATE, lease_s=1, heartbeat_s=3600, run_id="stalled")  # no renewal in time
    stalled.acquire()
    time.sleep(1.2)
    with run_lock(other, DATE, lease_s=30, run_id="next") as taker:
        with pytest.raises(LockLost, match="no longer this run's .*held by run next"):
            stalled.check()
        with pytest.raises(LockLost):
            stalled.check()  # stays lost
        stalled.release()  # not its lock any more: leaves the new holder's entry alone
        assert held_locks(catalog)[DATE]["token"] == taker.holder["token"]
    assert held_locks(catalog) == {}


def test_a_lock_whose_lease_ran_out_unclaimed_is_renewed_by_check(catalog_props):
    catalog = _catalog(catalog_props)
    lock = RunLock(catalog, DATE, lease_s=1, heartbeat_s=3600, run_id="slow")
    lock.acquire()
    time.sleep(1.2)
    assert held_locks(catalog) == {}
    lock.check()  # nobody took it: the compare-and-swap proves it is still ours
    assert held_locks(catalog)[DATE]["run_id"] == "slow"
    lock.release()
    assert held_locks(catalog) == {}


def test_the_lock_is_released_when_the_run_fails(catalog_props):
    catalog = _catalog(catalog_props)
    with pytest.raises(RuntimeError, match="the run died"), run_lock(catalog, DATE, run_id="r"):
        raise RuntimeError("the run died")
    with run_lock(catalog, DATE, run_id="again"):
        pass
    assert entries(lock_table(catalog)) == {}


def test_heartbeats_do_not_pile_up_metadata_files(catalog_props):
    catalog = _catalog(catalog_props)
    with run_lock(catalog, DATE, lease_s=0.3, run_id="r") as lock:
        time.sleep(3)  # ~30 renewals
    table = lock_table(catalog)
    assert lock.holder["expires_at"] > lock.holder["started_at"]
    metadata = Path(table.location().removeprefix("file://")) / "metadata"
    files = sorted(p.name for p in metadata.iterdir())
    versions = int(table.metadata_location.rsplit("/", 1)[1].split("-")[0])
    assert versions >= 20  # the renewals did commit
    kept = int(TABLE_PROPERTIES["write.metadata.previous-versions-max"]) + 1  # the log and the current
    assert len(files) == kept, files
    assert len(table.schemas()) == 1  # the version counter's old schemas are removed as well
