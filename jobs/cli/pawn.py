"""``curate pawn train``: a PAWN head from cached features or lm documents.

    curate pawn train --features features.parquet --output heads/pawn [--epochs 5]
    curate pawn train --features output/documents/run_date=2025-01-01 --model smollm2 --output heads/pawn

``--features`` is either a PAWN feature cache (``metrics``, ``hidden``, ``label``; see
``operators/detection/pawn.py``) or a documents table of an ``lm`` stage with ``cache_hidden: [last]`` plus a
``label`` column, converted with ``--model`` naming the lm stage's model."""

from __future__ import annotations

import argparse
import time

from jobs.cli.verbs import add_table_source, table_source, verb
from jobs.errors import UserError
from jobs.train.pawn import load_features


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "pawn", "train PAWN heads that detect machine-written text",
             "curate pawn train --features features.parquet --output heads/pawn")
    actions = p.add_subparsers(dest="pawn_action", required=True, metavar="ACTION")
    t = verb(actions, "train", "train a PAWN head from cached features or lm documents",
             "curate pawn train --features features.parquet --output heads/pawn --epochs 5")
    t.add_argument("--features", required=True, help="feature cache or lm documents table (Parquet, fsspec; "
                   "or a committed table <output>/documents[/run_date=D])")
    add_table_source(t)
    t.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--model", help="lm model name, when --features is a documents table")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    from operators.detection.pawn import save_pawn
    from operators.detection.train import train_pawn
    from pipelines.io import InputError

    try:
        features = load_features(args.features, args.model, table_source(args))
    except InputError as err:
        raise UserError(str(err)) from None
    start = time.perf_counter()
    try:
        head, history = train_pawn(features, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                   seed=args.seed)
    except ValueError as err:
        raise UserError(f"{args.features}: {err}") from None
    save_pawn(head, args.output)
    for row in history:
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f}  train accuracy {row['accuracy']:.3f}")
    print(f"PAWN head ({features.num_rows} docs, H = {head.config.hidden_size}) saved to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
