"""Upkeep of an output's tables (``curate maintain``): expire old snapshots, remove orphan files.

Every commit of a night adds Iceberg snapshots, and a rerun of a date leaves the replaced run's data
files referenced only by older snapshots; a killed run leaves its staged files under ``_data`` with
no snapshot at all, and a commit that lost a race leaves metadata files no table version names.
``maintain`` removes them, and keeps everything a reader or a running night can still need:

* **Retained runs:** every committed ``runs`` row committed within the retention, plus each date's
  latest committed run (the current view, however old). For each retained run R, the snapshots of
  the view ``curate query --as-of R`` reads (per date, the latest committed run no later than R) are
  kept, so the current tables and the time travel to any retained run read the same rows as before.
* **Snapshots** are expired (pyiceberg ``table.maintenance.expire_snapshots()``) when they are older
  than the retention, not kept above, not a branch or tag head, and not younger than the start of a
  live run (whose ``runs`` row, not written yet, will name them). ``runs`` keeps its current snapshot.
* **Data files** under ``<output>/_data/<table>/run_date=D/<run_id>/`` that no remaining snapshot
  of their table references are removed only when they are older than the grace period (default
  24 hours, by the file's modification time), as Iceberg's own orphan-file removal does
  (``older_than``): a running night writes its files and commits them well within it, so this is
  safe without any lock. As an extra, no file of a date whose lock (``pipelines.lock``) a live run
  holds is removed. Files are listed before the locks and snapshots are read, so a run that commits
  meanwhile keeps its files.
* **Metadata:** the manifest lists of expired snapshots and manifests no remaining snapshot uses;
  and, older than the grace period, every ``*.metadata.json`` under a table's ``metadata/`` that is
  neither its current one nor in its metadata log, and every ``*.avro`` no snapshot references
  (listed first, the table read after), for the lock table too.

The grace period must exceed the longest run (staging to commit). The selection is made by pure
functions (``retained_runs``, ``protected_snapshots``, ``expirable_snapshots``, ``orphan_files``,
``orphan_metadata``); ``maintain`` reads the catalog, applies them, and with ``dry_run`` only
reports. It works on any fsspec output (object stores included): it lists, but never on a commit's
path.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import EqualTo
from pyiceberg.table import Table

from pipelines.cache import cache_tables, expire_cache
from pipelines.cache import identifier as cache_identifier
from pipelines.cache import load_table as cache_table
from pipelines.io import url_to_fs
from pipelines.lock import LOCK_TABLE, held_locks, lock_table
from pipelines.tables import (
    COMMIT_RETRIES,
    DATA_DIR,
    NAMESPACE,
    RUNS,
    CatalogError,
    Output,
    load_table,
    table_names,
)

log = logging.getLogger("curate.maintain")
#: A live run's snapshots are kept from this long before its lock's start time (clock skew).
LIVE_MARGIN = timedelta(minutes=5)
#: Unreferenced files younger than this are kept (a run may still commit them).
DEFAULT_GRACE_HOURS = 24.0


@dataclass
class MaintainReport:
    """What ``maintain`` removed (or, with ``dry_run``, would remove)."""

    retain_days: float
    dry_run: bool
    grace_hours: float = DEFAULT_GRACE_HOURS
    expired: dict[str, list[int]] = field(default_factory=dict)  # table -> snapshot ids
    kept_snapshots: int = 0
    orphans: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes)
    kept_live: list[str] = field(default_factory=list)  # unreferenced files of live runs' dates
    kept_young: list[str] = field(default_factory=list)  # unreferenced, inside the grace period
    live_dates: list[str] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)  # used only by expired snapshots
    orphan_metadata: list[str] = field(default_factory=list)  # no table version references them
    cache: str | None = None  # the result cache's expiry (pipelines.cache.expire_cache), one line
    broken_cache: list[str] = field(default_factory=list)  # cache tables that cannot be read (files kept)

    @property
    def expired_count(self) -> int:
        return sum(len(ids) for ids in self.expired.values())

    @property
    def orphan_bytes(self) -> int:
        return sum(size for _, size in self.orphans)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"{verb} {self.expired_count} snapshot(s) older than {self.retain_days:g} day(s) "
            f"({', '.join(f'{t}: {len(ids)}' for t, ids in sorted(self.expired.items()) if ids) or 'none'}); "
            f"kept {self.kept_snapshots}",
            f"{verb} {len(self.orphans)} orphan data file(s), {self.orphan_bytes} bytes",
            f"{verb} {len(self.metadata_files)} unused metadata file(s)",
            f"{verb} {len(self.orphan_metadata)} orphan metadata file(s)",
        ]
        if self.kept_young:
            lines.append(f"kept {len(self.kept_young)} unreferenced data file(s) younger than "
                         f"{self.grace_hours:g} hour(s) (--grace-hours)")
        if self.cache:
            lines.append(self.cache)
        if self.broken_cache:
            lines.append(f"kept the files of {len(self.broken_cache)} cache table(s) that cannot be read: "
                         f"{', '.join(self.broken_cache)} (drop them; the cache is rebuilt by the next nights)")
        if self.live_dates:
            lines.append(f"kept {len(self.kept_live)} staged file(s) of running night(s): "
                         f"{', '.join(self.live_dates)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- selection


def retained_runs(rows: Iterable[dict], cutoff: datetime) -> list[dict]:
    """Committed runs to keep readable: committed at or after ``cutoff``, plus each date's latest."""
    committed = sorted((r for r in rows if r.get("status") == "committed"), key=lambda r: r["committed_at"])
    latest = {r["run_date"]: r["run_id"] for r in committed}
    return [r for r in committed
            if latest[r["run_date"]] == r["run_id"] or _parse(r["committed_at"]) >= cutoff]


def protected_snapshots(rows: Iterable[dict], cutoff: datetime) -> dict[str, set[int]]:
    """Table -> snapshot ids that the current view or ``--as-of`` a retained run reads.

    The view as of run R is, per date, the latest committed run no later than R (as
    ``pipelines.tables.committed_runs`` reads it); each of those runs' recorded snapshots is kept.
    """
    rows = [r for r in rows if r.get("status") == "committed"]
    keep_ids = {r["run_id"] for r in retained_runs(rows, cutoff)}
    protected: dict[str, set[int]] = {}
    view: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["committed_at"]):
        view[r["run_date"]] = r
        if r["run_id"] not in keep_ids:
            continue
        for seen in view.values():
            for table, snapshot in json.loads(seen.get("snapshots") or "{}").items():
                if snapshot is not None:
                    protected.setdefault(table, set()).add(int(snapshot))
    return protected


def expirable_snapshots(snapshots: Iterable[tuple[int, int]], keep: set[int], cutoff: datetime,
                        live_since: datetime | None) -> list[int]:
    """Ids of ``(snapshot id, timestamp ms)`` older than ``cutoff``, not in ``keep`` and not made
    since ``live_since`` (the earliest live run's start, less a margin)."""
    before = _ms(cutoff)
    live = _ms(live_since - LIVE_MARGIN) if live_since is not None else None
    return sorted(sid for sid, ts in snapshots
                  if ts < before and sid not in keep and (live is None or ts < live))


def data_file_key(path: str) -> tuple[str, str, str] | None:
    """``(table, run_date, run_id)`` of a path relative to ``_data`` laid out by a run, else None."""
    parts = path.strip("/").split("/")
    if len(parts) != 4 or not parts[1].startswith("run_date=") or parts[0].startswith("."):
        return None
    return parts[0], parts[1].removeprefix("run_date="), parts[2]


def orphan_files(files: dict[str, tuple[int, float | None]], referenced: dict[str, set[str]],
                 live_dates: set[str], older_than: float,
                 ) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """(orphans to remove, unreferenced files kept for a live run, unreferenced files kept as too
    young) among ``files`` (path relative to ``_data`` -> (bytes, modification time in epoch
    seconds or None when unknown)); ``referenced``: table -> paths relative to ``_data`` its
    snapshots list. Only files modified before ``older_than`` (epoch seconds) are removed."""
    remove, live, young = [], [], []
    for path, (size, mtime) in sorted(files.items()):
        key = data_file_key(path)
        if key is None or path in referenced.get(key[0], set()):
            continue
        if key[1] in live_dates:
            live.append(path)
        elif mtime is None or mtime >= older_than:
            young.append(path)
        else:
            remove.append((path, size))
    return remove, live, young


def orphan_metadata(files: dict[str, float | None], referenced: set[str], older_than: float) -> list[str]:
    """Metadata files among ``files`` (path -> modification time, epoch seconds) to remove: table
    versions (``*.metadata.json``) and manifests or manifest lists (``*.avro``) not in ``referenced``
    and modified before ``older_than``. Anything else (statistics files, …) is left alone."""
    return sorted(path for path, mtime in files.items()
                  if (path.endswith(".metadata.json") or path.endswith(".avro"))
                  and path not in referenced and mtime is not None and mtime < older_than)


def file_mtime(info: dict) -> float | None:
    """A listed file's modification time (epoch seconds) from an fsspec ``info`` entry: ``mtime``
    (local), ``LastModified`` (s3), ``last_modified`` (azure), ``updated`` (gcs), else ``created``;
    None when it has none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "timeCreated"):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return None


def _parse(stamp: str) -> datetime:
    parsed = datetime.fromisoformat(stamp)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


# -------------------------------------------------------------------------------------- apply


def maintain(output: Output, retain_days: float = 14, dry_run: bool = False,
             now: datetime | None = None, grace_hours: float = DEFAULT_GRACE_HOURS,
             cache_days: float | None = None) -> MaintainReport:
    """Expire snapshots older than ``retain_days`` that no retained run reads; remove orphan files
    older than ``grace_hours``; remove result cache entries neither made nor used in ``cache_days``
    days (None: leave the entries; their tables' snapshots and orphans are kept clean either way)."""
    if retain_days < 0:
        raise ValueError(f"retain days must be >= 0, got {retain_days}")
    if grace_hours < 0:
        raise ValueError(f"grace hours must be >= 0, got {grace_hours}")
    fs, root = output.fs, output.root
    if not fs.exists(root):
        raise CatalogError(f"output {output.url} does not exist")
    if not fs.isdir(root):
        raise CatalogError(f"output {output.url} is a file, not a directory")
    catalog = output.catalog()
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retain_days)
    older_than = (now - timedelta(hours=grace_hours)).timestamp()
    report = MaintainReport(retain_days, dry_run, grace_hours)

    # 1. list the staged files first, 2. then the live runs' locks, 3. then read the snapshots:
    # a run that commits between 1 and 3 has its files in the snapshots read in 3.
    data_root = f"{root}/{DATA_DIR}"
    files = _list_files(output, data_root)
    held = held_locks(catalog, now.timestamp())
    report.live_dates = sorted(held)
    live_since = _earliest(held)

    if cache_days is not None:  # result cache (issue 26): expire entries before the files are judged
        report.cache = expire_cache(catalog, output, cache_days, now, dry_run).summary(dry_run)

    rows = _committed_rows(catalog)
    protected = protected_snapshots(rows, cutoff)
    referenced: dict[str, set[str]] = {}
    for name in table_names(catalog):
        table = load_table(catalog, name)
        if table is None:
            continue
        expired, kept, kept_paths, metadata = _expire(table, protected.get(name, set()), cutoff,
                                                      live_since, dry_run)
        report.expired[name] = expired
        report.kept_snapshots += kept
        report.metadata_files += metadata
        referenced[name] = {_relative(fs, p, data_root) for p in kept_paths}
        report.orphan_metadata += _orphan_metadata(output, catalog, f"{NAMESPACE}.{name}", older_than, dry_run)
    for name in cache_tables(catalog, used=True):  # result cache (issue 26): its own namespace
        try:
            table = cache_table(catalog, name)
        except Exception as err:  # noqa: BLE001 - a broken cache table: keep its files, report it
            log.warning("cache table %s cannot be read (%s); its files are kept", name, type(err).__name__)
            report.broken_cache.append(name)
            referenced[name] = {p for p in files if p.startswith(f"{name}/")}
            continue
        expired, kept, kept_paths, metadata = _expire(table, set(), cutoff, live_since, dry_run)
        report.expired[name], report.kept_snapshots = expired, report.kept_snapshots + kept
        report.metadata_files += metadata
        referenced[name] = {_relative(fs, p, data_root) for p in kept_paths}
        report.orphan_metadata += _orphan_metadata(output, catalog, cache_identifier(name), older_than, dry_run)
    if lock_table(catalog, create=False) is not None:
        report.orphan_metadata += _orphan_metadata(output, catalog, LOCK_TABLE, older_than, dry_run)

    report.orphans, report.kept_live, report.kept_young = orphan_files(files, referenced, set(held),
                                                                       older_than)
    if not dry_run:
        _remove(output, data_root, [p for p, _ in report.orphans])
    return report


def _list_files(output: Output, data_root: str) -> dict[str, tuple[int, float | None]]:
    fs = output.fs
    if not fs.exists(data_root):
        return {}
    found = fs.find(data_root, detail=True)
    return {_relative(fs, path, data_root): (int(info.get("size") or 0), file_mtime(info))
            for path, info in found.items() if info.get("type", "file") == "file"}


def _fs_of(output: Output, url: str):  # noqa: ANN202 - fsspec.AbstractFileSystem
    """The filesystem of a table's ``url``: the output's (its settings) when on the same store."""
    fs = output.fs
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return fs if protocol in protocols or (protocol == "file" and "local" in protocols) else url_to_fs(url)[0]


def _orphan_metadata(output: Output, catalog, identifier: str, older_than: float,  # noqa: ANN001
                     dry_run: bool) -> list[str]:
    """Remove (unless ``dry_run``) the orphan metadata files of a table; their URLs.

    The ``metadata/`` folder is listed first and the table read after, so a commit that lands in
    between has its files referenced (or young)."""
    table = catalog.load_table(identifier)
    fs = _fs_of(output, table.location())
    folder = fs._strip_protocol(f"{table.location().rstrip('/')}/metadata")
    listed = fs.find(folder, detail=True) if fs.exists(folder) else {}
    files = {fs._strip_protocol(p): file_mtime(info) for p, info in listed.items()
             if info.get("type", "file") == "file"}
    table = catalog.load_table(identifier)
    meta = table.metadata
    referenced = {table.metadata_location, *(e.metadata_file for e in meta.metadata_log)}
    for snapshot in meta.snapshots:
        referenced.add(snapshot.manifest_list)
        referenced |= {m.manifest_path for m in snapshot.manifests(table.io)}
    orphans = orphan_metadata(files, {fs._strip_protocol(p) for p in referenced}, older_than)
    if not dry_run:
        for path in orphans:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
    return [fs.unstrip_protocol(p) for p in orphans]


def _relative(fs, path: str, data_root: str) -> str:  # noqa: ANN001
    stripped = fs._strip_protocol(path)
    return stripped.removeprefix(data_root).lstrip("/") if stripped.startswith(data_root + "/") else stripped


def _earliest(held: dict[str, dict]) -> datetime | None:
    starts = []
    for holder in held.values():
        try:
            starts.append(_parse(holder["started_at"]))
        except (KeyError, TypeError, ValueError):
            return datetime.fromtimestamp(0, UTC)  # unknown start: keep every snapshot
    return min(starts) if starts else None


def _committed_rows(catalog) -> list[dict]:  # noqa: ANN001
    runs = load_table(catalog, RUNS)
    if runs is None or runs.current_snapshot() is None:
        return []
    scan = runs.scan(row_filter=EqualTo("status", "committed"),
                     selected_fields=("run_id", "run_date", "status", "committed_at", "snapshots"))
    return scan.to_arrow().to_pylist()


def _expire(table: Table, keep: set[int], cutoff: datetime, live_since: datetime | None,
            dry_run: bool) -> tuple[list[int], int, set[str], list[str]]:
    """Expire ``table``'s snapshots; (expired ids, how many remain, data files the remaining ones
    reference, metadata files only the expired ones used)."""
    for attempt in range(COMMIT_RETRIES):
        heads = {ref.snapshot_id for ref in table.metadata.refs.values()}
        snapshots = table.metadata.snapshots
        expired = expirable_snapshots(((s.snapshot_id, s.timestamp_ms) for s in snapshots),
                                      keep | heads, cutoff, live_since)
        gone = [s for s in snapshots if s.snapshot_id in expired]
        if expired and not dry_run:
            try:
                table.maintenance.expire_snapshots().by_ids(expired).commit()
            except CommitFailedException:
                if attempt == COMMIT_RETRIES - 1:
                    raise
                log.warning("expiring snapshots of %s conflicted with a commit; retrying", table.name())
                table = table.refresh()
                continue
        remaining = [s for s in table.metadata.snapshots if s.snapshot_id not in expired]
        break
    manifests, paths = set(), set()
    for snapshot in remaining:
        for manifest in snapshot.manifests(table.io):
            if manifest.manifest_path in manifests:
                continue
            manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                paths.add(entry.data_file.file_path)
    lists = {s.manifest_list for s in remaining}
    unused = sorted({s.manifest_list for s in gone} - lists
                    | {m.manifest_path for s in gone for m in s.manifests(table.io)} - manifests)
    if not dry_run:
        for path in unused:
            with contextlib.suppress(FileNotFoundError, OSError):
                table.io.delete(path)
    return expired, len(remaining), paths, unused


def _remove(output: Output, data_root: str, paths: list[str]) -> None:
    """Delete the orphans, then the run directories they leave empty (local outputs)."""
    fs = output.fs
    dirs = set()
    for path in paths:
        full = f"{data_root}/{path}"
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(full)
        dirs.add(full.rsplit("/", 1)[0])
    dirs |= {d.rsplit("/", 1)[0] for d in dirs}  # <table>/run_date=D/<run_id>, then <table>/run_date=D
    for directory in sorted(dirs, key=len, reverse=True):
        with contextlib.suppress(OSError):
            if fs.isdir(directory) and not fs.ls(directory):
                fs.rmdir(directory)
