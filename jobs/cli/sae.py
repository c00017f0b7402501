"""``curate sae train``: train a TopK SAE on an LM's layer-L residual stream; the demo SAE.

    curate sae train --input CORPUS --model MODEL_DIR --layer 15 --output DIR [--d-sae 2304 --k 32]

1. Read the texts of a Parquet corpus (file, directory or fsspec URL), shuffled with ``--seed``.
2. Run them through the LM engine (the torch backend for a model path; documents cut at ``--max-tokens``) and keep the
   layer-L states of the positions the SAE head pools (t ≥ ``--skip-first``), up to ``--max-rows``.
3. Train a TopK SAE (``operators.sae.train_topk_sae``) and save it in the sparsify layout under
   ``DIR/layers.<L-1>/`` (sparsify names the output of block L-1, HF hidden_states[L]; ``cfg.json``, ``sae.safetensors``, plus ``train_stats.json``).
4. Print the held-out FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² and the share of dead latents.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from jobs.cli.verbs import verb
from jobs.errors import UserError
from jobs.train.sae import TrainSettings, train_sae

Log = Callable[[str], Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "sae", "train sparse autoencoders for SAE selection",
             "curate sae train --input corpus/ --model MODEL_DIR --layer 15 --output sae/")
    ssub = p.add_subparsers(dest="sae_command", required=True, metavar="SUBCOMMAND")
    t = verb(ssub, "train", "train a TopK SAE on one layer of a model's residual stream",
             "curate sae train --input corpus/ --model MODEL_DIR --layer 15 --output sae/")
    t.add_argument("--input", required=True, help="Parquet corpus (file, dir or fsspec URL)")
    t.add_argument("--model", required=True, help="HF model dir (or .gguf / Hub id)")
    t.add_argument("--layer", required=True, type=int, help="HF hidden_states index, 0 ≤ L < number of blocks")
    t.add_argument("--output", required=True, help="directory; the SAE goes to OUTPUT/layers.<L-1>/ (sparsify: output of block L-1)")
    defaults = TrainSettings(layer=0)
    for flag, kind in (("d_sae", int), ("k", int), ("epochs", int), ("lr", float), ("batch_size", int),
                       ("max_rows", int), ("max_tokens", int), ("skip_first", int), ("seed", int),
                       ("text_column", str)):
        default = getattr(defaults, flag)
        t.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default,
                       help=f"default {default if default is not None else '4 × the model width'}")
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
