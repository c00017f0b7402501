"""The result cache: a stage's columns for texts it has already scored with the same fingerprint.

Each cached stage has one Iceberg table per fingerprint (``pipelines.fingerprint``) in the run's
catalog, ``curate_cache.<stage>_<fingerprint[:16]>`` (its own namespace: the night's tables, their
date-replacing commit and ``curate recover`` never touch it), partitioned by the date that made
the entry; its data files lie under ``_data/_cache_<stage>_<fingerprint[:16]>/``:

    content_sha256  string   sha256 (hex) of the document's ``text`` (UTF-8 bytes), the key
    <the stage's columns>    exactly as the stage computed them (same types)
    run_id, run_date         the run that computed them

A changed model file, config field, operator version or package version changes the fingerprint,
hence the table: old entries are never read for the new stage. ``curate_cache.used``
(``cache_table``, ``content_sha256``, ``run_date``) records each night's hits, for expiry.

During a night (``pipelines.cache_stage``) the rows are joined with the table's files (Ray Data's
hash join: distributed, the driver lists files only); rows found carry the cached columns and skip
the stage; the rest run, once per distinct text; the writers stage the new entries as files of the
cache table and report them. After the night's tables, before the ``runs`` row, ``commit_cache``
appends them (append-only: no date is replaced). Entries another run added meanwhile are left out
of the append, so two concurrent nights add a key once; readers also keep one entry per key.

A cache that cannot be read or committed never fails a night: the stage runs without it, with a
warning. ``expire_cache`` (``curate maintain``) removes entries neither made nor used in the last
``expire_days`` days.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan

from operators.base import StrictModel
from pipelines.staging import StagedFile, by_table, data_file, stage_rows
from pipelines.tables import COMMIT_RETRIES, CatalogError, Output, _append_files, _backoff, _unified_schema

log = logging.getLogger("curate.cache")
PREFIX = "_cache_"  # of a cache table's name as staged files and ``_data`` know it
CACHE_NAMESPACE = "curate_cache"
USED_TABLE = "_cache_used"
KEY_COLUMN = "content_sha256"
USED_SCHEMA = pa.schema([("cache_table", pa.string()), (KEY_COLUMN, pa.string())])
#: Table properties naming what a cache table holds.
STAGE_PROPERTY, FINGERPRINT_PROPERTY = "curate.cache.stage", "curate.cache.fingerprint"


class CacheConfig(StrictModel):
    """``cache:`` of a pipeline: which stages reuse their results for texts seen before."""

    enabled: bool = Field(True, description="false: every stage computes every row (no table is read or written).")
    stages: list[str] | None = Field(
        None, description="Stage names to cache; default: every lm stage (the costly ones).")


@dataclass(frozen=True)
class CachedStage:
    """One cached stage of a night: its table, the files read at plan time and their schema."""

    stage: str
    table: str
    fingerprint: str
    columns: tuple[str, ...]  # the stage's columns (``provides``)
    files: tuple[str, ...]
    schema: pa.Schema  # the cache table's columns (key, stage columns, run_id, run_date)


@dataclass(frozen=True)
class CachePlan:
    """The night's cached stages by stage name, and the output their tables live in."""

    stages: dict[str, CachedStage]
    output: Output
    rows: int | None = None  # the night's input rows (Parquet footers), sizes the join

    def partitions(self, batch_size: int) -> int:
        """Join partitions: about ``batch_size`` rows each (64 when the rows are unknown)."""
        if self.rows is None:
            return 64
        return max(1, min(2048, -(-self.rows // batch_size)))


def content_keys(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """sha256 (hex) of each text's UTF-8 bytes; null for a null text."""
    import hashlib

    return pa.array([hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() if t is not None else None
                     for t in texts.to_pylist()], pa.string())


def table_name(stage: str, fingerprint: str) -> str:
    """``_cache_<stage>_<fingerprint[:16]>`` (lower case, [a-z0-9_] only)."""
    return f"{PREFIX}{re.sub(r'[^a-z0-9_]', '_', stage.lower())}_{fingerprint[:16]}"


def identifier(name: str) -> str:
    """The catalog identifier of cache table ``name`` (``_cache_x`` -> ``curate_cache.x``)."""
    return f"{CACHE_NAMESPACE}.{name.removeprefix(PREFIX)}"


def cache_tables(catalog, used: bool = False) -> list[str]:  # noqa: ANN001 - a pyiceberg Catalog
    """Names (``_cache_…``) of the cache tables in the catalog (``_cache_used`` too with ``used``)."""
    try:
        if not catalog.namespace_exists(CACHE_NAMESPACE):
            return []
        idents = catalog.list_tables(CACHE_NAMESPACE)
    except Exception:  # noqa: BLE001 - no namespace yet
        return []
    names = sorted(PREFIX + i[-1] for i in idents)
    return [n for n in names if used or n != USED_TABLE]


def load_table(catalog, name: str):  # noqa: ANN001, ANN201 - pyiceberg Catalog / Table | None
    """Cache table ``name`` (``_cache_…``), None when it does not exist."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return catalog.load_table(identifier(name))
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def _ensure_table(catalog, name: str, schema: pa.Schema):  # noqa: ANN001, ANN202
    """Cache table ``name``, made (partitioned by ``run_date``) when missing; a lost creation race
    loads the winner's."""
    from pyiceberg.exceptions import TableAlreadyExistsError

    for _ in range(COMMIT_RETRIES):
        table = load_table(catalog, name)
        if table is not None:
            return table
        catalog.create_namespace_if_not_exists(CACHE_NAMESPACE)
        try:
            table = catalog.create_table(identifier(name), schema=schema)
        except TableAlreadyExistsError:
            continue
        try:
            with table.update_spec() as update:
                update.add_identity("run_date")
        except Exception:  # noqa: BLE001 - a concurrent creator partitioned it
            table = load_table(catalog, name)
        return table
    raise CatalogError(f"could not create cache table {identifier(name)}")


def cached_stage_names(cfg) -> list[str]:  # noqa: ANN001 - a PipelineConfig
    """The stages ``cfg.cache`` asks to cache (none when disabled; default: the lm stages)."""
    cache = cfg.cache
    if not cache.enabled:
        return []
    if cache.stages is None:
        return [s.stage_name for s in cfg.stages if s.op == "lm"]
    return list(cache.stages)


def plan_cache(cfg, catalog, output: Output, rows: int | None = None) -> CachePlan | None:  # noqa: ANN001
    """The night's cache plan: for each cached stage, its table's current files (driver: metadata
    only). A stage whose fingerprint or table cannot be read runs without the cache (a warning)."""
    names = cached_stage_names(cfg)
    if not names:
        return None
    try:
        return _plan(cfg, catalog, output, rows, names)
    except Exception as err:  # noqa: BLE001 - a broken cache never fails the night
        log.warning("cache: not used tonight: %s: %s", type(err).__name__, err)
        return None


def _plan(cfg, catalog, output: Output, rows: int | None, names: list[str]) -> CachePlan | None:  # noqa: ANN001
    from pipelines.fingerprint import plan_fingerprints

    fingerprints = plan_fingerprints(cfg.stages, set(names))
    stages = {}
    for stage in cfg.stages:
        if stage.stage_name not in names:
            continue
        fingerprint = fingerprints.get(stage.stage_name)
        if fingerprint is None:
            log.warning("cache: stage %s reads a column the text does not decide (an input column) or a "
                        "file that cannot be fingerprinted; it runs without the cache", stage.stage_name)
            continue
        name = table_name(stage.stage_name, fingerprint)
        try:
            files, schema = _current_files(catalog, name)
        except Exception as err:  # noqa: BLE001 - a broken cache never fails the night
            log.warning("cache: table %s cannot be read (%s: %s); stage %s runs without the cache tonight",
                        name, type(err).__name__, str(err).splitlines()[0] if str(err) else "", stage.stage_name)
            continue
        stages[stage.stage_name] = CachedStage(stage.stage_name, name, fingerprint, tuple(stage.provides()),
                                               files, schema)
    return CachePlan(stages, output, rows) if stages else None


def _current_files(catalog, name: str) -> tuple[tuple[str, ...], pa.Schema]:  # noqa: ANN001
    table = load_table(catalog, name)
    if table is None or table.current_snapshot() is None:
        return (), pa.schema([(KEY_COLUMN, pa.string())])
    tasks = list(table.scan().plan_files())
    if any(t.delete_files for t in tasks):
        raise ValueError(f"{name} has delete files; curate writes none")
    return tuple(sorted(t.file.file_path for t in tasks)), table.schema().as_arrow()


# ------------------------------------------------------------------------------------------ commit


def is_cache_file(f: StagedFile) -> bool:
    return f.table.startswith(PREFIX)


def split_files(files: Iterable[StagedFile]) -> tuple[list[StagedFile], list[StagedFile]]:
    """(the night's table files, the cache's files)."""
    files = list(files)
    return [f for f in files if not is_cache_file(f)], [f for f in files if is_cache_file(f)]


def commit_cache(catalog, plan: CachePlan | None, files: list[StagedFile]) -> dict[str, int]:  # noqa: ANN001
    """Append the night's new entries and hit records (append only: no date is replaced); entries
    whose key another run committed since the plan was made are left out. ``{table: rows added}``;
    a table that cannot be committed is skipped with a warning (its files are deleted)."""
    from pipelines.staging import discard

    if plan is None or not files:
        return {}
    base = {s.table: set(s.files) for s in plan.stages.values()}
    added = {}
    for name, mine in by_table(files).items():
        try:
            added[name] = _commit_entries(catalog, plan.output, name, mine, base.get(name))
        except Exception as err:  # noqa: BLE001 - the night is committed already; the cache is extra
            log.warning("cache: could not commit %d new entr(ies) of %s: %s: %s", sum(f.rows for f in mine),
                        name, type(err).__name__, err)
            discard(plan.output, mine)
    return added


def _commit_entries(catalog, output: Output, name: str, files: list[StagedFile],  # noqa: ANN001
                    base: set[str] | None) -> int:
    schema = _unified_schema(files)
    stage, fingerprint = _describe(name)
    for attempt in range(COMMIT_RETRIES):
        table = load_table(catalog, name) or _ensure_table(catalog, name, schema)
        mine = files
        if base is not None and table.current_snapshot() is not None:  # dedupe against newer commits
            newer = sorted({t.file.file_path for t in table.scan().plan_files()} - base)
            if newer:
                mine = _without_keys(output, files, _keys(output, newer))
        if not mine:
            return 0
        try:
            with table.transaction() as txn:
                with txn.update_schema() as update:
                    update.union_by_name(schema)
                if stage and STAGE_PROPERTY not in table.properties:
                    txn.set_properties(**{STAGE_PROPERTY: stage, FINGERPRINT_PROPERTY: fingerprint})
                _append_files(txn, mine)
        except CommitFailedException:
            _backoff(attempt, f"commit of {name}")
            continue
        return sum(f.rows for f in mine)
    return 0


def _describe(name: str) -> tuple[str, str]:
    if name == USED_TABLE:
        return "", ""
    stage, _, fingerprint = name.removeprefix(PREFIX).rpartition("_")
    return stage, fingerprint


def _read(output: Output, url: str, columns: list[str] | None = None) -> pa.Table:
    fs = output.fs
    with fs.open(fs._strip_protocol(url), "rb") as f:
        return pq.read_table(f, columns=columns)


def _keys(output: Output, urls: list[str]) -> set[str]:
    return {k for url in urls for k in _read(output, url, [KEY_COLUMN]).column(KEY_COLUMN).to_pylist()}


def _without_keys(output: Output, files: list[StagedFile], seen: set[str]) -> list[StagedFile]:
    """``files`` rewritten without the rows whose key is in ``seen`` (rare: a concurrent night)."""
    from pipelines.staging import discard

    kept = []
    for f in files:
        rows = _read(output, f.url)
        keep = pc.invert(pc.is_in(rows.column(KEY_COLUMN), pa.array(sorted(seen), pa.string())))
        if pc.all(keep).as_py():
            kept.append(f)
            continue
        rows = rows.filter(keep)
        if rows.num_rows:
            run_date = rows.column("run_date")[0].as_py()
            run_id = f.url.rsplit("/", 2)[-2]
            kept.append(stage_rows(output, f.table, run_date, run_id, f"dedup-{uuid.uuid4().hex[:12]}",
                                   rows.drop_columns(["run_date"])))
        discard(output, [f])
    return kept


# ------------------------------------------------------------------------------------------ upkeep


def cache_stats(catalog) -> list[dict]:  # noqa: ANN001
    """Per cache table: stage, fingerprint, entries, files and bytes of its current snapshot."""
    out = []
    for name in cache_tables(catalog):
        try:
            table = load_table(catalog, name)
        except Exception as err:  # noqa: BLE001 - shown as unreadable, the rest still listed
            out.append({"table": name, "stage": _describe(name)[0], "fingerprint": _describe(name)[1],
                        "entries": 0, "files": 0, "bytes": 0, "error": f"{type(err).__name__}: cannot be read"})
            continue
        snapshot = table.current_snapshot() if table is not None else None
        summary = dict(snapshot.summary.additional_properties) if snapshot is not None else {}

        def get(key: str, summary: dict = summary) -> int:
            return int(summary.get(key) or 0)
        stage, fingerprint = _describe(name)
        props = table.properties if table is not None else {}
        out.append({"table": name, "stage": props.get(STAGE_PROPERTY, stage),
                    "fingerprint": props.get(FINGERPRINT_PROPERTY, fingerprint),
                    "entries": get("total-records"), "files": get("total-data-files"),
                    "bytes": get("total-files-size")})
    return out


@dataclass
class ExpireReport:
    """Entries ``expire_cache`` removed (or would remove), per cache table."""

    cutoff: str
    removed: dict[str, int]
    kept: dict[str, int]

    def summary(self, dry_run: bool = False) -> str:
        verb = "would remove" if dry_run else "removed"
        total = sum(self.removed.values())
        return (f"cache: {verb} {total} entr(ies) neither made nor used since {self.cutoff} "
                f"({', '.join(f'{t}: {n}' for t, n in self.removed.items() if n) or 'none'}); "
                f"kept {sum(self.kept.values())}")


def expire_cache(catalog, output: Output, days: float, now: datetime | None = None,  # noqa: ANN001
                 dry_run: bool = False) -> ExpireReport:
    """Remove cache entries neither made nor used (a hit in a committed night) on or after
    ``now - days`` (by run date), and the hit records older than that.

    An entry made on date c and last used on date u is kept while max(c, u) >= cutoff. Files of
    old dates are rewritten without the expired rows (one overwrite commit per table); the replaced
    files go when their snapshot expires (``curate maintain``'s retention and grace period)."""
    now = now or datetime.now(UTC)
    cutoff = (now - timedelta(days=days)).date().isoformat()
    report = ExpireReport(cutoff, {}, {})
    used_table = load_table(catalog, USED_TABLE)
    for name in cache_tables(catalog):
        try:
            table = load_table(catalog, name)
        except Exception as err:  # noqa: BLE001 - a broken cache table is left as it is
            log.warning("cache: %s cannot be read (%s); not expired", name, type(err).__name__)
            continue
        if table is None or table.current_snapshot() is None:
            continue
        recent: set[str] = set()
        if used_table is not None and used_table.current_snapshot() is not None:
            scan = used_table.scan(row_filter=And(EqualTo("cache_table", name), GreaterThanOrEqual("run_date", cutoff)),
                                   selected_fields=(KEY_COLUMN,))
            recent = set(scan.to_arrow().column(KEY_COLUMN).to_pylist())
        removed, kept = _expire_table(table, output, cutoff, recent, dry_run)
        report.removed[name], report.kept[name] = removed, kept
    if used_table is not None and used_table.current_snapshot() is not None and not dry_run:
        for attempt in range(COMMIT_RETRIES):
            try:
                used_table.refresh().delete(LessThan("run_date", cutoff))
                break
            except CommitFailedException:
                _backoff(attempt, f"expiring {USED_TABLE}")
    return report


def _expire_table(table, output: Output, cutoff: str, recent: set[str], dry_run: bool) -> tuple[int, int]:  # noqa: ANN001
    for attempt in range(COMMIT_RETRIES):
        table = table.refresh()
        removed = kept = 0
        replace: list[tuple[object, StagedFile | None]] = []
        for task in table.scan().plan_files():
            date = task.file.partition[0] if len(task.file.partition) else None
            if date is not None and date >= cutoff:
                kept += task.file.record_count
                continue
            rows = _read(output, task.file.file_path)
            live = pc.is_in(rows.column(KEY_COLUMN), pa.array(sorted(recent), pa.string()))
            if date is None:  # a file without a date partition: judge by its rows' dates
                live = pc.or_(live, pc.greater_equal(rows.column("run_date"), cutoff))
            n_live = pc.sum(live.cast(pa.int64())).as_py() or 0
            kept += n_live
            if n_live == rows.num_rows:
                continue
            removed += rows.num_rows - n_live
            if dry_run:
                continue
            rows = rows.filter(live)
            new = None
            if rows.num_rows:
                run_date = rows.column("run_date")[0].as_py()
                new = stage_rows(output, PREFIX + table.name()[-1], run_date, f"expire-{uuid.uuid4().hex[:8]}",
                                 "part-0", rows.drop_columns(["run_date"]))
            replace.append((task.file, new))
        if not replace:
            return removed, kept
        try:
            with table.transaction() as txn, txn.update_snapshot().overwrite() as overwrite:
                for old, new in replace:
                    overwrite.delete_data_file(old)
                    if new is not None:
                        overwrite.append_data_file(data_file(txn.table_metadata, new))
            return removed, kept
        except CommitFailedException:
            _backoff(attempt, f"expiring entries of {PREFIX + table.name()[-1]}")
    return 0, 0
