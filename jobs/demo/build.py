"""``python -m jobs.demo [--pipeline]``: prepare the demo model and corpus, and (with ``--pipeline``) everything ``pipelines/nightly.yaml`` reads."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
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
    """``python -m jobs.demo [--pipeline]``: prepare the demo, saying what is done."""
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=main.__doc__)
    parser.add_argument("--pipeline", action="store_true",
                        help="also build what pipelines/nightly.yaml reads (trained heads, tables)")
    args = parser.parse_args(argv)
    try:
        assets = prepare_demo_assets()
        extra = prepare_pipeline_assets() if args.pipeline else {}
    except DemoAssetError as err:
        sys.exit(f"demo assets: error: {err}")
    print(f"demo assets ready:\n  model    {assets.model_dir}\n  corpus   {assets.corpus_dir}\n"
          f"  parallel {assets.parallel_dir}")
    for name, path in extra.items():
        print(f"  {name:<8} {path}")
