"""The nightly pipeline end to end (docs/s, LM tokens/s, seconds per stage) and how its CPU stages scale.

    python -m bench.pipeline [--docs 160] [--scale-docs 2000] [--scales 1 4 16]
        -> bench/results/pipeline_nightly.json

* nightly: ``pipelines/nightly.yaml`` with its stages as-is (demo assets under ${CURATE_CACHE}/demo)
  over a subset of the demo corpus: the first rows of every shard, ``--docs`` in all, in proportion
  to the shards' sizes (English, machine-written and parallel multilingual docs alike). One run in a
  fresh driver process (Ray start included). LM tokens = Σ (``<model>__n_scored`` + 1) over the
  committed documents table; stage seconds are each stage's summed compute seconds in its actors
  (stages overlap, so they need not add up to the wall clock). The ratio ``lm_stage_vs_wall`` =
  LM stage seconds ÷ wall seconds: the share of the run that the LM's own work explains.
* scale: nightly's CPU-only stages (token_premium, preselect) over ``--scale-docs × s`` synthetic
  documents for each of ``--scales``, each in a fresh driver (``bench.soak.run_scales``): seconds
  per document and driver peak RSS of the largest scale ÷ the first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import ROOT, fresh_driver, save
from bench.soak import run_scales
from pipelines.tables import committed_table_files

NIGHTLY = ROOT / "pipelines" / "nightly.yaml"
CPU_OPS = ("token_premium", "preselect")


def nightly_config() -> dict:
    """pipelines/nightly.yaml, validated and dumped to a plain dict (env vars expanded)."""
    from pipelines.config import load_config

    return load_config(NIGHTLY).model_dump(mode="json")


def write_subset(source: Path, dest: Path, docs: int) -> int:
    """The first rows of every Parquet shard under ``source``, ``docs`` in all, in proportion to size."""
    shards = sorted(source.glob("*.parquet"))
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    total, written = sum(sizes), 0
    dest.mkdir(parents=True)
    for k, (shard, size) in enumerate(zip(shards, sizes, strict=True)):
        n = docs - written if k == len(shards) - 1 else round(docs * size / total)
        n = max(0, min(n, size))
        if n:
            pq.write_table(pq.read_table(shard).slice(0, n), dest / shard.name)
        written += n
    return written


def lm_tokens(output: Path, model: str) -> int:
    """Σ (n_scored + 1) over the committed documents table (skipped documents count 0)."""
    column, tokens = f"{model}__n_scored", 0
    for part in committed_table_files(str(output / "documents")) or []:
        n = pq.read_table(part.removeprefix("file://"), columns=[column]).column(column)
        tokens += int(pc.sum(pc.add(n, 1)).as_py() or 0)
    return tokens


def nightly_run(docs: int, work: Path) -> dict:
    """nightly.yaml over ``docs`` demo documents in a fresh driver: rates and the stage split."""
    from jobs.demo.cache import cache_root

    cfg = nightly_config()
    n = write_subset(cache_root() / "demo" / "corpus", work / "corpus", docs)
    cfg["input"]["url"], cfg["output"]["url"] = str(work / "corpus"), str(work / "out")
    result = fresh_driver(cfg)
    lm = next(s for s in cfg["stages"] if s["op"] == "lm")
    model = lm["model"]["name"]
    lm_name = lm["name"] or f"lm_{model}"
    tokens = lm_tokens(work / "out", model)
    wall = result["seconds"]
    stage_seconds = {s["name"]: s["seconds"] for s in result["stages"]}
    compute = sum(stage_seconds.values())
    return {"docs": n, "docs_out": result["rows_out"], "wall_seconds": round(wall, 2), "lm_tokens": tokens,
            "docs_per_s": round(n / wall, 2), "lm_tokens_per_s_wall": round(tokens / wall, 1),
            "lm_tokens_per_s_in_stage": round(tokens / stage_seconds[lm_name], 1),
            "lm_stage_vs_wall": round(stage_seconds[lm_name] / wall, 3),
            "stages": [{**s, "share_of_stage_seconds": round(s["seconds"] / compute, 3)}
                       for s in result["stages"]],
            "tables": result["tables"], "driver_peak_rss_mb": round(result["driver_peak_rss_mb"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=160, help="demo documents through nightly.yaml")
    parser.add_argument("--scale-docs", type=int, default=2000, help="synthetic documents at scale 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nightly-") as tmp:
        nightly = nightly_run(args.docs, Path(tmp))
    cpu_stages = [s for s in nightly_config()["stages"] if s["op"] in CPU_OPS]
    scale = run_scales(cpu_stages, args.scale_docs, args.scales)
    save("pipeline_nightly", {"pipeline": str(NIGHTLY.relative_to(ROOT)), "nightly": nightly,
                              "scale": {"stages": [s["op"] for s in cpu_stages], **scale}})


if __name__ == "__main__":
    main()
