"""Scale: a token_premium + preselect night at growing row counts, with the output on an S3 server
(moto, over HTTP) and the catalog in Postgres, both started here, as on a cluster.

    python -m bench.scale [--rows 100000 1000000 3000000]

Each scale runs in a fresh driver process; it reports rows/s and the driver's peak RSS (ru_maxrss:
the driver alone). Targets, as ratios within one run: driver peak RSS at the largest scale ≤ 1.2×
its value at the smallest; rows/s at the largest ≥ 0.8× rows/s at the smallest. Short generated
documents (~120 chars, English and French halves of a parallel corpus, ~5,000 rows a shard). The
PreSelect scorer is a small fastText model trained here on the same generator (its quality is not
the point; its cost per row is).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import fresh_driver, save

WORDS_EN = [
    "data",
    "curation",
    "pipeline",
    "token",
    "premium",
    "language",
    "model",
    "corpus",
    "shard",
    "stream",
    "quality",
    "filter",
]
WORDS_FR = [
    "données",
    "curation",
    "chaîne",
    "jeton",
    "prime",
    "langue",
    "modèle",
    "corpus",
    "fragment",
    "flux",
    "qualité",
    "filtre",
]
PER_SHARD = 5000


def texts(n: int, start: int, words: list[str]) -> list[str]:
    rng = random.Random(start)
    return [" ".join(rng.choice(words) for _ in range(16)) + f" {start + i}." for i in range(n)]


def write_corpus(fs, root: str, rows: int) -> None:  # noqa: ANN001 - s3fs
    """``rows`` documents: half English, half their French parallels (same ids)."""
    half = rows // 2
    for start in range(0, half, PER_SHARD // 2):
        n = min(PER_SHARD // 2, half - start)
        ids = [f"d{start + i}" for i in range(n)]
        table = pa.table(
            {
                "id": ids + ids,
                "text": texts(n, start, WORDS_EN) + texts(n, start, WORDS_FR),
                "lang": ["eng_Latn"] * n + ["fra_Latn"] * n,
            }
        )
        with fs.open(f"{root}/s{start:09d}.parquet", "wb") as f:
            pq.write_table(table, f)


def train_scorer(path: Path) -> Path:
    from operators.preselect.scorer import train_scorer as train

    docs = texts(2000, 0, WORDS_EN) + texts(2000, 10**6, WORDS_FR)
    train(docs, [1] * 2000 + [0] * 2000, path)
    return path


def pipeline(input_url: str, output: dict, scorer: Path) -> dict:
    return {
        "name": "scale",
        "input": {"url": input_url},
        "output": output,
        "stages": [
            {
                "op": "token_premium",
                "ref_lang": "eng_Latn",
                "tokenizers": [{"name": "cl100k", "kind": "tiktoken", "encoding": "cl100k_base"}],
                "resources": {"num_cpus": 0.5, "batch_size": 2048},
            },
            {
                "op": "preselect",
                "model": str(scorer),
                "selection": {"policy": "top_fraction_chars", "fraction": 0.10},
                "resources": {"num_cpus": 0.25, "batch_size": 2048},
            },
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from services import postgres_server, s3_server

    runs = []
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3, postgres_server() as pg:
        scorer = train_scorer(Path(tmp) / "scorer.bin")
        fs = s3.filesystem()
        for rows in args.rows:
            corpus = f"s3://{s3.bucket}/corpus-{rows}"
            write_corpus(fs, corpus, rows)
            output = {
                "url": f"s3://{s3.bucket}/out-{rows}",
                "storage": s3.storage(),
                "catalog": {"type": "sql", "uri": pg.new_database()},
            }
            result = fresh_driver(pipeline(corpus, output, scorer))
            run = {
                "rows": rows,
                "seconds": round(result["seconds"], 1),
                "rows_per_s": round(rows / result["seconds"], 1),
                "driver_peak_rss_mb": round(result["driver_peak_rss_mb"], 1),
                "tables": result["tables"],
            }
            print(run, flush=True)
            runs.append(run)
    small, large = runs[0], runs[-1]
    save(
        "scale",
        {
            "runs": runs,
            "driver_rss_large_vs_small": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
            "rows_per_s_large_vs_small": round(large["rows_per_s"] / small["rows_per_s"], 3),
            "targets": {"driver_rss_large_vs_small": "<= 1.2", "rows_per_s_large_vs_small": ">= 0.8"},
        },
    )


if __name__ == "__main__":
    main()
