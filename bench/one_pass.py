"""One LM pass feeding every consumer vs one LM pass per consumer (what filter-per-model pipelines do).

    python -m bench.one_pass [--docs 48] [--max-tokens 256] [--repeats 2] -> bench/results/one_pass.json

In process (no Ray start noise), the same torch threads for every path, the first ``--docs`` demo
docs (``bench.lm_engine.demo_texts``), nightly.yaml's model, heads and ``scores`` settings, in
batches of the ``lm`` stage's ``batch_size``; each operator is built with
``LMStageConfig(...).build()`` / ``ScoresConfig(...).build()`` and called with ``process(table)``:

* one_pass:     ONE ``lm`` stage (every metric, heads pawn + sae), then ``scores`` on its columns;
* per_operator: one ``lm`` pass per consumer, each computing only what that consumer reads:
                PAWN (its five metrics + the pawn head, per-document scalars only), SAE (logprob +
                the sae head, scalars only), scores (logprob, entropy, rank, logp2 per position),
                then the ``scores`` stage.

Models load once per operator before the clock starts (``build_seconds``, reported apart) and
every operator gets one warm-up batch. ratio = per_operator_seconds ÷ one_pass_seconds, each the
best of ``--repeats`` interleaved rounds (on a shared machine other jobs only ever add time).
``max_abs_diff`` checks that both paths give the same PAWN and scores values.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from bench.common import save
from bench.lm_engine import demo_texts
from bench.pipeline import nightly_config
from operators.detection.pawn import METRIC_NAMES as PAWN_METRICS
from operators.lm.stage import LMStageConfig
from operators.scores import ScoresConfig

SCORES_METRICS = ["logprob", "entropy", "rank", "logp2"]


def configs(max_tokens: int, threads: int) -> tuple[dict[str, LMStageConfig], ScoresConfig]:
    """The one-pass lm stage and the three single-consumer passes, from nightly.yaml; its scores stage."""
    stages = nightly_config()["stages"]
    lm = {**next(s for s in stages if s["op"] == "lm"), "max_tokens": max_tokens, "cpu_threads": threads}
    head = {h["kind"]: h for h in lm["heads"]}
    passes = {
        "one_pass": lm,
        "pawn": {**lm, "metrics": list(PAWN_METRICS), "heads": [head["pawn"]], "keep_positions": False},
        "sae": {**lm, "metrics": ["logprob"], "heads": [head["sae"]], "keep_positions": False},
        "scores": {**lm, "metrics": SCORES_METRICS, "heads": []},
    }
    lms = {k: LMStageConfig.model_validate(v) for k, v in passes.items()}
    scores = ScoresConfig.model_validate(next(s for s in stages if s["op"] == "scores")).bind([lms["scores"]])
    return lms, scores


def run_pass(lm: Any, scores: Any | None, table: pa.Table, batch_size: int) -> tuple[float, pa.Table]:
    """Seconds for ``lm`` (then ``scores`` on its columns) over ``table`` batch by batch; the output."""
    outputs = []
    start = time.perf_counter()
    for i in range(0, table.num_rows, batch_size):
        batch = table.slice(i, batch_size)
        out = lm.process(batch)
        if scores is not None:
            out = side_by_side(out, scores.process(side_by_side(batch, out)))
        outputs.append(out)
    return time.perf_counter() - start, pa.concat_tables(outputs)


def side_by_side(a: pa.Table, b: pa.Table) -> pa.Table:
    """The columns of ``a`` then those of ``b`` (same rows)."""
    return pa.Table.from_arrays(a.columns + b.columns, names=a.column_names + b.column_names)


def max_abs_diff(a: pa.Table, b: pa.Table, columns: list[str]) -> float:
    """Largest |a - b| over float ``columns`` (nulls where both are null are equal)."""
    worst = 0.0
    for c in columns:
        x = np.array(a.column(c).to_pylist(), dtype=np.float64)
        y = np.array(b.column(c).to_pylist(), dtype=np.float64)
        worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every path")
    args = parser.parse_args()

    lm_cfgs, scores_cfg = configs(args.max_tokens, args.threads)
    batch_size = lm_cfgs["one_pass"].resources.batch_size
    table = pa.table({"text": demo_texts(args.docs)})
    built, build_seconds = {}, {}
    for name, cfg in [*lm_cfgs.items(), ("scores_stage", scores_cfg)]:
        start = time.perf_counter()
        built[name] = cfg.build()
        build_seconds[name] = round(time.perf_counter() - start, 2)
    chains = {"one_pass": ("one_pass", "scores_stage"), "pawn": ("pawn", None), "sae": ("sae", None),
              "scores": ("scores", "scores_stage")}
    for lm, sc in chains.values():  # warm-up
        run_pass(built[lm], built.get(sc), table.slice(0, 4), batch_size)
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {k: [] for k in chains}
    outputs: dict[str, pa.Table] = {}
    for _ in range(args.repeats):
        for name, (lm, sc) in chains.items():
            s, outputs[name] = run_pass(built[lm], built.get(sc), table, batch_size)
            seconds[name].append(round(s, 3))

    best = {k: min(v) for k, v in seconds.items()}
    one, per_op = best["one_pass"], best["pawn"] + best["sae"] + best["scores"]
    model = lm_cfgs["one_pass"].model.name
    n_scored = outputs["one_pass"].column(f"{model}__n_scored").to_pylist()
    tokens = sum(n + 1 for n in n_scored if n is not None)
    score_cols = [f.name for f in built["scores_stage"].output_schema()]
    pawn_col = next(f.name for f in built["pawn"].output_schema() if f.name.startswith("pawn"))
    save("one_pass", {
        "model": lm_cfgs["one_pass"].model.path, "docs": args.docs, "tokens": tokens,
        "max_tokens": args.max_tokens,
        "batch_size": batch_size, "torch_threads": args.threads, "repeats": args.repeats,
        "per_operator_passes": ["pawn", "sae", "scores"], "seconds": seconds,
        "best_seconds": {k: round(v, 3) for k, v in best.items()},
        "one_pass_seconds": round(one, 3), "per_operator_seconds": round(per_op, 3),
        "one_pass_tokens_per_s": round(tokens / one, 1),
        "per_operator_tokens_per_s": round(tokens / per_op, 1),
        "per_operator_vs_one_pass": round(per_op / one, 3),
        "build_seconds": build_seconds,
        "max_abs_diff": {"pawn": max_abs_diff(outputs["one_pass"], outputs["pawn"], [pawn_col]),
                         "scores": max_abs_diff(outputs["one_pass"], outputs["scores"], score_cols)},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    })


if __name__ == "__main__":
    main()
