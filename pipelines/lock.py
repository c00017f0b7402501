"""One run per (catalog, date), on every host: a lease kept in the catalog, renewed by heartbeats.

The lock lives where every host sees it: in the output's Iceberg catalog, as table properties of a
small table that never holds data (``curate_locks.nights``). Each locked date has one entry::

    lock.<date> = {"run_id", "token", "host", "pid", "started_at", "expires_at"}   (JSON, UTC ISO)

**Compare-and-swap.** Every change of the lock table (take, renew, release) is one Iceberg commit
that (a) adds a new schema whose only field id is the table's ``last-column-id + 1`` and (b) sets
or removes the entry, under the requirement ``assert-last-assigned-field-id`` = the id it read. The
last assigned field id only ever grows, so it is the table's version counter: a commit succeeds
only if nobody changed the table since it was read (no ABA), and the catalog checks this atomically
with its swap of the metadata pointer (SQL catalogs: ``UPDATE … WHERE metadata_location = <read>``;
REST servers check the same standard requirement). A plain ``set_properties`` would not do: it
carries no requirement, so two takers would both succeed and the last one would win. A failed
commit means someone else changed the table: reload, check the entry again, retry.

**Lease.** A taken lock expires ``lease_s`` after its last renewal (default 600 s,
``$CURATE_LOCK_LEASE_S``); a thread renews it every ``lease_s / 3``. An expired entry is taken over
by the next run of its date; there is no pid check (hosts' clocks are assumed to agree to well
under a lease). Before it commits, a run calls ``RunLock.check()``: it renews the lease through the
same compare-and-swap and raises ``LockLost`` when the entry is no longer its own (its heartbeats
failed past the lease and another run took the date), so a run that lost its lock never commits.

Old metadata files of the lock table are deleted by the commits themselves (table properties
``write.metadata.delete-after-commit.enabled`` and ``write.metadata.previous-versions-max``);
``curate maintain`` removes the ones left by commits that lost a race.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, TableAlreadyExistsError
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.update import (
    AddSchemaUpdate,
    AssertLastAssignedFieldId,
    RemovePropertiesUpdate,
    RemoveSchemasUpdate,
    SetCurrentSchemaUpdate,
    SetPropertiesUpdate,
)
from pyiceberg.types import LongType, NestedField

log = logging.getLogger("curate.lock")
LOCK_NAMESPACE = "curate_locks"
LOCK_TABLE = f"{LOCK_NAMESPACE}.nights"
PREFIX = "lock."
LEASE_ENV = "CURATE_LOCK_LEASE_S"
DEFAULT_LEASE_S = 600.0
#: Commits that lose a race are retried this many times (each loss means another commit landed).
SWAP_RETRIES = 50
TABLE_PROPERTIES = {"write.metadata.delete-after-commit.enabled": "true",
                    "write.metadata.previous-versions-max": "5"}


class LockHeld(RuntimeError):
    """Another live run holds the lock of this date."""


class LockLost(RuntimeError):
    """This run's lock expired and was taken by another run, or was removed: it must not commit."""


def lease_seconds() -> float:
    """The lease of a lock: ``$CURATE_LOCK_LEASE_S`` seconds, default 600."""
    raw = os.environ.get(LEASE_ENV)
    try:
        lease = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        raise ValueError(f"{LEASE_ENV} must be a number of seconds, got {raw!r}") from None
    if not lease > 0:
        raise ValueError(f"{LEASE_ENV} must be > 0, got {raw!r}")
    return lease


# ------------------------------------------------------------------------------- the lock table


def lock_table(catalog: Catalog, create: bool = True) -> Table | None:
    """The lock table; made on first use (``create``), else None when there is none.

    Loaded first and created only when missing, so no run writes a metadata file for nothing; two
    first-ever runs racing to create it both end up loading the one that won.
    """
    try:
        return catalog.load_table(LOCK_TABLE)
    except NoSuchTableError:
        if not create:
            return None
    try:
        catalog.create_namespace_if_not_exists(LOCK_NAMESPACE)
    except Exception:  # another run made it between the check and the insert (SQL: IntegrityError)
        if not catalog.namespace_exists(LOCK_NAMESPACE):
            raise
    try:
        return catalog.create_table(LOCK_TABLE, Schema(NestedField(1, "version", LongType(), required=False)),
                                    properties=TABLE_PROPERTIES)
    except TableAlreadyExistsError:
        return catalog.load_table(LOCK_TABLE)


def _swap(table: Table, set_entries: dict[str, str] | None = None, remove: list[str] | None = None) -> None:
    """Commit the entry changes iff the table is unchanged since ``table`` was loaded
    (``CommitFailedException`` otherwise); see the module docstring."""
    meta = table.metadata
    version = meta.last_column_id + 1
    schema = Schema(NestedField(version, "version", LongType(), required=False),
                    schema_id=max(s.schema_id for s in meta.schemas) + 1)
    updates = [AddSchemaUpdate(schema=schema), SetCurrentSchemaUpdate(schema_id=-1),
               RemoveSchemasUpdate(schema_ids=[s.schema_id for s in meta.schemas])]
    if set_entries:
        updates.append(SetPropertiesUpdate(updates=set_entries))
    if remove:
        updates.append(RemovePropertiesUpdate(removals=remove))
    # pyiceberg has no public call to commit with a requirement of our choosing; ``_do_commit`` is
    # what every Transaction commits through (it also deletes old metadata files).
    table._do_commit(updates=tuple(updates),  # noqa: SLF001
                     requirements=(AssertLastAssignedFieldId(last_assigned_field_id=meta.last_column_id),))


def _backoff(attempt: int) -> None:
    time.sleep(min(0.02 * 2 ** attempt, 1.0) * random.uniform(0.5, 1.5))


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _epoch(stamp: str) -> float:
    parsed = datetime.fromisoformat(stamp)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def entries(table: Table) -> dict[str, dict]:
    """Date -> holder of every entry of the lock table (expired ones too; unreadable ones as
    ``{"unreadable": raw}``, which never expire)."""
    found = {}
    for key, raw in table.properties.items():
        if key.startswith(PREFIX):
            try:
                holder = json.loads(raw)
                _epoch(holder["expires_at"])
            except (ValueError, TypeError, KeyError):
                holder = {"unreadable": raw}
            found[key.removeprefix(PREFIX)] = holder
    return found


def expired(holder: dict, now: float | None = None) -> bool:
    """True when ``holder``'s lease ended before ``now`` (epoch seconds; default: the clock)."""
    if "unreadable" in holder:
        return False
    return _epoch(holder["expires_at"]) < (time.time() if now is None else now)


def describe(holder: dict) -> str:
    """Who holds a lock, for messages."""
    if "unreadable" in holder:
        return f"an unreadable entry {holder['unreadable']!r}"
    return (f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}) since "
            f"{holder.get('started_at')}, lease until {holder.get('expires_at')}")


def held_locks(catalog: Catalog, now: float | None = None) -> dict[str, dict]:
    """Date -> holder of every lock whose lease has not expired (``pipelines.maintain``)."""
    table = lock_table(catalog, create=False)
    if table is None:
        return {}
    return {d: h for d, h in sorted(entries(table).items()) if not expired(h, now)}


# -------------------------------------------------------------------------------------- a lock


#: Tokens of the locks this process holds now. An entry naming this very process (host and pid) with
#: another token was left by one of its earlier runs that could not release it (a full disk, a lost
#: catalog): no run is behind it, so it is taken over at once instead of waiting out its lease.
_LIVE_TOKENS: set[str] = set()


def _left_by_this_process(holder: dict) -> bool:
    return (holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
            and holder.get("token") not in _LIVE_TOKENS)


class RunLock:
    """The lock of one date, taken by ``acquire`` and kept alive by a heartbeat thread that renews
    it every ``heartbeat_s`` seconds (default ``lease_s / 3``)."""

    def __init__(self, catalog: Catalog, run_date: str, *, lease_s: float | None = None,
                 run_id: str | None = None, heartbeat_s: float | None = None) -> None:
        self.catalog = catalog
        self.run_date = run_date
        self.key = f"{PREFIX}{run_date}"
        self.lease_s = float(lease_s) if lease_s is not None else lease_seconds()
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.lease_s / 3
        self.holder = {"run_id": run_id, "token": uuid.uuid4().hex, "host": socket.gethostname(),
                       "pid": os.getpid(), "started_at": _stamp(time.time()), "expires_at": None}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> dict:
        """Take the lock (``LockHeld`` when a live run has it) and start the heartbeats."""
        for attempt in range(SWAP_RETRIES):
            table = lock_table(self.catalog)
            current = entries(table).get(self.run_date)
            if current is not None and not expired(current) and not _left_by_this_process(current):
                raise LockHeld(f"a run of {self.run_date} is already going: the lock is held by "
                               f"{describe(current)}")
            holder = self._extended(table, attempt)
            if holder is None:
                continue
            if current is not None:
                log.warning("took over the %s lock of %s from %s", "expired" if expired(current) else
                            "unreleased", self.run_date, describe(current))
            self.holder = holder
            _LIVE_TOKENS.add(holder["token"])
            self._thread = threading.Thread(target=self._beat, name=f"lock-{self.run_date}", daemon=True)
            self._thread.start()
            return holder
        raise LockHeld(f"could not take the lock of {self.run_date}: the lock table kept changing")

    def check(self) -> None:
        """Renew the lease now; ``LockLost`` when the lock is no longer this run's. Call it right
        before committing: a full lease then lies ahead of the commit."""
        if self.lost:
            raise LockLost(self.lost)
        self._renew()

    def release(self) -> None:
        """Stop the heartbeats and remove the entry if it is still ours."""
        self._stop.set()
        _LIVE_TOKENS.discard(self.holder["token"])
        if self._thread is not None:
            self._thread.join()
        for attempt in range(SWAP_RETRIES):
            table = lock_table(self.catalog, create=False)
            current = entries(table).get(self.run_date) if table is not None else None
            if current is None or current.get("token") != self.holder["token"]:
                return
            try:
                _swap(table, remove=[self.key])
                return
            except CommitFailedException:
                _backoff(attempt)
        log.warning("could not release the lock of %s (it expires at %s)", self.run_date,
                    self.holder["expires_at"])

    def _renew(self) -> None:
        for attempt in range(SWAP_RETRIES):
            table = lock_table(self.catalog, create=False)
            current = entries(table).get(self.run_date) if table is not None else None
            if current is None or current.get("token") != self.holder["token"]:
                now = "nobody" if current is None else describe(current)
                self.lost = (f"the lock of {self.run_date} is no longer this run's ({self.holder['run_id']}, "
                             f"lease until {self.holder['expires_at']}); it is held by {now}")
                raise LockLost(self.lost)
            holder = self._extended(table, attempt)
            if holder is None:
                continue
            self.holder = holder
            return
        raise LockLost(f"could not renew the lock of {self.run_date}: the lock table kept changing")

    def _extended(self, table: Table, attempt: int) -> dict | None:
        """Write this run's entry with a full lease ahead (compare-and-swap); the entry written, or
        None after backing off when another commit came first."""
        holder = self.holder | {"expires_at": _stamp(time.time() + self.lease_s)}
        try:
            _swap(table, {self.key: json.dumps(holder)})
        except CommitFailedException:
            _backoff(attempt)
            return None
        return holder

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except LockLost as err:
                log.error("%s", err)
                return
            except Exception as err:  # noqa: BLE001 - the catalog may be back before the lease ends
                log.warning("heartbeat of the lock of %s failed (lease until %s): %s: %s", self.run_date,
                            self.holder["expires_at"], type(err).__name__, err)


@contextmanager
def run_lock(catalog: Catalog, run_date: str, *, lease_s: float | None = None,
             run_id: str | None = None) -> Iterator[RunLock]:
    """Hold the lock of ``run_date`` in ``catalog`` for the ``with`` block (``LockHeld`` if a live
    run has it); released on exit, errors included."""
    lock = RunLock(catalog, run_date, lease_s=lease_s, run_id=run_id)
    lock.acquire()
    try:
        yield lock
    finally:
        try:
            lock.release()
        except Exception:  # never hide the run's own error; the lease ends by itself
            log.exception("could not release the lock of %s", run_date)
