"""The output tables: Apache Iceberg tables in a catalog, one transaction per table per night.

Layout under the output URL (the default, embedded catalog)::

    _catalog/catalog.db                         SQLite catalog (``output.catalog`` names another)
    curate.db/<table>/metadata/...              Iceberg metadata of each table
    _data/<table>/run_date=D/<run_id>/*.parquet data files, written by the workers of a run
    curate_locks/nights/metadata/...            the run lock of each date (``pipelines.lock``)

A run's workers write its rows as Parquet files under ``_data`` (invisible: no snapshot references
them) and report each file to the driver (``pipelines.staging.StagedFile``). Finalize reads the
reported files. The commit then, for every table (also ones this run did not produce), runs one
Iceberg transaction that deletes the date and adds exactly the reported files (never a directory
listing: object store listings are cached and eventually consistent); the ``runs`` row,
appended last, records each table's snapshot id and is the commit point. Readers take, for each
date, the snapshots recorded by its latest committed run (``committed_views``), so a reader never
sees a half-committed night, even after a driver died between two tables' commits.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
from pyarrow.fs import FSSpecHandler, PyFileSystem
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.expressions import And, EqualTo, In
from pyiceberg.table import Table

from pipelines.io import InputError, url_to_fs
from pipelines.staging import StagedFile, by_table, data_file
from pipelines.storage import StorageConfig, apply_storage

log = logging.getLogger("curate.tables")
NAMESPACE = "curate"
RUNS = "runs"
DATA_DIR = "_data"
CATALOG_DIR = "_catalog"
COMMIT_RETRIES = 8
#: Test hook: ``CURATE_COMMIT_HOOK=point:action`` (action ``kill`` or ``sleep=SECONDS``) at named
#: points of the commit (``before:<table>``, ``after:<table>``, ``before:runs``).
HOOK_ENV = "CURATE_COMMIT_HOOK"

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("pipeline", pa.string()),
    ("config_hash", pa.string()), ("code_version", pa.string()), ("status", pa.string()),
    ("started_at", pa.string()), ("committed_at", pa.string()), ("seconds", pa.float64()),
    ("rows_in", pa.int64()), ("rows_out", pa.int64()), ("rows_quarantined", pa.int64()),
    ("stages", pa.string()), ("tables", pa.string()), ("snapshots", pa.string()),
    ("error", pa.string()), ("run_date", pa.string()),
])


class CatalogError(RuntimeError):
    """The output's catalog or location cannot be used (preflight)."""


class NothingCommitted(CatalogError):
    """The catalog is reachable (or, embedded, not made yet) but holds no curate tables."""


def _local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


@dataclass(frozen=True)
class Output:
    """An output location, its catalog (``catalog_props``: pyiceberg properties; empty = embedded)
    and the object store settings both use (``storage``)."""

    url: str
    catalog_props: tuple[tuple[str, str], ...] = ()
    storage: StorageConfig | None = None

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        apply_storage(self.storage)  # also in a Ray worker that unpickled this Output
        return url_to_fs(self.url)[0]

    @property
    def is_local(self) -> bool:
        return _local(self.fs)

    @property
    def catalog_description(self) -> str:
        props = dict(self.catalog_props)
        if not props:
            return f"the embedded catalog of {self.url}"
        where = props.get("uri") or props.get("name") or props.get("type", "?")
        return f"catalog {_redact(str(where))}"

    @property
    def root(self) -> str:
        fs, root = url_to_fs(self.url)
        root = root.rstrip("/")
        return os.path.abspath(root) if _local(fs) else root

    def url_of(self, path: str) -> str:
        """``path`` (inside ``fs``) as a URL that fsspec, pyiceberg and Ray workers can open."""
        return path if _local(self.fs) else self.fs.unstrip_protocol(path)

    def catalog(self, create: bool = False) -> Catalog:
        """The catalog (the embedded SQLite one is made on ``create``); ``CatalogError`` when it
        cannot be opened (never an empty stand-in)."""
        props = dict(self.catalog_props)
        if not props:
            if not self.is_local:
                raise CatalogError(f"{self.url} is not local: give its shared catalog (a pipeline's "
                                   "output.catalog, --pipeline FILE or --catalog KEY=VALUE); the embedded "
                                   "SQLite one needs a local path")
            db = f"{self.root}/{CATALOG_DIR}/catalog.db"
            if not os.path.exists(db) and not create:
                raise NothingCommitted(f"no catalog under {self.url} (nothing committed yet)")
            os.makedirs(os.path.dirname(db), exist_ok=True)
            props = {"type": "sql", "uri": f"sqlite:///{db}", "warehouse": f"file://{self.root}"}
        props.setdefault("warehouse", self.url_of(self.root))
        for key, value in (self.storage.iceberg_properties() if self.storage else {}).items():
            props.setdefault(key, value)
        try:
            catalog = load_catalog(props.pop("name", "curate"), **props)
            if create:
                catalog.create_namespace_if_not_exists(NAMESPACE)
            elif not _has_namespace(catalog):
                raise NothingCommitted(f"nothing is committed in {self.catalog_description} "
                                       f"(no namespace {NAMESPACE!r})")
        except CatalogError:
            raise
        except Exception as err:  # noqa: BLE001 - any driver/connection failure is one user-facing error
            raise CatalogError(f"{self.catalog_description} cannot be opened: "
                               f"{type(err).__name__}: {_redact(str(err)).splitlines()[0]}; see "
                               f"`curate check --output {self.url}` and `curate recover`") from None
        return catalog

    def data_dir(self, table: str, run_date: str, run_id: str) -> str:
        return f"{self.root}/{DATA_DIR}/{table}/run_date={run_date}/{run_id}"


@dataclass(frozen=True)
class RunLayout:
    """Where one run of one date stages its rows (data files under the output, not yet committed)."""

    output: Output
    run_date: str
    run_id: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.output.fs

    @property
    def root(self) -> str:
        return self.output.root

    def staging_dir(self, table: str) -> str:
        return self.output.data_dir(table, self.run_date, self.run_id)

    def url(self, path: str) -> str:
        return self.output.url_of(path)


def output_of_config(cfg) -> Output:  # noqa: ANN001 - a PipelineConfig (pipelines.config imports us)
    """The output a pipeline config names: url, catalog and storage."""
    return open_output(cfg.output.url, cfg.output.catalog, cfg.output.storage)


def _redact(text: str) -> str:
    """``text`` without the password of any ``scheme://user:password@host`` in it."""
    import re

    return re.sub(r"(://[^:/@\s]+):[^@\s]+@", r"\1:***@", text)


def _has_namespace(catalog: Catalog) -> bool:
    return any(tuple(ns) == (NAMESPACE,) for ns in catalog.list_namespaces())


def open_output(url: str, catalog: dict | None = None, storage: StorageConfig | dict | None = None) -> Output:
    """An ``Output`` for ``url`` with catalog properties ``catalog`` (None/empty: embedded SQLite) and
    object store settings ``storage`` (None: the environment's)."""
    if isinstance(storage, dict):
        storage = StorageConfig.model_validate(storage)
    return Output(url, tuple(sorted((k, str(v)) for k, v in (catalog or {}).items())), storage)


def table_names(catalog: Catalog) -> list[str]:
    """Every data table of the namespace (``runs`` included; curate's own ``_``-tables left out)."""
    if not _has_namespace(catalog):
        return []
    return sorted(ident[-1] for ident in catalog.list_tables(NAMESPACE) if not ident[-1].startswith("_"))


def load_table(catalog: Catalog, name: str) -> Table | None:
    try:
        return catalog.load_table(f"{NAMESPACE}.{name}")
    except NoSuchTableError:
        return None


def preflight(output: Output) -> Catalog:
    """Check the output location and catalog are writable before any compute; the catalog."""
    from pipelines.storage import StorageError, check_endpoint

    try:
        check_endpoint(output.storage, output.url)
    except StorageError as err:
        raise CatalogError(str(err)) from None
    try:
        fs, root = output.fs, output.root
        if fs.exists(root) and not fs.isdir(root):
            raise CatalogError(f"output {output.url} is a file, not a directory")
        probe = f"{root}/{DATA_DIR}/.preflight-{os.getpid()}"
        fs.makedirs(f"{root}/{DATA_DIR}", exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except CatalogError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, botocore's errors...: one user-facing line
        raise CatalogError(f"output {output.url} is not writable: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    try:
        catalog = output.catalog(create=True)
        runs_table(catalog)
    except CatalogError:
        raise
    except Exception as err:  # noqa: BLE001 - any catalog failure is the same user-facing problem
        raise CatalogError(f"catalog of {output.url} is not usable: {type(err).__name__}: {err}") from None
    return catalog


def runs_table(catalog: Catalog) -> Table:
    """The ``runs`` table (made on first use)."""
    return _ensure_table(catalog, RUNS, RUNS_SCHEMA)


def _ensure_table(catalog: Catalog, name: str, schema: pa.Schema) -> Table:
    """``name``, partitioned by ``run_date``; made when missing. Loaded first, so an existing table
    costs no metadata file; two first-ever runs may race: the loser loads the winner's table, and
    the partition spec is added under the same conflict retries as a commit."""
    ident = f"{NAMESPACE}.{name}"
    for attempt in range(COMMIT_RETRIES):
        table = load_table(catalog, name)
        if table is None:
            try:
                table = catalog.create_table(ident, schema=schema)
            except TableAlreadyExistsError:
                continue
        if not table.spec().is_unpartitioned():
            return table
        try:
            with table.update_spec() as spec:
                spec.add_identity("run_date")
            return table
        except CommitFailedException:
            _backoff(attempt, f"partitioning {name}")
    raise CatalogError(f"could not create table {ident}: other runs kept changing it")


def _backoff(attempt: int, what: str) -> None:
    """Sleep before retry ``attempt`` + 1 (exponential, jittered); raise after the last."""
    if attempt >= COMMIT_RETRIES - 1:
        raise CatalogError(f"{what}: still conflicting with other commits after {COMMIT_RETRIES} tries")
    delay = min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random())
    log.warning("%s conflicted with another commit; retrying in %.2fs", what, delay)
    time.sleep(delay)


def _hook(point: str) -> None:
    spec = os.environ.get(HOOK_ENV, "")
    where, _, action = spec.rpartition(":")
    if where != point:
        return
    if action == "kill":
        os.kill(os.getpid(), 9)
    elif action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))


def commit_night(catalog: Catalog, run_date: str, files: list[StagedFile]) -> dict[str, tuple[int | None, int]]:
    """Replace ``run_date`` in every table with exactly ``files`` (what the workers reported);
    ``{table: (snapshot id, rows)}``.

    One transaction per table (delete the date, add the files); a conflicting concurrent commit
    (another date) is retried on the fresh table state, with backoff. Tables this run did not
    produce get the date deleted, so a rerun leaves nothing of an earlier run of that date behind.
    """
    staged = by_table(files)
    names = sorted((set(table_names(catalog)) | set(staged)) - {RUNS})
    done = {}
    for name in names:
        _hook(f"before:{name}")
        mine = staged.get(name, [])
        snapshot = _commit_table(catalog, name, run_date, mine)
        done[name] = (snapshot, sum(f.rows for f in mine))
        _hook(f"after:{name}")
    return done


def _unified_schema(files: list[StagedFile]) -> pa.Schema | None:
    schemas = [f.arrow_schema() for f in files]
    return pa.unify_schemas(schemas, promote_options="permissive") if schemas else None


def _commit_table(catalog: Catalog, name: str, run_date: str, files: list[StagedFile]) -> int | None:
    schema = _unified_schema(files)
    for attempt in range(COMMIT_RETRIES):
        table = load_table(catalog, name)
        if table is None:
            if schema is None:
                return None
            table = _ensure_table(catalog, name, schema)
        try:
            with table.transaction() as txn:
                if schema is not None:
                    with txn.update_schema() as update:
                        update.union_by_name(schema)
                if table.current_snapshot() is not None:
                    with warnings.catch_warnings():  # a new date: nothing to delete, nothing to say
                        warnings.filterwarnings("ignore", "Delete operation did not match any records")
                        txn.delete(EqualTo("run_date", run_date))
                if files:
                    _append_files(txn, files)
        except CommitFailedException:
            _backoff(attempt, f"commit of {name}")
            continue
        except CommitStateUnknownException:
            # The catalog may or may not have applied it: look before trying again.
            if _has_files(load_table(catalog, name), run_date, files):
                return load_table(catalog, name).current_snapshot().snapshot_id
            _backoff(attempt, f"commit of {name} (state unknown)")
            continue
        snapshot = table.current_snapshot()
        return snapshot.snapshot_id if snapshot else None
    return None


def _append_files(txn, files: list[StagedFile]) -> None:  # noqa: ANN001 - pyiceberg Transaction
    """Add ``files`` to the transaction's table, from their reported footers (no file is opened)."""
    from pyiceberg.table import TableProperties

    if txn.table_metadata.name_mapping() is None:  # our Parquet files carry no field ids
        txn.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                              txn.table_metadata.schema().name_mapping.model_dump_json()})
    with txn.update_snapshot().fast_append() as append:
        for f in files:
            append.append_data_file(data_file(txn.table_metadata, f))


def _has_files(table: Table | None, run_date: str, files: list[StagedFile]) -> bool:
    if table is None or table.current_snapshot() is None:
        return False
    listed = {t.file.file_path for t in table.scan(row_filter=EqualTo("run_date", run_date)).plan_files()}
    return {f.url for f in files} <= listed if files else False


def append_run_row(catalog: Catalog, row: dict) -> None:
    """Append one row to ``runs`` (never replaced); retried, with backoff, when another run commits
    at once."""
    _hook("before:runs")
    data = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    for attempt in range(COMMIT_RETRIES):
        try:
            runs_table(catalog).append(data)
            return
        except CommitFailedException:
            _backoff(attempt, "appending the runs row")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ------------------------------------------------------------------------------------------ read


@dataclass(frozen=True)
class TableView:
    """A table as the committed runs see it: data files (full URLs) and rows per date."""

    name: str
    files_by_date: dict[str, list[str]]
    rows_by_date: dict[str, int]
    run_by_date: dict[str, str]


def committed_runs(catalog: Catalog, as_of: str | None = None) -> dict[str, dict]:
    """Per date, the latest committed ``runs`` row (``as_of``: committed no later than that run)."""
    runs = load_table(catalog, RUNS)
    if runs is None or runs.current_snapshot() is None:
        return {}
    rows = runs.scan(row_filter=EqualTo("status", "committed")).to_arrow().to_pylist()
    if as_of is not None:
        mine = [r for r in rows if r["run_id"] == as_of]
        if not mine:
            raise CatalogError(f"no committed run {as_of!r} (see: curate query \"SELECT run_id, run_date, "
                               "status FROM runs\")")
        rows = [r for r in rows if r["committed_at"] <= mine[0]["committed_at"]]
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["committed_at"]):
        latest[r["run_date"]] = r
    return latest


def committed_views(catalog: Catalog, date: str | None = None, as_of: str | None = None) -> dict[str, TableView]:
    """Every table's committed data files: per date, those of the snapshot its latest run recorded."""
    latest = committed_runs(catalog, as_of)
    if date is not None:
        latest = {d: r for d, r in latest.items() if d == date}
    by_table: dict[str, dict[int, list[str]]] = {}
    for run_date, row in latest.items():
        for name, snapshot in json.loads(row["snapshots"] or "{}").items():
            if snapshot is not None:
                by_table.setdefault(name, {}).setdefault(snapshot, []).append(run_date)
    views = {}
    for name, snapshots in sorted(by_table.items()):
        table = load_table(catalog, name)
        if table is None:
            continue
        files: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        for snapshot, dates in snapshots.items():
            if table.snapshot_by_id(snapshot) is None:
                raise CatalogError(f"{name}: snapshot {snapshot} of {', '.join(sorted(dates))} was expired "
                                   "(curate maintain keeps only the runs within its retention)")
            for task in table.scan(row_filter=In("run_date", dates), snapshot_id=snapshot).plan_files():
                if task.delete_files:
                    raise CatalogError(f"{name}: snapshot {snapshot} has delete files; curate writes none")
                d = task.file.partition[0]
                files.setdefault(d, []).append(task.file.file_path)
                rows[d] = rows.get(d, 0) + task.file.record_count
        if files:
            views[name] = TableView(name, dict(sorted(files.items())), rows,
                                    {d: latest[d]["run_id"] for d in files})
    return views


def committed_dates(catalog: Catalog, pipeline: str) -> set[str]:
    """Dates with a ``committed`` runs row of ``pipeline`` (only two columns are read)."""
    runs = load_table(catalog, RUNS)
    if runs is None or runs.current_snapshot() is None:
        return set()
    scan = runs.scan(row_filter=And(EqualTo("status", "committed"), EqualTo("pipeline", pipeline)),
                     selected_fields=("run_date",))
    return set(scan.to_arrow().column("run_date").to_pylist())


def runs_files(catalog: Catalog, date: str | None = None) -> list[str]:
    """The data files of ``runs`` (every run, failed ones too), only ``date``'s when given."""
    runs = load_table(catalog, RUNS)
    if runs is None or runs.current_snapshot() is None:
        return []
    scan = runs.scan(row_filter=EqualTo("run_date", date)) if date else runs.scan()
    return [t.file.file_path for t in scan.plan_files()]


def open_dataset(url: str, catalog: dict | None = None, storage: dict | None = None) -> pads.Dataset:
    """A Parquet file or directory (hive partitions allowed), or an output table named as
    ``<output>/<table>[/run_date=D]`` (its committed files, found through ``catalog``: pyiceberg
    properties, default the embedded one), not read yet. ``storage``: object store settings."""
    apply_storage(StorageConfig.model_validate(storage) if storage else None)
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        files = committed_table_files(url, catalog, storage)
        if files is None:
            raise InputError(f"input not found: {url}")
        return pads.dataset([f.removeprefix("file://") for f in files], format="parquet",
                            filesystem=PyFileSystem(FSSpecHandler(fs)))
    return pads.dataset(path, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet",
                        partitioning="hive")


def committed_table_files(url: str, catalog: dict | None = None,
                          storage: dict | None = None) -> list[str] | None:
    """The committed data files of ``<output>/<table>[/run_date=D]``; None when that names no table
    (a catalog given but unreadable is an error)."""
    parts = url.rstrip("/").rsplit("/", 2)
    date = parts[-1].removeprefix("run_date=") if parts[-1].startswith("run_date=") else None
    output, table = (parts[0], parts[1]) if date else ("/".join(parts[:-1]), parts[-1])
    try:
        view = committed_views(open_output(output, catalog, storage).catalog(), date).get(table)
    except NothingCommitted:
        return None
    except CatalogError:
        if catalog:
            raise
        return None
    return [f for files in view.files_by_date.values() for f in files] if view else None


def read_table(url: str, columns: list[str] | None = None, catalog: dict | None = None,
               storage: dict | None = None) -> pa.Table:
    """A Parquet file or directory as one table (only ``columns`` when given); see ``open_dataset``."""
    dataset = open_dataset(url, catalog, storage)
    if columns:
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise InputError(f"{url}: columns not found: {missing}; have {dataset.schema.names}")
    return dataset.to_table(columns=columns)
