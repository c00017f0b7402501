"""Soak: stream a corpus many times the demo's size through the CPU stages; the driver's peak RSS
must stay flat as the corpus grows (the driver never holds the corpus).

    python -m bench.soak [--docs 10000] [--scales 1 8]

Each scale runs in a fresh driver process (peak RSS = ru_maxrss of that process). Workers are
separate processes and not counted: they hold one batch at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import save

WORDS = ["data", "curation", "pipeline", "token", "premium", "language", "model", "corpus", "parquet", "shard", "stream", "operator", "actor", "quality", "filter", "selection", "score", "membership", "detection"]


def write_corpus(root: Path, docs: int, per_shard: int = 2000) -> None:
    """Deterministic synthetic English documents (~600 chars) in shards of ``per_shard``."""
    for start in range(0, docs, per_shard):
        n = min(per_shard, docs - start)
        texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(90)) + f" #{start + i}"
                 for i in range(start, start + n)]
        pq.write_table(pa.table({"id": [f"d{start + i}" for i in range(n)], "text": texts,
                                 "lang": ["eng_Latn"] * n}), root / f"s{start // per_shard:05d}.parquet")


DRIVER = """
import json, resource, sys, time
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
cfg = parse_config(json.loads(sys.argv[1]))
t = time.perf_counter()
result = run_pipeline(cfg, "2026-01-01")
print(json.dumps({"seconds": time.perf_counter() - t, "rows_out": result.rows_out,
                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_scale(docs: int, work: Path) -> dict:
    corpus = work / f"corpus-{docs}"
    corpus.mkdir(parents=True)
    write_corpus(corpus, docs)
    cfg = {"name": "soak", "input": {"url": str(corpus)}, "output": {"url": str(work / f"out-{docs}")},
           "stages": [{"op": "token_premium", "tokenizers": [
               {"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
               "resources": {"batch_size": 512, "concurrency": 2}}]}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"docs": docs, **result, "docs_per_s": docs / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents at scale 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_scale(args.docs * s, Path(tmp)) for s in args.scales]
    base = runs[0]
    save("soak", {"base_docs": args.docs, "runs": runs,
                  "rss_ratio_largest_vs_1x": runs[-1]["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
                  "seconds_per_doc_ratio": (runs[-1]["seconds"] / runs[-1]["docs"]) /
                  (base["seconds"] / base["docs"])})


if __name__ == "__main__":
    main()
