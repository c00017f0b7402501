"""``python -m jobs.demo``: the offline demo, beside the product.

    python -m jobs.demo [--pipeline]     # the demo model and corpus (+ everything nightly.yaml reads)
    python -m jobs.demo freq             # the demo DC-PDD frequency table; prints its path
    python -m jobs.demo pawn             # the demo PAWN head; prints its held-out AUROCs
    python -m jobs.demo eval-selection [--skip-first 1] [--max-tokens 256] [--json]   # the demo task
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from jobs.demo.assets import prepare_demo_assets
from jobs.demo.cache import DemoAssetError, Log, free_threads, torch_threads


def prepare_pipeline_assets(cache: Path | None = None, log: Log = print) -> dict[str, Path]:
    """Everything ``pipelines/nightly.yaml`` reads, each built once and cached: the DC-PDD frequency
    table, the PAWN head, the PreSelect scorer (from its model family), the SAE and the selection
    target. The first build takes minutes on 2 CPUs (it trains the small models); later runs reuse."""
    from jobs.demo.freq import prepare_demo_freq
    from jobs.demo.pawn import prepare_demo_pawn
    from jobs.demo.preselect import prepare_demo_preselect
    from jobs.demo.sae import prepare_demo_sae
    from jobs.demo.selection import build_demo_selection_pool

    threads = free_threads()
    log(f"demo: building the pipeline assets with {threads} torch thread(s) (the cores free now)")
    with torch_threads(threads):
        return {"freq": prepare_demo_freq(cache, log), "pawn": timed(prepare_demo_pawn, cache, log),
                "preselect": timed(prepare_demo_preselect, cache, log), "sae": timed(prepare_demo_sae, cache, log),
                "selection target": build_demo_selection_pool(cache, log)[1]}


def timed(prepare: Callable[[Path | None, Log], Path], cache: Path | None, log: Log) -> Path:
    """``prepare(cache, log)``, saying how long it took."""
    start = time.perf_counter()
    out = prepare(cache, log)
    log(f"demo: {prepare.__name__} done in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.demo [--pipeline] [freq | pawn | eval-selection]``: prepare the demo, saying what is done."""
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=main.__doc__)
    parser.add_argument("--pipeline", action="store_true",
                        help="also build what pipelines/nightly.yaml reads (trained heads, tables)")
    sub = parser.add_subparsers(dest="what", metavar="ASSET")
    sub.add_parser("freq", help="build (or reuse) the demo DC-PDD frequency table; print its path")
    sub.add_parser("pawn", help="train (or reuse) the demo PAWN head; print its held-out AUROCs")
    sel = sub.add_parser("eval-selection", help="precision@n of SAE, cosine and BM25 on the demo task")
    sel.add_argument("--skip-first", type=int, default=0, help="leading tokens left out of the SAE mean")
    sel.add_argument("--max-tokens", type=int, default=256, help="tokens per text (default 256)")
    sel.add_argument("--n", type=float, default=0.05, help="fraction of the pool (< 1) or a count")
    sel.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        if args.what:
            print(run_one(args))
            return
        assets = prepare_demo_assets()
        extra = prepare_pipeline_assets() if args.pipeline else {}
    except DemoAssetError as err:
        sys.exit(f"demo assets: error: {err}")
    print(f"demo assets ready:\n  model    {assets.model_dir}\n  corpus   {assets.corpus_dir}\n"
          f"  parallel {assets.parallel_dir}")
    for name, path in extra.items():
        print(f"  {name:<8} {path}")


def run_one(args: argparse.Namespace) -> str:
    """Build (or reuse) one demo asset and say what it holds."""
    if args.what == "freq":
        from jobs.demo.freq import prepare_demo_freq

        return str(prepare_demo_freq())
    if args.what == "pawn":
        from jobs.demo.pawn import format_demo_eval, prepare_demo_pawn

        return format_demo_eval(json.loads((prepare_demo_pawn() / "eval.json").read_text()))
    from jobs.demo.selection import demo_eval_selection

    result = demo_eval_selection(args.skip_first, args.max_tokens, args.n)
    return json.dumps(asdict(result), indent=2) if args.json else result.table()
