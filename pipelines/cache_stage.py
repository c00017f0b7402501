"""The cache's Ray side: join the night's rows with the cache tables, run only the new texts, stage
the new entries.

    read ──> content key ──> ⋈ cache of stage A ──> ⋈ cache of stage B ──> materialize
         ──> … ──> CachedStageRunner(A) ──> … ──> CachedStageRunner(B) ──> … ──> writer

The joins are Ray Data hash joins (left outer, on the sha256 of the text) over the cache table's
files: the driver only lists them. They run before the stages' actor pools start (the plan is
materialized after them: a shuffle's map tasks need whole CPUs the pools would hold). Each join
partition holds every row of its keys, and a ``CachedStageRunner`` gets one partition at a time,
so a text that occurs twice in the night is computed once.

Columns the cache adds during a run all start with ``__cache_`` and are dropped by the writer
(``split_cache_rows``), which stages the new entries and the hit records as the cache's files.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import ray

from operators.base import StageConfig
from pipelines.cache import KEY_COLUMN, USED_SCHEMA, USED_TABLE, CachedStage, CachePlan, content_keys
from pipelines.progress import ProgressBoard
from pipelines.stage_runner import StageRunner, _nulls
from pipelines.staging import StagedFile, stage_rows
from pipelines.tables import Output, RunLayout

log = logging.getLogger("curate.cache")
TEMP = "__cache_"
KEY, ROW = f"{TEMP}key", f"{TEMP}row"
#: Per cached stage (suffix: its table): whether the right side matched, by which run, the state.
HIT, RUN, STATE, COL = f"{TEMP}hit__", f"{TEMP}run__", f"{TEMP}state__", f"{TEMP}col__"
#: ``STATE`` values: the row did not reach the stage / was served from the cache / was computed and
#: is a new entry / was computed as a copy of another row with the same text, or failed.
NOT_RUN, FROM_CACHE, NEW_ENTRY, MISS = 0, 1, 2, 3
JOIN_REDUCE_CPUS = 0.25


def add_keys(batch: pa.Table) -> pa.Table:
    """The content key (sha256 of ``text``) and a unique row id (to undo a key's double match)."""
    base = uuid.uuid4().hex
    return batch.append_column(KEY, content_keys(batch.column("text"))).append_column(
        ROW, pa.array([f"{base}-{i}" for i in range(batch.num_rows)], pa.string()))


def payload_fields(entry: CachedStage) -> list[pa.Field]:
    """The stage columns ``entry``'s cache table holds (32-bit offsets)."""
    return [pa.field(f.name, _small(f.type)) for f in entry.schema
            if f.name not in (KEY_COLUMN, "run_id", "run_date")]


def col_name(entry: CachedStage, column: str) -> str:
    """The joined column holding ``entry``'s cached ``column``."""
    return f"{COL}{entry.table}__{column}"


def right_schema(entry: CachedStage) -> pa.Schema:
    """The joined columns of ``entry``'s cache: key, hit flag, run id, and every stage column."""
    return pa.schema([pa.field(KEY, pa.string()), pa.field(HIT + entry.table, pa.bool_()),
                      pa.field(RUN + entry.table, pa.string()),
                      *[pa.field(col_name(entry, f.name), f.type) for f in payload_fields(entry)]])


def _small(t: pa.DataType) -> pa.DataType:
    """``t`` with 32-bit offsets (Iceberg's Arrow schema uses large strings and lists)."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_small(t.value_type))
    return t


def _read_cache_files(batch: pa.Table, entry: CachedStage, output: Output) -> pa.Table:
    """The cache rows of the batch's files, as joined columns; a file that cannot be read is left
    out with a warning (its texts are computed again)."""
    from pipelines.cache import _read

    schema = right_schema(entry)
    parts = []
    for url in batch.column("url").to_pylist():
        try:
            rows = _read(output, url)
            parts.append(pa.table([rows.column(KEY_COLUMN).cast(pa.string()),
                                   pa.array([True] * rows.num_rows, pa.bool_()),
                                   rows.column("run_id").cast(pa.string()),
                                   *[rows.column(f.name).cast(f.type) for f in payload_fields(entry)]],
                                  schema=schema))
        except Exception as err:  # noqa: BLE001 - an unreadable cache file never fails the night
            log.warning("cache: %s cannot be read (%s: %s); its texts are computed again",
                        url, type(err).__name__, err)
    return pa.concat_tables(parts) if parts else schema.empty_table()


def cache_dataset(entry: CachedStage, output: Output) -> ray.data.Dataset:
    """The cache table's rows as a Ray dataset, read by tasks (one per file)."""
    if not entry.files:
        return ray.data.from_arrow(right_schema(entry).empty_table())
    return ray.data.from_items([{"url": u} for u in entry.files], override_num_blocks=len(entry.files)) \
        .map_batches(_read_cache_files, fn_kwargs={"entry": entry, "output": output},
                     batch_size=1, batch_format="pyarrow")


def join_cache(ds: ray.data.Dataset, plan: CachePlan, stages: list[StageConfig],
               read_tasks: int | None = None) -> ray.data.Dataset:
    """``ds`` with the content key and, per cached stage with entries, its cache's columns (left
    outer hash joins); materialized, so the joins run before any stage's actor pool holds CPUs. With
    no entries at all (a first night) nothing is joined or materialized: the rows stream on, every
    one a miss (a hash join of an empty table cost ~10 s before any stage could start).
    ``read_tasks``: the read's task concurrency, which the key map must share to be fused with it."""
    from pipelines.resources import READ_CPUS  # the driver's; the workers never import the config

    ds = ds.map_batches(add_keys, batch_format="pyarrow", num_cpus=READ_CPUS,  # fused with the read
                        concurrency=read_tasks)
    joined = {name: entry for name, entry in plan.stages.items() if entry.files}
    if not joined:
        return ds
    sizes = {s.stage_name: s.resources.batch_size for s in stages}
    for name, entry in joined.items():
        ds = ds.join(cache_dataset(entry, plan.output), "left_outer", plan.partitions(sizes[name]),
                     on=(KEY,), aggregator_ray_remote_args={"num_cpus": JOIN_REDUCE_CPUS})
    return ds.materialize()


def one_match_each(batch: pa.Table, entry: CachedStage) -> pa.Table:
    """Rows matched by several entries of one key (two nights added it at once): keep the match
    of the earliest run (``run_id`` order), so every row appears once."""
    rows = batch.column(ROW).to_pylist()
    if len(set(rows)) == len(rows):
        return batch
    runs = batch.column(RUN + entry.table).to_pylist()
    best: dict[str, int] = {}
    for i, (row, run) in enumerate(zip(rows, runs, strict=True)):
        j = best.get(row)
        if j is None or (run or "") < (runs[j] or ""):
            best[row] = i
    return batch.take(sorted(best.values()))


class CachedStageRunner(StageRunner):
    """``StageRunner`` for a cached stage: rows found in the cache carry its columns; of the rest,
    one row per distinct text runs (in chunks of the stage's batch size) and its copies share the
    result. Gets one join partition per call (``batch_size=None``) when its cache has entries,
    else the stage's batches (a text repeated in another batch is then computed there too)."""

    def __init__(self, stage: StageConfig, entry: CachedStage, progress: ProgressBoard | None = None) -> None:
        super().__init__(stage, progress)
        self.entry, self.chunk = entry, stage.resources.batch_size
        self.usable = {f.name for f in self.schema} == set(stage.provides())
        if not self.usable:
            log.warning("cache: stage %s makes columns its config does not list (a custom head?): it runs "
                        "without the cache", self.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        began, start = time.time(), time.perf_counter()
        entry = self.entry
        batch = one_match_each(batch, entry)
        n = batch.num_rows
        live = pc.is_null(batch.column("quarantine_reason")).to_pylist()
        hit_col = batch.column(HIT + entry.table) if HIT + entry.table in batch.column_names else None
        hit = [bool(h) and ok and self.usable for h, ok in
               zip(hit_col.to_pylist() if hit_col is not None else [None] * n, live, strict=True)]
        keys = batch.column(KEY).to_pylist()
        state = [NOT_RUN] * n
        todo, first = [], {}  # rows to compute; key -> index in todo
        source = {}  # row -> ("hit", i) / ("new", i)
        hits = []
        for r in range(n):
            if not live[r]:
                continue
            if hit[r]:
                source[r] = ("hit", len(hits))
                hits.append(r)
                state[r] = FROM_CACHE
                continue
            k = keys[r]
            if k is None or k not in first:
                first[k if k is not None else f"\0{r}"] = len(todo)
                source[r] = ("new", len(todo))
                todo.append(r)
                state[r] = NEW_ENTRY if k is not None and self.usable else MISS
            else:
                source[r] = ("new", first[k])
                state[r] = MISS
        computed, failures = self._compute(batch, todo)
        cached = self._cached(batch, hits)
        live_rows = [r for r in range(n) if live[r]]
        offset = cached.num_rows
        index = pa.array([source[r][1] + (offset if source[r][0] == "new" else 0) for r in live_rows], pa.int64())
        columns = pa.concat_tables([cached, computed]).take(index) if live_rows else None
        batch = self._attach(batch, live_rows, columns)
        reasons = {}
        for r in live_rows:
            kind, i = source[r]
            if kind == "new" and i in failures:
                reasons[r] = failures[i]
                state[r] = MISS
        batch = self._quarantine(batch, reasons)
        batch = batch.drop_columns([c for c in batch.column_names
                                    if c.startswith((f"{COL}{entry.table}__", RUN + entry.table, HIT + entry.table))])
        batch = batch.append_column(STATE + entry.table, pa.array(state, pa.int8()))
        return self._done(batch, began, start)

    def _compute(self, batch: pa.Table, todo: list[int]) -> tuple[pa.Table, dict[int, str]]:
        """The stage's columns for rows ``todo`` (in chunks); failures by index into ``todo``."""
        parts, failures = [], {}
        for lo in range(0, len(todo), self.chunk):
            rows = batch.take(todo[lo:lo + self.chunk])
            out, failed = self._run(rows)
            parts.append(out)
            failures |= {lo + i: why for i, why in failed.items()}
        return (pa.concat_tables(parts) if parts else _nulls(self.schema, 0)), failures

    def _cached(self, batch: pa.Table, hits: list[int]) -> pa.Table:
        """The cached columns of rows ``hits``, in the stage's exact types (stored values, no recompute)."""
        if not hits:
            return _nulls(self.schema, 0)
        rows = batch.take(hits)
        return pa.table([rows.column(col_name(self.entry, f.name)).cast(f.type) for f in self.schema],
                        schema=self.schema)


def split_cache_rows(batch: pa.Table, layout: RunLayout, plan: CachePlan | None,
                     name: str) -> tuple[pa.Table, list[StagedFile], dict[str, dict[str, int]]]:
    """(``batch`` without the cache's columns, the cache files staged from it, per stage hits and
    misses). New entries (state NEW_ENTRY) become a file of their cache table; hits, one file of
    ``_cache_used``."""
    if plan is None:
        return batch, [], {}
    files, counts, used = [], {}, []
    for stage, entry in plan.stages.items():
        col = STATE + entry.table
        if col not in batch.column_names:
            continue
        state = batch.column(col)
        counts[stage] = {"hits": _count(state, FROM_CACHE),
                         "misses": _count(state, NEW_ENTRY) + _count(state, MISS),
                         "computed": _count(state, NEW_ENTRY)}
        new = batch.filter(pc.equal(state, NEW_ENTRY))
        if new.num_rows:
            columns = [c for c in entry.columns if c in new.column_names]
            rows = pa.table([new.column(KEY), *[new.column(c) for c in columns],
                             pa.array([layout.run_id] * new.num_rows, pa.string())],
                            names=[KEY_COLUMN, *columns, "run_id"])
            files.append(stage_rows(layout.output, entry.table, layout.run_date, layout.run_id, name, rows))
        hit_keys = pc.unique(batch.filter(pc.equal(state, FROM_CACHE)).column(KEY))
        if len(hit_keys):
            used.append(pa.table([pa.array([entry.table] * len(hit_keys), pa.string()), hit_keys.cast(pa.string())],
                                 schema=USED_SCHEMA))
    if used:
        files.append(stage_rows(layout.output, USED_TABLE, layout.run_date, layout.run_id, name,
                                pa.concat_tables(used)))
    batch = batch.drop_columns([c for c in batch.column_names if c.startswith(TEMP)])
    return batch, files, counts


def _count(state: pa.ChunkedArray, value: int) -> int:
    return pc.sum(pc.equal(state, value).cast(pa.int64())).as_py() or 0


def fold_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per stage hits/misses/computed summed over the writers' stats rows (``cache_by``)."""
    total: dict[str, dict[str, int]] = {}
    for r in rows:
        for stage, counts in json.loads(r.get("cache_by") or "{}").items():
            into = total.setdefault(stage, {})
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    return total
