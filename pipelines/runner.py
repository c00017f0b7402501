"""Turn a pipeline definition into a Ray Data plan, run it, and commit its tables.

    lock + preflight ──> shards ──read (tasks)──> stage 1 (actor pool) ──> … ──> staged writer (tasks)
        ──> finalize ──> commit (one Iceberg transaction per table) ──> runs row (the commit point)

The driver only lists shard URLs and collects one small stats row per written batch, which names
the files the batch was written to (``pipelines.staging.StagedFile``); documents stream through
Ray's object store and are written by the workers. The commit adds exactly the reported files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from operators.base import RunFailed, StageConfig
from pipelines.budget import check_budget
from pipelines.cache import CachePlan, commit_cache, plan_cache, split_files
from pipelines.cache_stage import CachedStageRunner, fold_counts, join_cache
from pipelines.config import ConfigError, PipelineConfig, check_plan
from pipelines.finalize import FinalizeContext, scan_staged
from pipelines.guards import check_shrink
from pipelines.io import check_schemas, is_process_local, list_shards, read_shard, url_to_fs
from pipelines.lock import LockHeld, run_lock
from pipelines.lost import count_lost, fold_lost
from pipelines.pools import pool_resources, pools
from pipelines.progress import ProgressBoard, ProgressReporter, quiet_ray_data, ray_init_options
from pipelines.recover import check_catalog_home
from pipelines.resources import READ_CPUS, WRITER_CPUS, check_resources, shortfalls
from pipelines.stage_runner import StageChain, StageRunner, merge_timing
from pipelines.staging import StagedFile, decode_files, discard
from pipelines.tables import (
    CatalogError,
    RunLayout,
    append_run_row,
    commit_night,
    load_table,
    now,
    output_of_config,
    preflight,
)
from pipelines.tasks import read_shards, write_staged

KEEP_IDLE_WORKERS_MS = 600_000
__all__ = ["RunFailed", "RunResult", "check_cpu_budget", "run_pipeline"]

log = logging.getLogger("curate.run")
READ_STAGE = "read"


@dataclass
class StageStats:
    """Rows in, out and quarantined by one stage; its summed compute seconds, the seconds its actors
    took to build the operator (model loads), and when its first batch began and its last ended
    (seconds after the run started; None for the read)."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    build_seconds: float = 0.0
    began_s: float | None = None
    ended_s: float | None = None
    cache_hits: int | None = None  # rows served from the result cache (None: not cached)
    cache_misses: int | None = None  # rows not in it (computed once per distinct text)


@dataclass
class RunResult:
    """What a run did: its id, status, per-stage counts and the committed tables."""

    run_id: str
    run_date: str
    status: str
    output_url: str
    stages: list[StageStats] = field(default_factory=list)
    tables: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def rows_in(self) -> int:
        return self.stages[0].rows_in if self.stages else 0

    @property
    def rows_out(self) -> int:
        return self.stages[-1].rows_out if self.stages else 0

    @property
    def rows_quarantined(self) -> int:
        return sum(s.quarantined for s in self.stages)


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / RAY_ADDRESS, else start an embedded Ray sized to the machine."""
    connect_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory)


def connect_ray(address: str | None = None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, else start an embedded Ray (``num_cpus`` default: all).

    The embedded Ray keeps idle workers for 10 minutes (Ray's default kills them after 1 s once the
    actors outnumber the CPUs): the writer tasks then reuse the read task's worker, its modules
    already imported, instead of starting a process in the run's tail (3-4 s on 2 cores).
    """
    quiet_ray_data()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_options())
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=object_store_memory, **ray_init_options(),
             _system_config={"idle_worker_killing_time_threshold_ms": KEEP_IDLE_WORKERS_MS})


def check_cpu_budget(cfg: PipelineConfig, cluster_cpus: float, autoscaling: bool = False,
                     cluster_gpus: float | None = None, cluster_memory: float | None = None) -> None:
    """Fail before running when the stages' actor pools cannot all start (Ray Data would hang).

    Every stage's pool needs ``num_cpus × min pool size`` at once, plus the read task and writer;
    likewise GPUs and memory when the cluster's are given (``pipelines.resources``). On a cluster
    that may autoscale (``autoscaling``) this only warns; ``run_pipeline`` then waits for it.
    """
    cluster = {"CPU": cluster_cpus}
    cluster |= {"GPU": cluster_gpus} if cluster_gpus is not None else {}
    cluster |= {"memory": cluster_memory} if cluster_memory is not None else {}
    missing = shortfalls(cfg, cluster, keys=tuple(cluster))
    if missing:
        if autoscaling:
            log.warning("%s (continuing: the cluster may scale up)", "\n".join(missing))
            return
        raise ConfigError("\n".join(missing))


def build_dataset(cfg: PipelineConfig, shards: list[str], layout: RunLayout,
                  progress: ProgressBoard | None = None, cache: CachePlan | None = None) -> ray.data.Dataset:
    """The Ray Data plan: read → stages → staged writer (lazy until consumed); every stage adds its
    rows to ``progress`` (a ``ProgressBoard``) when given. With a ``cache`` plan the read rows
    are joined with the cache tables first (run at once, see ``pipelines.cache_stage``)."""
    input_cfg = {"text_column": cfg.input.text_column, "id_column": cfg.input.id_column,
                 "batch_rows": cfg.input.read_batch_rows, "max_text_bytes": cfg.input.max_text_bytes,
                 "control_chars": cfg.input.control_chars}
    tasks = None
    if is_process_local(cfg.input.url):  # memory://: workers can't see it, the driver reads
        ds = ray.data.from_arrow([t for url in shards for t in read_shard(url, **input_cfg)])
    else:
        tasks = read_tasks(cfg, ray.cluster_resources().get("CPU", 1.0))
        ds = ray.data.from_items([{"url": u} for u in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(read_shards, fn_kwargs={"input_cfg": input_cfg, "storage": cfg.output.storage},
                            batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS, concurrency=tasks)
    if cache is not None:  # result cache (issue 26)
        ds = join_cache(ds, cache, cfg.stages, tasks)
    for group in pools(cfg.stages):  # consecutive stages with one resources.share label: one pool
        stage = group[0]
        entry = cache.stages.get(stage.stage_name) if cache is not None else None
        if entry is not None:  # a joined cache: one partition per call, each distinct text computed once
            per_call = {"batch_size": None} if entry.files else {}  # (a cached stage never shares a pool)
            ds = ds.map_batches(CachedStageRunner, fn_constructor_kwargs={"stage": stage, "entry": entry,
                                                                          "progress": progress},
                                batch_format="pyarrow", **(_resources(group) | per_call))
        elif len(group) == 1:
            ds = ds.map_batches(StageRunner, fn_constructor_kwargs={"stage": stage, "progress": progress},
                                batch_format="pyarrow", **_resources(group))
        else:
            ds = ds.map_batches(StageChain, fn_constructor_kwargs={"stages": group, "progress": progress},
                                batch_format="pyarrow", **_resources(group))
    return ds


def read_tasks(cfg: PipelineConfig, cluster_cpus: float) -> int:
    """Shards read at once: ``input.read_tasks``, else one per 4 cluster CPUs (at least 1). Ray Data
    would start as many read tasks as the CPUs allow; on a 2-CPU machine the raylet then started two
    worker processes in the run's head (1.1 CPU-s each) for shards the first worker had already read,
    and both stayed idle through the lm stage, waking ~150 times a second."""
    return cfg.input.read_tasks or max(1, int(cluster_cpus // 4))


def _resources(group: list[StageConfig]) -> dict:
    """Ray Data arguments of the actor pool of ``group`` (one stage, or stages sharing a pool:
    ``pipelines.pools.pool_resources``).

    ``enable_true_multi_threading``: each actor runs its batches on its main thread, where the
    operator was built, not on a thread of Ray Data's. OpenMP (torch, vLLM on CPU) counts a second
    master thread's team against the cores and then barely spins before sleeping: the lm stage ran
    at 172% CPU of 200 and 0.85x the engine alone (docs/internals.md, "Where the lm stage's time
    goes"). One call at a time per actor either way.
    """
    r = pool_resources(group)
    one_thread = {"enable_true_multi_threading": True}
    size = r["concurrency"]
    pool = (ActorPoolStrategy(size=size, **one_thread) if isinstance(size, int)
            else ActorPoolStrategy(min_size=size[0], max_size=size[1], **one_thread))
    return {"batch_size": r["batch_size"], "compute": pool, "num_cpus": r["num_cpus"],
            "num_gpus": r["num_gpus"] or None, "memory": r["memory"]}


def execute(ds: ray.data.Dataset, layout: RunLayout, write_batch_rows: int,
            cache: CachePlan | None = None) -> list[dict]:
    """Run the plan; return one stats row per written batch. The writers are Ray tasks, as many as
    the cluster has room for: they scale with it."""
    if is_process_local(layout.url(layout.root)):  # memory:// output: write from the driver
        return [write_staged(b, layout, cache).to_pylist()[0]
                for b in ds.iter_batches(batch_size=write_batch_rows, batch_format="pyarrow")]
    stats = ds.map_batches(write_staged, fn_kwargs={"layout": layout, "cache": cache},
                           batch_size=write_batch_rows, batch_format="pyarrow", num_cpus=WRITER_CPUS)
    return stats.take_all()


def execute_with_progress(cfg: PipelineConfig, shards: list[str], layout: RunLayout,
                          cache: CachePlan | None = None) -> list[dict]:
    """``execute`` the plan; off a terminal, print a progress line every few seconds meanwhile."""
    if sys.stderr.isatty():  # Ray Data's own progress bars
        return execute(build_dataset(cfg, shards, layout, cache=cache), layout, cfg.output.write_batch_rows,
                       cache)
    board = ProgressBoard(layout.run_id)
    try:
        with ProgressReporter([s.stage_name for s in cfg.stages], count_rows(shards), board.snapshot):
            return execute(build_dataset(cfg, shards, layout, board, cache), layout,
                           cfg.output.write_batch_rows, cache)
    finally:
        with contextlib.suppress(Exception):  # the board is only progress: never fail a run on it
            board.clear()


def count_rows(shards: list[str], max_shards: int = 2000) -> int | None:
    """Rows of the input shards from their Parquet footers (None when there are too many to ask);
    an unreadable shard counts one row (the read stage quarantines it as one)."""
    if len(shards) > max_shards:
        return None
    total = 0
    for url in shards:
        try:
            fs, path = url_to_fs(url)
            with fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - the read stage reports it
            total += 1
    return total


def stage_stats(rows: list[dict], stage_names: list[str], started: float | None = None) -> list[StageStats]:
    """Fold per-batch stats into per-stage counts: in = out of the previous stage; timing (window
    relative to ``started``, wall-clock seconds); cache hits and misses of cached stages."""
    total = sum(r["rows"] for r in rows)
    quarantined, timing = Counter(), {}
    for r in rows:
        quarantined.update(json.loads(r["quarantined_by"]))
        merge_timing(timing, json.loads(r["timing_by"]))
    out, remaining = [], total
    for name in [READ_STAGE, *stage_names]:
        q, t = quarantined.get(name, 0), timing.get(name, {})
        window = {k: round(t[k] - started, 2) for k in ("began", "ended") if k in t and started is not None}
        out.append(StageStats(name, remaining, remaining - q, q, round(t.get("seconds", 0.0), 3),
                              round(t.get("build", 0.0), 2), window.get("began"), window.get("ended")))
        remaining -= q
    for stats in out:  # result cache (issue 26)
        counts = fold_counts(rows).get(stats.name)
        if counts is not None:
            stats.cache_hits, stats.cache_misses = counts.get("hits", 0), counts.get("misses", 0)
    return out


def staged_of(rows: list[dict]) -> list[StagedFile]:
    """Every file the writers reported in their stats rows."""
    return decode_files(r.get("files") for r in rows)


def run_pipeline(cfg: PipelineConfig, run_date: str, *, partial: bool = False,
                 allow_shrink: bool = False) -> RunResult:
    """Run ``cfg`` for ``run_date`` and commit its tables as one night. Raises on failure (``RunFailed``
    when the error budget or a whole-run check says the night must not commit; see ``pipelines.budget``;
    ``LockHeld`` when another run of this output and date is going; ``CatalogError`` from preflight).
    ``partial``: the input is part of a night (a quarantine replay), so finalizers skip the checks
    that need the whole corpus (``FinalizeContext.partial``). ``allow_shrink``: let a rerun wipe or
    shrink the committed night (``pipelines.guards``; refused by default).
    """
    cfg = check_plan(cfg)  # loaded configs are checked already; this covers ones built in code
    output = output_of_config(cfg)
    check_reachable(output)
    check_catalog_home(output)  # never replace a lost catalog, never write into a copied output's original
    with contextlib.ExitStack() as held:
        return _run(cfg, output, run_date, held, partial, allow_shrink)


def _run(cfg: PipelineConfig, output, run_date: str, held: contextlib.ExitStack,  # noqa: ANN001
         partial: bool = False, allow_shrink: bool = False) -> RunResult:
    started, started_at = time.perf_counter(), time.time()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    layout = RunLayout(output, run_date, run_id)
    result = RunResult(run_id, run_date, "running", cfg.output.url)
    catalog, snapshots, staged = None, {}, []
    with contextlib.suppress(Exception):  # usable for the runs row even if preflight fails below
        catalog = output.catalog(create=True)
    try:
        catalog = preflight(output)
        lock = held.enter_context(run_lock(catalog, run_date, run_id=run_id))  # one run per (catalog, date)
        shards = list_shards(cfg.input.url)
        log.info("run %s: %d shard(s) from %s", run_id, len(shards), cfg.input.url)
        check_input(cfg, shards, catalog)
        cache = plan_cache(cfg, catalog, output, count_rows(shards))  # result cache (issue 26)
        init_ray(cfg)
        check_resources(cfg, ray.cluster_resources,
                        addressed=bool(cfg.ray.address or os.environ.get("RAY_ADDRESS")))
        check_output_reachable(cfg, output, len([n for n in ray.nodes() if n.get("Alive")]))
        stats_rows = execute_with_progress(cfg, shards, layout, cache)
        staged = staged_of(stats_rows)
        result.stages = stage_stats(stats_rows, [s.stage_name for s in cfg.stages], started_at)
        lost = fold_lost(stats_rows)  # unreadable row groups count their rows; files their own budget
        count_lost(result.stages, lost)
        check_budget(cfg, result.stages, lambda: quarantine_examples(layout, staged), lost.files)
        check_shrink(catalog, run_date, result.rows_out, result.rows_in,  # before the commit
                     cfg.output.max_shrink_share, allow_shrink)
        with tempfile.TemporaryDirectory(prefix="curate-report-") as tmp:
            staged += _finalize(cfg, layout, staged, Path(tmp), partial)
            lock.check()  # LockLost: another run took the date; this one must not commit
            night_files, cache_files = split_files(staged)  # result cache (issue 26): not replaced by date
            committed = commit_night(catalog, run_date, night_files)
            commit_cache(catalog, cache, cache_files)  # append only; a failure is a warning
            lock.check()  # and once more before the runs row, the commit point
            _publish_reports(layout, Path(tmp))
        snapshots = {t: snap for t, (snap, _) in committed.items()}
        result.tables = {t: rows for t, (snap, rows) in committed.items() if snap is not None}
        result.status = "committed"
    except BaseException as err:
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        if isinstance(err, LockHeld):  # never started: the running night owns the date and its row
            catalog = None
        if isinstance(err, RunFailed):  # a whole-run verdict: nothing of this run may be committed
            err.result = result  # type: ignore[attr-defined]
            discard(output, staged)
        raise
    finally:
        result.seconds = round(time.perf_counter() - started, 2)
        if catalog is not None:
            try:
                write_run_row(cfg, catalog, layout, result, snapshots)
            except Exception as err:
                if result.status == "committed":
                    raise  # without its runs row the night is not committed
                log.warning("could not record the failed run %s in runs: %s: %s",  # issue 22: one line
                            run_id, type(err).__name__, err)
    return result


def check_reachable(output) -> None:  # noqa: ANN001 - Output
    """One ``CatalogError`` line naming the endpoint when the output's object store does not answer
    (before anything lists or opens it)."""
    from pipelines.storage import StorageError, check_endpoint

    try:
        check_endpoint(output.storage, output.url)
    except StorageError as err:
        raise CatalogError(str(err)) from None


def check_output_reachable(cfg: PipelineConfig, output, nodes: int) -> None:  # noqa: ANN001 - Output
    """Refuse a local output on a cluster of ``nodes`` > 1 (the writers run on other nodes; the commit
    would find their files on no disk of the driver's), unless every node mounts it."""
    if nodes > 1 and output.is_local and not cfg.output.shared_mount:
        raise ConfigError(
            f"output.url {cfg.output.url!r} is a local path, but the Ray cluster has {nodes} nodes: the "
            "workers on other nodes would write to their own disks. Use an object store URL (s3://…) with "
            "a shared catalog, or, if every node mounts this path (NFS, a shared volume), set "
            "output.shared_mount: true")


def check_input(cfg: PipelineConfig, shards: list[str], catalog) -> None:  # noqa: ANN001
    """Before compute: every shard's column types agree with the first shard's and with the committed
    ``documents`` table (``InputError`` names shard and column); warn about renamed input columns."""
    documents = load_table(catalog, "documents")
    schema = documents.schema().as_arrow() if documents is not None else None
    for warning in check_schemas(shards, cfg.input.text_column, cfg.input.id_column, schema):
        log.warning("%s", warning)


def quarantine_examples(layout: RunLayout, files: list[StagedFile], n: int = 3) -> list[str]:
    """Up to ``n`` distinct quarantine reasons staged by this run (its quarantine table is not committed)."""
    staged = scan_staged(layout, files, ["quarantine"])
    if "quarantine_reason" not in staged.collect_schema().names():
        return []
    reasons = staged.select("quarantine_reason").unique(maintain_order=True).head(n).collect()
    return [r[:300] for r in reasons.to_series().to_list() if r]


def _finalize(cfg: PipelineConfig, layout: RunLayout, staged: list[StagedFile], report_dir: Path,
              partial: bool = False) -> list[StagedFile]:
    """Run every stage's whole-run step over the staged files; stage its tables with the run (the
    files written), its report files in ``report_dir``."""
    ctx = FinalizeContext(layout, report_dir, staged, partial)
    written = []
    for stage in cfg.stages:
        for table, rows in stage.finalize(ctx).items():
            written += ctx.stage(table, rows, f"part-{stage.stage_name}")
    return written


def _publish_reports(layout: RunLayout, report_dir: Path) -> None:
    """Copy the finalizers' report files to ``<output>/reports/run_date=D/`` (not a table)."""
    target = f"{layout.root}/reports/run_date={layout.run_date}"
    for file in sorted(report_dir.iterdir()):
        layout.fs.makedirs(target, exist_ok=True)
        layout.fs.put_file(str(file), f"{target}/{file.name}")


def write_run_row(cfg: PipelineConfig, catalog, layout: RunLayout, result: RunResult,  # noqa: ANN001
                  snapshots: dict[str, int | None]) -> None:
    """Append this run's row to ``runs``: for a committed run, the commit point of the night."""
    row = {
        "run_id": result.run_id, "pipeline": cfg.name,
        "config_hash": cfg.config_hash(), "code_version": code_version(), "status": result.status,
        "started_at": result.run_id.split("-")[0], "committed_at": now(), "seconds": result.seconds,
        "rows_in": result.rows_in, "rows_out": result.rows_out,
        "rows_quarantined": result.rows_quarantined,
        "stages": json.dumps([s.__dict__ for s in result.stages]),
        "tables": json.dumps(result.tables), "snapshots": json.dumps(snapshots),
        "error": result.error, "run_date": layout.run_date,
    }
    append_run_row(catalog, row)


def code_version() -> str:
    """``git describe`` of the code when it runs from a checkout, else the package version."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("curate")
    except PackageNotFoundError:
        return "unknown"
