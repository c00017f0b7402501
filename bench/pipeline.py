"""The nightly pipeline against its own lm engine: where the wall clock goes, and how its CPU stages scale.

    python -m bench.pipeline [--docs 840] [--scale-docs 2000] [--scales 1 4 16]
        -> bench/results/pipeline_nightly.json

* nightly: ``pipelines/nightly.yaml`` with its stages as-is (demo assets under ${CURATE_CACHE}/demo)
  over the demo corpus, ``--docs`` in all (default: all 840, what ``make run`` runs; fewer take the
  first rows of every shard in proportion to its size), into a fresh output (no result cache). One
  run in a fresh driver process, Ray's start included in ``wall_seconds``.
* engine: in the same bench run, after the pipeline, a child process builds the ``lm`` stage's
  operator from the same stage config and scores the very token ids the pipeline committed
  (``<model>__token_ids``), in the stage's batches (``resources.batch_size`` documents, in the
  committed order), every batch timed, the first included, as the stage's seconds include its
  first; the operator's build is left out of both.
* ratios (targets in docs/internals.md, "Where the lm stage's time goes"):
  ``lm_in_pipeline_vs_engine`` = engine seconds ÷ the lm stage's compute seconds (its tokens/s in
  the pipeline over the engine's, ≥ 0.9); ``wall_vs_lm_stage`` = the run's wall seconds ÷ the lm
  stage's compute seconds (≤ 1.15). Each stage records its compute seconds, its share of the wall,
  its actors' build seconds and its window (first batch began, last batch ended, seconds after the
  run started), so the head (before the lm stage's first batch) and tail (after its last) show.
* memory: every Ray worker's CPU is sampled every 2 s during the run; the lm actor is the worker
  that used the most CPU. Its RSS, USS and PSS (and PSS's anonymous, file and shared-memory parts)
  come from ``/proc/<pid>/smaps_rollup`` each time its RSS grows 2% past the last read, with the kernel's RSS
  high-water mark (``VmHWM``), which catches what falls between samples. The peaks sit next to the
  stage's declared ``resources.memory``. The sampler's own CPU seconds are recorded too, as it
  shares the cores with the run.
* scale: nightly's CPU-only stages (token_premium, preselect) over ``--scale-docs × s`` synthetic
  documents for each of ``--scales``, each in a fresh driver (``bench.soak.run_scales``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ROOT, fresh_driver, save
from bench.soak import run_scales
from pipelines.tables import committed_table_files

NIGHTLY = ROOT / "pipelines" / "nightly.yaml"
CPU_OPS = ("token_premium", "preselect")
MiB = 2**20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def nightly_config() -> dict:
    """pipelines/nightly.yaml, validated and dumped to a plain dict (env vars expanded)."""
    from pipelines.config import load_config

    return load_config(NIGHTLY).model_dump(mode="json")


def write_subset(source: Path, dest: Path, docs: int) -> int:
    """The first rows of every Parquet shard under ``source``, ``docs`` in all, in proportion to size."""
    shards = sorted(source.glob("*.parquet"))
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    total, written = sum(sizes), 0
    docs = min(docs, total)
    dest.mkdir(parents=True)
    for k, (shard, size) in enumerate(zip(shards, sizes, strict=True)):
        n = docs - written if k == len(shards) - 1 else round(docs * size / total)
        n = max(0, min(n, size))
        if n:
            pq.write_table(pq.read_table(shard).slice(0, n), dest / shard.name)
        written += n
    return written


def committed_token_ids(output: Path, model: str) -> list[list[int] | None]:
    """``<model>__token_ids`` of the committed documents table, in file order (None: skipped)."""
    column = f"{model}__token_ids"
    parts = [pq.read_table(p.removeprefix("file://"), columns=[column])
             for p in committed_table_files(str(output / "documents")) or []]
    return pa.concat_tables(parts).column(column).to_pylist() if parts else []


ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Clean", "Private_Dirty")


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in bytes: RSS, PSS and its anonymous / file / shared-memory parts,
    and USS (private clean + dirty). Shared memory here is mostly Ray's object store, mapped into every
    worker that reads a block from it; Ray accounts it apart from the worker's ``resources.memory``."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ROLLUP_FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return {"rss": values["Rss"], "pss": values["Pss"], "uss": values["Private_Clean"] + values["Private_Dirty"],
            "pss_anon": values.get("Pss_Anon", 0), "pss_file": values.get("Pss_File", 0),
            "pss_shmem": values.get("Pss_Shmem", 0)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def resident_bytes(pid: int) -> int:
    """RSS of ``pid`` from ``/proc/<pid>/statm`` (no page-table walk)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def rss_high_water_bytes(pid: int) -> int:
    """``VmHWM`` of ``pid``: the kernel's own peak RSS, transients between two samples included."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class WorkerMemory:
    """Samples Ray's worker processes (``ray::`` in the title) every 2 s, in a thread: every worker's
    CPU seconds, and ``smaps_rollup`` of the two that used the most CPU so far (the lm actor is the
    busiest from its model load on) only when their RSS has passed the RSS of their last smaps read
    by 2%: PSS peaks where RSS does (the actor's memory is private), and the kernel's RSS high-water
    mark catches what falls between samples. smaps walks the actor's page tables under its memory
    lock (~30 ms for the lm actor): read every time it cost 3% of a core, and read whenever RSS sat
    near its high (all of the lm stage once freed memory goes back) it slowed the stage it measures.
    Processes whose command line has no "ray" are never looked at again. The thread's own CPU
    seconds are kept (``sampler_cpu_seconds``), as it shares the cores with the run."""

    def __init__(self) -> None:
        self.peaks: dict[int, dict] = {}
        self.sampler_cpu_seconds = 0.0
        self._titles: dict[int, str] = {}
        self._not_ray: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _title(self, pid: int) -> str | None:
        """A Ray worker's title; read again until it has one (a worker names itself after it starts)."""
        if pid in self._not_ray:
            return None
        if pid not in self._titles:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return None
            if "ray" not in cmdline:  # not a starting worker either (default_worker.py lives in ray/)
                self._not_ray.add(pid)
            if "ray::" not in cmdline:
                return None
            self._titles[pid] = cmdline[:80]
        return self._titles[pid]

    def _sample(self) -> None:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and self._title(int(entry)) is not None:
                pid = int(entry)
                try:
                    cpu = cpu_seconds(pid)
                except OSError:
                    continue
                peak = self.peaks.setdefault(pid, {"title": self._titles[pid], "rss": 0, "uss": 0, "pss": 0,
                                                   "at_peak_pss": {}, "cpu_seconds": 0.0})
                peak["cpu_seconds"] = max(peak["cpu_seconds"], cpu)
        for pid in sorted(self.peaks, key=lambda p: -self.peaks[p]["cpu_seconds"])[:2]:
            peak = self.peaks[pid]
            try:  # smaps walks the page tables (~30 ms for the lm actor): only 2% past its last read
                peak["hwm"] = max(peak.get("hwm", 0), rss_high_water_bytes(pid))
                if resident_bytes(pid) < 1.02 * peak.get("rss_at_read", 0):
                    continue
                mem = smaps_rollup(pid)
                self._titles.pop(pid)  # an actor renames itself from ray::IDLE once it holds a stage
                peak["title"] = self._title(pid) or peak["title"]
            except (OSError, KeyError):
                continue
            peak["rss_at_read"] = mem["rss"]
            for key in ("rss", "uss", "pss"):
                peak[key] = max(peak[key], mem[key])
            if mem["pss"] >= peak["pss"]:
                peak["at_peak_pss"] = mem

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.thread_time()
            self._sample()
            self.sampler_cpu_seconds += time.thread_time() - start
            self._stop.wait(2.0)

    def busiest(self) -> dict:
        """Peaks (MiB) of the worker that used the most CPU, with PSS's parts at its PSS peak."""
        pid, peak = max(self.peaks.items(), key=lambda kv: kv[1]["cpu_seconds"])
        parts = {f"{k}_mib": round(v / MiB) for k, v in peak["at_peak_pss"].items() if k.startswith("pss_")}
        return {"pid": pid, "title": peak["title"], "cpu_seconds": round(peak["cpu_seconds"], 1),
                **{f"peak_{k}_mib": round(peak[k] / MiB) for k in ("rss", "uss", "pss")},
                "rss_high_water_mib": round(peak.get("hwm", 0) / MiB),
                "at_peak_pss": parts, "sampler_cpu_seconds": round(self.sampler_cpu_seconds, 2)}


ENGINE_CHILD = """
import json, sys, time
from pipelines.config import parse_config
from operators.lm.models import Encoded
cfg = parse_config(json.loads(open(sys.argv[1]).read()))
ids = json.loads(open(sys.argv[2]).read())
lm = next(s for s in cfg.stages if s.stage_name == sys.argv[3])
op = lm.build()
docs = [Encoded(x, False) if x else Encoded(None, None, "skipped in the pipeline") for x in ids]
size, seconds = lm.resources.batch_size, []
for first in range(0, len(docs), size):
    start = time.perf_counter()
    op.engine.score(docs[first:first + size], op.heads, set(op.cache_layers.values()))
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": sum(seconds), "batches": [round(s, 2) for s in seconds]}))
"""


def engine_alone(cfg: dict, lm_name: str, ids: list[list[int] | None], work: Path) -> dict:
    """The lm stage's operator alone in a child process, on ``ids`` in the stage's batches."""
    (work / "cfg.json").write_text(json.dumps(cfg))
    (work / "ids.json").write_text(json.dumps(ids))
    proc = subprocess.run([sys.executable, "-c", ENGINE_CHILD, str(work / "cfg.json"), str(work / "ids.json"),
                           lm_name], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"engine child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nightly_run(docs: int, work: Path) -> dict:
    """nightly.yaml over ``docs`` demo documents in a fresh driver, then its lm engine alone."""
    from jobs.demo.cache import cache_root
    from pipelines.config import parse_config

    cfg = nightly_config()
    n = write_subset(cache_root() / "demo" / "corpus", work / "corpus", docs)
    cfg["input"]["url"], cfg["output"]["url"] = str(work / "corpus"), str(work / "out")
    with WorkerMemory() as memory:
        result = fresh_driver(cfg)
    lm = next(s for s in parse_config(cfg).stages if s.op == "lm")
    model = lm.model.name
    ids = committed_token_ids(work / "out", model)
    tokens = sum(len(x) for x in ids if x)
    engine = engine_alone(cfg, lm.stage_name, ids, work)
    wall = result["seconds"]
    stages = {s["name"]: s for s in result["stages"]}
    lm_stage = stages[lm.stage_name]
    return {
        "docs": n, "docs_out": result["rows_out"], "lm_tokens": tokens, "wall_seconds": round(wall, 2),
        "lm_stage_seconds": lm_stage["seconds"], "engine_alone_seconds": round(engine["seconds"], 2),
        "lm_in_pipeline_vs_engine": round(engine["seconds"] / lm_stage["seconds"], 3),
        "wall_vs_lm_stage": round(wall / lm_stage["seconds"], 3),
        "lm_tokens_per_s": {"in_stage": round(tokens / lm_stage["seconds"], 1),
                            "engine_alone": round(tokens / engine["seconds"], 1),
                            "wall": round(tokens / wall, 1)},
        "head_seconds": lm_stage["began_s"], "tail_seconds": round(wall - lm_stage["ended_s"], 2),
        "engine_batches_seconds": engine["batches"],
        "stages": [{**s, "share_of_wall": round(s["seconds"] / wall, 3)} for s in result["stages"]],
        "lm_actor_memory": {**memory.busiest(), "declared_mib": round(lm.memory_bytes() / MiB)},
        "tables": result["tables"], "driver_peak_rss_mb": round(result["driver_peak_rss_mb"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=840, help="demo documents through nightly.yaml (all: 840)")
    parser.add_argument("--scale-docs", type=int, default=2000, help="synthetic documents at scale 1x")
    parser.add_argument("--scales", type=int, nargs="*", default=[1, 4, 16], help="none: skip the scale runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nightly-") as tmp:
        nightly = nightly_run(args.docs, Path(tmp))
    print(json.dumps(nightly, indent=2), file=sys.stderr)
    result: dict = {"pipeline": str(NIGHTLY.relative_to(ROOT)), "nightly": nightly}
    if args.scales:
        cpu_stages = [s for s in nightly_config()["stages"] if s["op"] in CPU_OPS]
        result["scale"] = {"stages": [s["op"] for s in cpu_stages],
                           **run_scales(cpu_stages, args.scale_docs, args.scales)}
    save("pipeline_nightly", result)
    record_stage_memory(nightly)


def record_stage_memory(nightly: dict) -> None:
    """The lm actor's peaks in a real run, next to the per-stage probes of ``bench.stage_memory``
    (``bench/results/stage_memory.json``, key ``lm_actor_in_nightly``)."""
    from datetime import UTC, datetime

    from bench.common import RESULTS

    path = RESULTS / "stage_memory.json"
    data = json.loads(path.read_text()) if path.exists() else {"name": "stage_memory"}
    data["lm_actor_in_nightly"] = {
        "method": "python -m bench.pipeline: pipelines/nightly.yaml over the demo corpus; every Ray worker's CPU "
                  "sampled every 2 s, the lm actor being the worker with the most CPU seconds; its RSS, USS and PSS "
                  "(with PSS's anonymous, file and shared-memory parts) from /proc/<pid>/smaps_rollup whenever its "
                  "RSS has grown 2% past that of the last read, and the kernel's own RSS high-water mark (VmHWM, "
                  "transients between samples included); declared = the stage's resources.memory",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "docs": nightly["docs"],
        **nightly["lm_actor_memory"]}
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
