"""Token counting: the ``token_premium`` stage (through Ray) vs a raw batch-encode loop, same tokenizers.

    python -m bench.tokenizer_stage [--docs 4000] [--repeats 3] -> bench/results/tokenizer_stage.json

Texts: the demo corpus (English, machine-written, parallel multilingual), repeated to ``--docs``.
Tokenizers and stage settings: nightly.yaml's ``token_premium`` stage (smollm2 HF, cl100k, o200k).

* raw:   one process, the tokenizers loaded once (``operators.token_premium.tokenizers.load_tokenizer``), per batch
         of the stage's ``batch_size``: tiktoken ``encode_ordinary_batch``, HF fast
         ``Tokenizer.encode_batch(add_special_tokens=False)``; token counts only. ``raw_batch``
         leaves the batch calls their own threads (tiktoken 8, HF all cores), ``raw_1thread``
         pins them to one (``num_threads=1``, ``TOKENIZERS_PARALLELISM=false``), like the actor;
* stage: the real stage (``StageRunner`` around nightly's ``TokenCountsConfig``) in one actor with
         its ``num_cpus`` (``bench.common.actor_stage_run``): ``wall`` includes actor start and
         tokenizer loading, ``steady`` starts at the first output batch, ``in_actor`` is the stage's
         own compute seconds in the actor (start-up and Ray transport excluded; ``steady`` can
         flatter the stage when Ray hands over the first batch late, with few batches). The stage
         also counts byte-fallback characters per token, which the raw loop does not;
* e2e:   ``run_pipeline`` with only that stage in a fresh driver (Ray start, read, count, write,
         the ``token_premium`` table, commit).

Ratios are docs/s of a Ray path ÷ docs/s of a raw path, medians of ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from bench.common import actor_stage_run, demo_corpus, fresh_driver, save, write_shards
from operators.token_premium.stage import TokenCountsConfig
from operators.token_premium.tokenizers import (
    HFCounter,
    SentencePieceCounter,
    TiktokenCounter,
    TokenizerSpec,
    load_tokenizer,
)


def nightly_stage() -> TokenCountsConfig:
    """nightly.yaml's token_premium stage."""
    from bench.pipeline import nightly_config
    from pipelines.config import parse_config

    cfg = nightly_config()
    cfg["stages"] = [s for s in cfg["stages"] if s["op"] == "token_premium"]
    return parse_config(cfg).stages[0]


def batch_counter(spec: TokenizerSpec, threads: int | None) -> Callable[[list[str]], list[int]]:
    """Token counts of a batch of texts by the tokenizer's batch call (``threads``: None = its default)."""
    counter = load_tokenizer(spec)
    if isinstance(counter, TiktokenCounter):
        enc = counter.encoding
        return lambda texts: [len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=threads or 8)]
    if isinstance(counter, HFCounter):
        tok = counter.tok
        return lambda texts: [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    if isinstance(counter, SentencePieceCounter):
        sp = counter.sp
        return lambda texts: [len(ids) for ids in sp.encode(texts)]
    raise TypeError(f"no batch call for {type(counter).__name__}")


def raw_loop(specs: list[TokenizerSpec], texts: list[str], batch_size: int, threads: int | None) -> float:
    """Seconds to count ``texts`` under every tokenizer, batch by batch (tokenizers loaded first)."""
    counters = [batch_counter(s, threads) for s in specs]
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
    try:
        start = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            for count in counters:
                count(texts[i:i + batch_size])
        return time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def e2e_run(stage: TokenCountsConfig, table: pa.Table, work: Path) -> dict:
    """``run_pipeline`` with only ``stage``, in a fresh driver process."""
    cfg = {"name": "bench-tokenizer", "input": {"url": str(write_shards(table, work / "in"))},
           "output": {"url": str(work / "out")}, "stages": [stage.model_dump(mode="json")]}
    result = fresh_driver(cfg)
    return {"seconds": round(result["seconds"], 3), "docs": result["rows_out"],
            "premium_rows": result["tables"].get("token_premium")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray (stage path)")
    args = parser.parse_args()

    import ray

    stage = nightly_stage()
    batch_size, num_cpus = stage.resources.batch_size, stage.resources.num_cpus
    table = demo_corpus(args.docs)
    texts = table.column("text").to_pylist()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    load_before = os.getloadavg()[0]
    rounds: dict[str, list] = {"raw_batch": [], "raw_1thread": [], "stage": []}
    for _ in range(args.repeats):  # interleaved, so load drift on a shared machine hits every path
        rounds["raw_batch"].append(raw_loop(stage.tokenizers, texts, batch_size, None))
        rounds["raw_1thread"].append(raw_loop(stage.tokenizers, texts, batch_size, 1))
        rounds["stage"].append(actor_stage_run(stage, table, batch_size, num_cpus))
    ray.shutdown()
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        e2e = e2e_run(stage, table, Path(tmp))

    n = len(texts)
    rate = {"raw_batch": n / statistics.median(rounds["raw_batch"]),
            "raw_1thread": n / statistics.median(rounds["raw_1thread"]),
            "stage_wall": n / statistics.median(s["wall"] for s in rounds["stage"]),
            "stage_steady": statistics.median(s["steady_docs"] / s["steady"] for s in rounds["stage"]),
            "stage_in_actor": n / statistics.median(s["in_actor"] for s in rounds["stage"]),
            "e2e": e2e["docs"] / e2e["seconds"]}
    save("tokenizer_stage", {
        "tokenizers": [t.name for t in stage.tokenizers], "docs": n,
        "mean_chars": round(sum(map(len, texts)) / n, 1), "batch_size": batch_size,
        "stage_num_cpus": num_cpus,
        "repeats": args.repeats,
        "seconds": {k: [round(x, 3) if isinstance(x, float) else {a: round(b, 3) for a, b in x.items()}
                        for x in v] for k, v in rounds.items()},
        "e2e": e2e, "docs_per_s": {k: round(v, 1) for k, v in rate.items()},
        "stage_vs_raw_batch_wall": round(rate["stage_wall"] / rate["raw_batch"], 3),
        "stage_vs_raw_batch_steady": round(rate["stage_steady"] / rate["raw_batch"], 3),
        "stage_vs_raw_batch_in_actor": round(rate["stage_in_actor"] / rate["raw_batch"], 3),
        "stage_vs_raw_1thread_in_actor": round(rate["stage_in_actor"] / rate["raw_1thread"], 3),
        "e2e_vs_raw_batch": round(rate["e2e"] / rate["raw_batch"], 3),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    })


if __name__ == "__main__":
    main()
