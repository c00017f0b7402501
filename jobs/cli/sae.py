"""``curate sae train``: train a TopK SAE on an LM's layer-L residual stream; the demo SAE.

    curate sae train --input CORPUS --model MODEL_DIR --layer 15 --output DIR [--d-sae 2304 --k 32]

1. Read the texts of a Parquet corpus (file, directory or fsspec URL), shuffled with ``--seed``.
2. Run them through the LM engine (``TorchEngine``, documents cut at ``--max-tokens``) and keep the
   layer-L states of the positions the SAE head pools (t ≥ ``--skip-first``), up to ``--max-rows``.
3. Train a TopK SAE (``operators.sae.train_topk_sae``) and save it in the sparsify layout under
   ``DIR/layers.<L>/`` (``cfg.json``, ``sae.safetensors``, plus ``train_stats.json``).
4. Print the held-out FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² and the share of dead latents.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.cli import UserError

Log = Callable[[str], Any]

DEMO_LAYER = 15
DEMO_D_SAE = 4 * 576
DEMO_K = 32


@dataclass(frozen=True)
class TrainSettings:
    """What ``train_sae`` does: data collection and SAE hyper-parameters."""

    layer: int
    d_sae: int = DEMO_D_SAE
    k: int = DEMO_K
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    max_rows: int = 50_000
    max_tokens: int = 256
    skip_first: int = 1
    seed: int = 0
    text_column: str = "text"


@dataclass(frozen=True)
class TrainReport:
    """Where the SAE went and how good it is."""

    path: Path
    fvu: float
    dead_fraction: float
    n_train: int
    n_valid: int
    n_texts: int
    seconds_collect: float
    seconds_train: float

    def summary(self) -> str:
        return (f"SAE saved to {self.path}\n"
                f"  activations: {self.n_train} train + {self.n_valid} held-out tokens from {self.n_texts} texts "
                f"({self.seconds_collect:.1f} s); training {self.seconds_train:.1f} s\n"
                f"  held-out FVU {self.fvu:.4f}   dead latents {100 * self.dead_fraction:.1f}%")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders for SAE selection")
    ssub = p.add_subparsers(dest="sae_command", required=True, metavar="SUBCOMMAND")
    t = ssub.add_parser("train", help="train a TopK SAE on a model's layer-L residual stream")
    t.add_argument("--input", required=True, help="Parquet corpus (file, dir or fsspec URL)")
    t.add_argument("--model", required=True, help="HF model dir (or .gguf / Hub id)")
    t.add_argument("--layer", required=True, type=int, help="HF hidden_states index")
    t.add_argument("--output", required=True, help="directory; the SAE goes to OUTPUT/layers.<L>/")
    defaults = TrainSettings(layer=0)
    for flag, kind in (("d_sae", int), ("k", int), ("epochs", int), ("lr", float), ("batch_size", int),
                       ("max_rows", int), ("max_tokens", int), ("skip_first", int), ("seed", int),
                       ("text_column", str)):
        t.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=getattr(defaults, flag),
                       help=f"default {getattr(defaults, flag)}")
    t.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    settings = TrainSettings(args.layer, args.d_sae, args.k, args.epochs, args.lr, args.batch_size,
                             args.max_rows, args.max_tokens, args.skip_first, args.seed, args.text_column)
    try:
        report = train_sae(args.input, args.model, args.output, settings)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    print(report.summary())
    return 0


def train_sae(input_url: str, model: str, output: str | Path, s: TrainSettings, log: Log = print) -> TrainReport:
    """Collect activations through the LM engine, train, save (sparsify layout), report."""
    import torch

    from operators.sae import save_sparsify, train_topk_sae
    from operators.sae_head import collect_activations, open_engine
    from operators.sae_select import read_texts

    texts = read_texts(input_url, s.text_column)
    random.Random(s.seed).shuffle(texts)
    start = time.perf_counter()
    engine = open_engine(model, s.layer, max_tokens=s.max_tokens)
    log(f"sae train: collecting up to {s.max_rows} layer-{s.layer} activations from {len(texts)} texts")
    acts = collect_activations(engine, texts, s.layer, s.max_rows, s.skip_first)
    del engine
    collected = time.perf_counter() - start
    log(f"sae train: {acts.shape[0]} activations [{acts.shape[1]}] in {collected:.1f} s; "
        f"training d_sae={s.d_sae} k={s.k} for {s.epochs} epochs")
    start = time.perf_counter()
    sae, stats = train_topk_sae(acts, s.d_sae, s.k, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                                seed=s.seed)
    trained = time.perf_counter() - start
    path = save_sparsify(sae, output, layer=s.layer)
    report = TrainReport(path, stats.fvu, stats.dead_fraction, stats.n_train, stats.n_valid, len(texts),
                         round(collected, 1), round(trained, 1))
    meta = {**{k: v for k, v in asdict(report).items() if k != "path"},
            "settings": asdict(s), "input": str(input_url), "model": str(model), "torch": torch.__version__}
    (path / "train_stats.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report


def prepare_demo_sae(cache: Path | None = None, log: Log = print) -> Path:
    """Train (once, cached at ``<cache>/demo/sae/``) a TopK SAE on the demo model's layer 15 from the
    demo corpus: d_sae = 4 · 576, k = 32; returns the directory (the SAE is in ``layers.15/``)."""
    from jobs.demo_assets import build_demo_asset

    settings = TrainSettings(layer=DEMO_LAYER, epochs=10, max_rows=32_768, max_tokens=128)

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        report = train_sae(str(corpus), str(model), tmp, settings, log)
        log(f"demo SAE: held-out FVU {report.fvu:.4f}, dead latents {100 * report.dead_fraction:.1f}%")
        return {"settings": asdict(settings)}

    return build_demo_asset("sae", build, cache, log)
