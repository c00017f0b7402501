"""``curate eval-selection``: precision@n of SAE Jaccard, hidden-state cosine and BM25 on a labelled pool.

    curate eval-selection --pool POOL.parquet --target TARGET.parquet --model MODEL_DIR \\
        --sae SAE_DIR --layer 15 [--n 0.05] [--max-tokens 256] [--bm25 max|concat]

POOL needs ``text`` and ``label`` (1 = an example of the target task); TARGET needs ``text``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import pyarrow.parquet as pq

from jobs.cli.verbs import verb
from jobs.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "eval-selection", "precision@n of SAE, cosine and BM25 selection",
             "curate eval-selection --pool pool.parquet --target target.parquet --model MODEL_DIR "
             "--sae SAE_DIR --layer 15")
    p.add_argument("--pool", help="Parquet with text, label (1 = target task)")
    p.add_argument("--target", help="Parquet with text: examples of the target task")
    p.add_argument("--model", help="HF model dir")
    p.add_argument("--sae", help="SAE dir (sparsify layers.<L>/ or flat; SAELens)")
    p.add_argument("--layer", type=int, help="HF hidden_states index the SAE reads")
    p.add_argument("--n", type=float, default=0.05, help="fraction of the pool (< 1) or a count (default 0.05)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--bm25", choices=["max", "concat"], default="max", help="BM25 query mode (default max)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--skip-first", type=int, default=0,
                   help="leading tokens left out of the SAE mean (default 0: all, as MoNA; 1: the attention sink)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=eval_selection_command)


def eval_selection_command(args: argparse.Namespace) -> int:
    from jobs.eval.selection import evaluate_selection

    missing = [f"--{k}" for k in ("pool", "target", "model", "sae", "layer") if getattr(args, k) is None]
    if missing:
        raise UserError(f"eval-selection needs {', '.join(missing)}")
    try:
        pool, target = pq.read_table(args.pool), pq.read_table(args.target)
        for name, table, cols in (("pool", pool, ("text", args.label_column)), ("target", target, ("text",))):
            absent = [c for c in cols if c not in table.column_names]
            if absent:
                raise ValueError(f"{name} {getattr(args, name)}: missing column(s) {absent}")
        result = evaluate_selection(pool, target, args.model, args.sae, args.layer, n=args.n,
                                    max_tokens=args.max_tokens, bm25_mode=args.bm25,
                                    label_column=args.label_column, skip_first=args.skip_first)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    print(json.dumps(asdict(result), indent=2) if args.json else result.table())
    return 0
