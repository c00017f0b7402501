"""Incremental nights with the result cache: the lm stage's seconds when 80% of a night was seen before.

    python -m bench.incremental [--docs 200] [--seen 0.8] [--backend torch] [--max-tokens 128]

Night 1 scores ``--docs`` documents of the demo corpus (every lm row computed, the cache filled);
night 2 reads ``--seen`` of them again plus new ones. The same night 2 also runs without the cache
(``cache: {enabled: false}``) into another output; its tables must equal the cached night's.
Target: night 2's lm stage seconds <= 0.3x night 1's. Also reported: the cache's bytes per entry.
Writes ``bench/results/incremental.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from bench.common import save

DEMO = Path.home() / ".cache" / "curate" / "demo"


def _pipeline(input_dir: Path, out: Path, backend: str, max_tokens: int, cache: bool) -> dict:
    return {
        "name": "incremental", "input": {"url": str(input_dir)}, "output": {"url": str(out)},
        "cache": {"enabled": cache},  # default stages: the lm stage
        "ray": {"num_cpus": 2},
        "stages": [
            {"op": "token_premium", "tokenizers": [{"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
             "resources": {"num_cpus": 0.2, "batch_size": 256}},
            {"op": "lm", "model": {"name": "smollm2", "path": str(DEMO / "smollm2-135m-instruct"),
                                   "backend": backend},
             "max_tokens": max_tokens, "cpu_threads": 2, "resources": {"num_cpus": 1, "batch_size": 32}},
        ],
    }


def _table(out: Path, table: str, date: str) -> list[tuple]:
    from jobs.ops.query import query

    t = query(str(out), f"SELECT * EXCLUDE (run_date) FROM {table}", date=date)
    return [t.column_names, sorted(tuple(repr(v) for v in r.values()) for r in t.to_pylist())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--seen", type=float, default=0.8)
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"])
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)

    from pipelines.cache import cache_stats
    from pipelines.config import parse_config
    from pipelines.runner import run_pipeline
    from pipelines.tables import open_output

    corpus = pads.dataset(str(DEMO / "corpus")).to_table(columns=["id", "text", "lang"])
    n, seen = args.docs, int(round(args.docs * args.seen))
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        root = Path(tmp)
        for night, rows in (("1", range(0, n)), ("2", [*range(n - seen, n), *range(n, 2 * n - seen)])):
            (root / night).mkdir()
            pq.write_table(corpus.take(list(rows)), root / night / "part-0.parquet")
        runs = {}
        for label, night, out, cache in (("night1", "1", "cached", True), ("night2", "2", "cached", True),
                                          ("night2_no_cache", "2", "plain", False)):
            cfg = parse_config(_pipeline(root / night, root / out, args.backend, args.max_tokens, cache))
            start = time.perf_counter()
            result = run_pipeline(cfg, f"2026-03-0{night}")
            runs[label] = {"wall_seconds": round(time.perf_counter() - start, 2), "rows": result.rows_in,
                           "stages": [s.__dict__ for s in result.stages]}
        lm = {k: next(s for s in r["stages"] if s["name"] == "lm_smollm2") for k, r in runs.items()}
        identical = {t: _table(root / "cached", t, "2026-03-02") == _table(root / "plain", t, "2026-03-02")
                     for t in ("documents", "token_premium")}
        stats = [s for s in cache_stats(open_output(str(root / "cached")).catalog()) if s["stage"] == "lm_smollm2"]
    ratio = lm["night2"]["seconds"] / lm["night1"]["seconds"]
    save("incremental", {
        "docs_per_night": n, "seen_share": args.seen, "backend": args.backend, "max_tokens": args.max_tokens,
        "lm_seconds": {k: v["seconds"] for k, v in lm.items()},
        "lm_cache": {k: {"hits": v["cache_hits"], "misses": v["cache_misses"]} for k, v in lm.items()},
        "night2_vs_night1_lm_seconds": round(ratio, 3), "target": "<= 0.3", "met": ratio <= 0.3,
        "wall_seconds": {k: v["wall_seconds"] for k, v in runs.items()},
        "tables_identical_with_and_without_cache": identical,
        "cache_entries": stats[0]["entries"] if stats else 0,
        "cache_bytes": stats[0]["bytes"] if stats else 0,
        "cache_bytes_per_entry": round(stats[0]["bytes"] / stats[0]["entries"]) if stats and stats[0]["entries"] else None,
    })


if __name__ == "__main__":
    main()
