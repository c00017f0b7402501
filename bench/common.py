"""Helpers shared by the benchmarks: machine facts, result files, a pipeline run in a fresh driver
process, and one stage's throughput in a Ray Data actor."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from operators.base import StageConfig

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(name: str, result: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the command and machine facts."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.orig_argv[1:]]), "machine": machine(),
               **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


DRIVER = """
import json, resource, sys, time
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
cfg = parse_config(json.loads(sys.argv[1]))
t = time.perf_counter()
result = run_pipeline(cfg, "2026-01-01")
print(json.dumps({"seconds": time.perf_counter() - t, "rows_out": result.rows_out,
                  "stages": [s.__dict__ for s in result.stages], "tables": result.tables,
                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fresh_driver(cfg: dict) -> dict:
    """Run the pipeline ``cfg`` (a dict for ``parse_config``) in a fresh Python process.

    Returns its wall ``seconds``, ``rows_out``, per-stage ``stages`` (name, rows_in, rows_out,
    quarantined, seconds), committed ``tables`` and ``driver_peak_rss_mb`` (ru_maxrss of that
    process: the driver alone; Ray workers are other processes).
    """
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline driver failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def actor_stage_run(stage: StageConfig, table: pa.Table, batch_size: int, num_cpus: float = 1.0) -> dict:
    """Seconds for the real stage (``StageRunner``) over ``table`` as a Ray Data ``map_batches`` in one
    actor with ``num_cpus``; the input is in the object store before the clock starts (Ray must be
    initialised).

    ``wall`` counts everything (actor start, model load, Ray overhead); ``steady`` starts at the first
    output batch, so the one-off start-up is excluded (``steady_docs`` rows after it); ``in_actor``
    sums the stage's own compute seconds.
    """
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.stage_runner import StageRunner, timing_column

    table = _with_quarantine_columns(table)
    refs = [ray.put(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]
    start = time.perf_counter()
    ds = ray.data.from_arrow_refs(refs).map_batches(
        StageRunner, fn_constructor_kwargs={"stage": stage}, batch_size=batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=1), num_cpus=num_cpus)
    first, first_rows, rows, inside = None, 0, 0, 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first, first_rows = time.perf_counter(), batch.num_rows
        rows += batch.num_rows
        inside += float(pc.sum(batch.column(timing_column("seconds", stage.stage_name))).as_py())
    end = time.perf_counter()
    if rows != table.num_rows:
        raise RuntimeError(f"stage returned {rows} rows for {table.num_rows}")
    return {"wall": end - start, "steady": end - first, "steady_docs": rows - first_rows, "in_actor": inside}


def _with_quarantine_columns(table: pa.Table) -> pa.Table:
    """The two columns the stage runner expects on every batch (null: nothing quarantined yet)."""
    import pyarrow as pa

    for name in ("quarantine_reason", "quarantine_stage"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table


def demo_corpus(n: int) -> pa.Table:
    """The demo corpus (id, text, lang), repeated to ``n`` rows; copy r's ids get the suffix ``-r``, so
    ids stay unique and parallel documents (same id, other language) stay parallel within a copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.demo.corpus import prepare_demo_corpus

    shards = sorted(prepare_demo_corpus(log=lambda _: None).glob("*.parquet"))
    base = pa.concat_tables([pq.read_table(s, columns=["id", "text", "lang"]) for s in shards])
    copies = []
    for r in range(-(-n // base.num_rows)):
        ids = pa.array([f"{i}-{r}" for i in base.column("id").to_pylist()], pa.string())
        copies.append(base.set_column(0, "id", ids))
    return pa.concat_tables(copies).slice(0, n)


def write_shards(table: pa.Table, root: Path, shards: int = 4) -> Path:
    """``table`` as ``shards`` Parquet files under ``root`` (created); returns ``root``."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    size = -(-table.num_rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * size, size), root / f"part-{k}.parquet")
    return root


def summarise_seeds(runs: list[dict], scores: list[str] | tuple[str, ...]) -> dict:
    """Mean and sd (ddof 1) over seeds of each score's AUROC and TPR@5%FPR (``runs[i]["scores"]``)."""
    import numpy as np

    out = {}
    for name in scores:
        a = np.array([r["scores"][name]["auroc"] for r in runs])
        t = np.array([r["scores"][name]["tpr_at_fpr"] for r in runs])
        out[name] = {"direction": runs[0]["scores"][name]["direction"],
                     "auroc_mean": float(a.mean()), "auroc_sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                     "tpr_mean": float(t.mean()), "tpr_sd": float(t.std(ddof=1)) if len(t) > 1 else 0.0}
    return out
