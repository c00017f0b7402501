"""``curate pawn train`` and the demo PAWN head.

    curate pawn train --features features.parquet --output heads/pawn [--epochs 5]
    curate pawn train --features output/documents/run_date=2025-01-01 --model smollm2 --output heads/pawn
    curate pawn demo                       # train (or reuse) the demo head; print held-out AUROCs

``--features`` is either a PAWN feature cache (``metrics``, ``hidden``, ``label``; see
``operators/detection/pawn.py``) or a documents table of an ``lm`` stage with ``cache_hidden: [last]`` plus a
``label`` column, converted with ``--model`` naming the lm stage's model.

``prepare_demo_pawn`` trains a head on the demo corpus (human Python docs vs texts the demo model
wrote), holding out 30% (stratified, seeded), and records in ``<cache>/demo/pawn/eval.json`` the
head's held-out AUROC next to the zero-shot scores' on the same documents.
"""

from __future__ import annotations

import argparse
import json
import time

from jobs.cli.verbs import add_table_source, table_source, verb
from jobs.demo.pawn import format_demo_eval, prepare_demo_pawn
from jobs.errors import UserError
from jobs.train.pawn import load_features


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "pawn", "train PAWN heads that detect machine-written text",
             "curate pawn train --features features.parquet --output heads/pawn", "curate pawn demo")
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
    d = verb(actions, "demo", "train (or reuse) the demo head and print its held-out AUROCs",
             "curate pawn demo")
    d.set_defaults(func=demo_command)


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


def demo_command(_args: argparse.Namespace) -> int:
    path = prepare_demo_pawn()
    print(format_demo_eval(json.loads((path / "eval.json").read_text())))
    return 0
