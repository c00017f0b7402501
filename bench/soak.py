"""Soak: stream a corpus many times the demo's size through the CPU stages; the driver's peak RSS
must stay flat as the corpus grows (the driver never holds the corpus).

    python -m bench.soak [--docs 10000] [--scales 1 8]

Each scale runs in a fresh driver process (peak RSS = ru_maxrss of that process). Workers are
separate processes and not counted: they hold one batch at a time. Two 0.75-CPU token_premium
actors (cl100k): with read + writer (0.5) they fill a 2-CPU embedded Ray.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import fresh_driver, save

WORDS = ["data", "curation", "pipeline", "token", "premium", "language", "model", "corpus", "parquet",
         "shard", "stream", "operator", "actor", "quality", "filter", "selection", "score", "membership",
         "detection"]
SOAK_STAGES = [{"op": "token_premium",
                "tokenizers": [{"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
                "resources": {"num_cpus": 0.75, "batch_size": 512, "concurrency": 2}}]


def write_corpus(root: Path, docs: int, per_shard: int = 2000) -> None:
    """Deterministic synthetic English documents (~600 chars) in shards of ``per_shard``."""
    for start in range(0, docs, per_shard):
        n = min(per_shard, docs - start)
        texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(90)) + f" #{start + i}"
                 for i in range(start, start + n)]
        pq.write_table(pa.table({"id": [f"d{start + i}" for i in range(n)], "text": texts,
                                 "lang": ["eng_Latn"] * n}), root / f"s{start // per_shard:05d}.parquet")


def run_scale(stages: list[dict], docs: int, work: Path) -> dict:
    """One fresh-driver run of ``stages`` over ``docs`` synthetic documents."""
    corpus = work / f"corpus-{docs}"
    corpus.mkdir(parents=True)
    write_corpus(corpus, docs)
    cfg = {"name": "soak", "input": {"url": str(corpus)}, "output": {"url": str(work / f"out-{docs}")},
           "stages": stages}
    result = fresh_driver(cfg)
    return {"docs": docs, **result, "docs_per_s": docs / result["seconds"]}


def run_scales(stages: list[dict], base_docs: int, scales: list[int]) -> dict:
    """``stages`` at ``base_docs × s`` for each scale ``s`` (at least three); ratios of the largest
    scale to the first.

    A run costs a fixed start (Ray, actors, models) plus a cost per document, so whole-run seconds
    per doc fall as the corpus grows. Linearity is the *marginal* cost: seconds per extra document
    between the two largest scales over that between the two smallest (1.0 = exactly linear).
    """
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        runs = [run_scale(stages, base_docs * s, Path(tmp)) for s in scales]
    base, top = runs[0], runs[-1]

    def marginal(a: dict, b: dict) -> float:
        return (b["seconds"] - a["seconds"]) / (b["docs"] - a["docs"])

    low, high = marginal(runs[0], runs[1]), marginal(runs[-2], runs[-1])
    return {"base_docs": base_docs, "scales": scales, "runs": runs,
            "rss_ratio_largest_vs_1x": top["driver_peak_rss_mb"] / base["driver_peak_rss_mb"],
            "seconds_per_doc_ratio": (top["seconds"] / top["docs"]) / (base["seconds"] / base["docs"]),
            "marginal_ms_per_doc": {"smallest": 1e3 * low, "largest": 1e3 * high},
            "marginal_seconds_per_doc_ratio": high / low}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents at scale 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    save("soak", run_scales(SOAK_STAGES, args.docs, args.scales))


if __name__ == "__main__":
    main()
