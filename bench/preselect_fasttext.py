"""PreSelect scoring throughput: the ``preselect`` Ray Data stage vs a raw fastText loop.

    python -m bench.preselect_fasttext [--docs 200000] [--batch-size 4096] [--repeats 5]
        -> bench/results/preselect_fasttext.json

All paths score the same texts (the demo corpus, repeated to ``--docs``) with the demo PreSelect
scorer (``jobs.demo.preselect.prepare_demo_preselect``):

* raw:   one process, the model loaded once, ``model.predict([normalize(t) ...], k=-1)`` per batch;
* stage: the real stage (``StageRunner`` around ``PreSelectConfig.build()``) as a Ray Data
         ``map_batches`` over one actor with ``num_cpus=1``, input already in the object store;
         ``wall`` counts everything (actor start, model load, Ray overhead), ``steady`` starts
         at the first output batch (the one-off start-up excluded; it flatters the stage when
         there are few batches and Ray hands the first one over late), ``in_actor`` is the
         stage's own compute seconds (start-up and Ray transport excluded);
* e2e:   ``run_pipeline`` with only the preselect stage: read Parquet, score, staged write,
         the global top-10%-of-chars selection, commit. Per core = docs/s ÷ Ray CPUs.

docs/s per core: the stage and raw paths use one core; the target is stage ≥ 0.8 × raw.
Reference: NeMo Curator's published CPU fastText classifier figure, ~500 docs/s per core end to end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from bench.common import actor_stage_run, demo_corpus, save, write_shards
from operators.preselect.math import normalize_for_fasttext
from operators.preselect.scorer import load_scorer
from operators.preselect.stage import PreSelectConfig

NEMO_DOCS_PER_S_PER_CORE = 500


def bench_texts(n: int) -> list[str]:
    """The demo corpus's texts, repeated to ``n``."""
    return demo_corpus(n).column("text").to_pylist()


def raw_loop(model_path: str, texts: list[str], batch_size: int) -> float:
    """Seconds for a plain predict loop over ``texts`` (model already loaded)."""
    model = load_scorer(model_path)
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        model.predict([normalize_for_fasttext(t) for t in texts[i:i + batch_size]], k=-1)
    return time.perf_counter() - start


def e2e_run(model_path: str, table: pa.Table, batch_size: int) -> dict:
    """A whole ``run_pipeline`` (read → preselect → write → selection → commit)."""
    import ray

    from pipelines.config import parse_config
    from pipelines.runner import run_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-preselect-") as tmp:
        write_shards(table, Path(tmp) / "in")
        cfg = parse_config({"name": "bench-preselect", "input": {"url": f"{tmp}/in"},
                            "output": {"url": f"{tmp}/out"},
                            "stages": [{"op": "preselect", "model": model_path,
                                        "resources": {"num_cpus": 1, "batch_size": batch_size}}]})
        result = run_pipeline(cfg, "2026-01-01")
        return {"seconds": result.seconds, "docs": result.rows_out, "selected": result.tables.get("selected"),
                "ray_cpus": float(ray.cluster_resources().get("CPU", 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    args = parser.parse_args()

    import os

    import ray

    from jobs.demo.preselect import prepare_demo_preselect

    model_path = str(prepare_demo_preselect(log=lambda _: None))
    texts = bench_texts(args.docs)
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    load_before = os.getloadavg()[0]
    raw, stage = [], []
    for _ in range(args.repeats):  # interleaved, so load drift on a shared machine hits both
        raw.append(raw_loop(model_path, texts, args.batch_size))
        stage.append(actor_stage_run(PreSelectConfig(model=model_path), table, args.batch_size))
    e2e = e2e_run(model_path, table, args.batch_size)

    raw_s = statistics.median(raw)
    wall = statistics.median(s["wall"] for s in stage)
    steady = statistics.median(s["steady_docs"] / s["steady"] for s in stage)
    in_actor = statistics.median(s["in_actor"] for s in stage)
    n = len(texts)
    e2e_rate = e2e["docs"] / e2e["seconds"]
    save("preselect_fasttext", {
        "model": model_path, "model_mb": round(Path(model_path).stat().st_size / 2**20, 1),
        "docs": n, "mean_chars": round(sum(map(len, texts)) / n, 1), "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": {"raw": [round(x, 3) for x in raw], "stage": [{k: round(v, 3) for k, v in s.items()} for s in stage]},
        "raw_docs_per_s_per_core": round(n / raw_s, 1),
        "stage_docs_per_s_per_core_wall": round(n / wall, 1),
        "stage_docs_per_s_per_core_steady": round(steady, 1),
        "stage_vs_raw_wall": round((n / wall) / (n / raw_s), 3),
        "stage_vs_raw_steady": round(steady / (n / raw_s), 3),
        "stage_docs_per_s_per_core_in_actor": round(n / in_actor, 1),
        "stage_vs_raw_in_actor": round(raw_s / in_actor, 3),
        "target_stage_vs_raw": 0.8,
        "e2e": {**e2e, "docs_per_s": round(e2e_rate, 1),
                "docs_per_s_per_core": round(e2e_rate / e2e["ray_cpus"], 1)},
        "stage_in_actor_seconds_median": round(in_actor, 3),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "nemo_curator_fasttext_docs_per_s_per_core": NEMO_DOCS_PER_S_PER_CORE,
    })


if __name__ == "__main__":
    main()
