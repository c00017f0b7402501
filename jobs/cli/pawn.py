"""``curate pawn train`` and the demo PAWN head.

    curate pawn train --features features.parquet --output heads/pawn [--epochs 5]
    curate pawn train --features output/documents/run_date=2025-01-01 --model smollm2 --output heads/pawn
    curate pawn demo                       # train (or reuse) the demo head; print held-out AUROCs

``--features`` is either a PAWN feature cache (``metrics``, ``hidden``, ``label``; see
``operators/pawn.py``) or a documents table of an ``lm`` stage with ``cache_hidden: [last]`` plus a
``label`` column, converted with ``--model`` naming the lm stage's model.

``prepare_demo_pawn`` trains a head on the demo corpus (human Python docs vs texts the demo model
wrote), holding out 30% (stratified, seeded), and records in ``<cache>/demo/pawn/eval.json`` the
head's held-out AUROC next to the zero-shot scores' on the same documents.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.cli import UserError

DEMO_MODEL = "smollm2"
DEMO_MAX_TOKENS = 256
DEMO_DOCS_PER_CLASS = 80
HOLDOUT = 0.3
ZERO_SHOT = ("ppl", "mean_entropy", "mean_log_rank", "binoculars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pawn", help="train PAWN detection heads (machine-written text)")
    actions = p.add_subparsers(dest="pawn_action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a PAWN head from cached features")
    t.add_argument("--features", required=True, help="feature cache or lm documents table (Parquet, fsspec)")
    t.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--model", help="lm model name, when --features is a documents table")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=train_command)
    d = actions.add_parser("demo", help="train (or reuse) the demo head and print held-out AUROCs")
    d.set_defaults(func=demo_command)


def load_features(url: str, model: str | None = None) -> pa.Table:
    """The feature cache at ``url``, converting an lm documents table when ``model`` is given."""
    from jobs.eval_cmd import open_dataset, read_table
    from operators.pawn import METRIC_NAMES
    from operators.pawn_head import features_from_documents

    cache = ["metrics", "hidden", "label"]
    if set(cache) <= set(open_dataset(url).schema.names):
        return read_table(url, cache)
    if not model:
        raise UserError(f"{url} is not a feature cache (metrics, hidden, label); for an lm documents "
                        "table pass --model with the lm stage's model name")
    columns = [f"{model}__{k}" for k in METRIC_NAMES] + [f"{model}__hidden_last", "label"]
    try:
        return features_from_documents(read_table(url, columns), model)
    except ValueError as err:
        raise UserError(f"{url}: {err}") from None


def train_command(args: argparse.Namespace) -> int:
    from operators.pawn import save_pawn, train_pawn

    features = load_features(args.features, args.model)
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


# ---------------------------------------------------------------------------- the demo head


def stratified_holdout(labels: np.ndarray, fraction: float = HOLDOUT, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out rows: round(fraction · n_c) of each class c, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held[rng.permutation(rows)[: round(fraction * len(rows))]] = True
    return held


def demo_documents(corpus: Path, per_class: int = DEMO_DOCS_PER_CLASS) -> pa.Table:
    """The first ``per_class`` human (label 0) and machine-written (label 1) English docs, by id."""
    import polars as pl

    frame = (pl.read_parquet(corpus / "*.parquet")
             .filter(pl.col("source").is_in(["python-docs", "smollm2-generated"]))
             .sort("id").group_by("label", maintain_order=True).head(per_class).sort("label", "id"))
    return frame.select("id", "text", "label").to_arrow()


def score_documents(docs: pa.Table, model_dir: Path, max_tokens: int, batch_rows: int = 16,
                    log: Any = print) -> pa.Table:
    """Run the lm operator (last hidden state cached) and the scores operator over ``docs`` in-process."""
    from operators.lm.stage import LMStageConfig
    from operators.scores import ScoresConfig

    lm = LMStageConfig(model={"name": DEMO_MODEL, "path": str(model_dir)}, max_tokens=max_tokens,
                       cache_hidden=["last"]).build()
    scores = ScoresConfig(model=DEMO_MODEL, zlib=False).build()
    parts, start = [], time.perf_counter()
    for first in range(0, docs.num_rows, batch_rows):
        batch = docs.slice(first, batch_rows)
        cols = lm.process(batch)
        for name in cols.column_names:
            batch = batch.append_column(cols.field(name), cols.column(name))
        cols = scores.process(batch)
        for name in cols.column_names:
            batch = batch.append_column(cols.field(name), cols.column(name))
        parts.append(batch)
        log(f"demo pawn: scored {min(first + batch_rows, docs.num_rows)}/{docs.num_rows} docs "
            f"({time.perf_counter() - start:.0f} s)")
    return pa.concat_tables(parts)


def heldout_eval(head: Any, test_features: pa.Table, scored_test: pa.Table) -> dict[str, dict]:
    """AUROC etc. of PAWN and of every zero-shot score present, on the same held-out documents."""
    from jobs.evaluate import evaluate_score
    from operators.pawn import pad_batch, read_features

    metrics, hidden, labels = read_features(test_features)
    probs = []
    for first in range(0, len(metrics), 16):
        batch = pad_batch(metrics[first:first + 16], hidden[first:first + 16])
        probs += head.predict_proba(*batch).tolist()
    y = scored_test.column("label").to_numpy().astype(int)
    if not np.array_equal(labels.astype(int), y):
        raise RuntimeError("feature rows and scored rows are not aligned")
    results = {"pawn_score": evaluate_score("pawn_score", probs, y)[0].as_dict()}
    for name in ZERO_SHOT:
        column = f"{DEMO_MODEL}__{name}"
        if column in scored_test.column_names:
            values = scored_test.column(column).cast(pa.float64()).fill_null(float("nan")).to_numpy()
            results[column] = evaluate_score(column, values, y)[0].as_dict()
    return results


def prepare_demo_pawn(cache: Path | None = None, log: Any = print, seed: int = 0,
                      per_class: int = DEMO_DOCS_PER_CLASS, epochs: int = 5) -> Path:
    """Train (once) a PAWN head on the demo corpus; return ``<cache>/demo/pawn`` (head + eval.json)."""
    from jobs.demo_assets import build_demo_asset
    from operators.pawn import save_pawn

    def build(tmp: Path, model_dir: Path, corpus: Path) -> dict:
        start = time.perf_counter()
        report = _train_demo(model_dir, corpus, seed, per_class, epochs, log)
        report["seconds"] = round(time.perf_counter() - start, 1)
        save_pawn(report.pop("head"), str(tmp))
        (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        return {"seed": seed, "per_class": per_class, "epochs": epochs}

    out = build_demo_asset("pawn", build, cache, log)
    log(format_demo_eval(json.loads((out / "eval.json").read_text())))
    return out


def _train_demo(model_dir: Path, corpus: Path, seed: int, per_class: int, epochs: int,
                log: Any) -> dict:
    from operators.pawn import train_pawn
    from operators.pawn_head import features_from_documents

    docs = demo_documents(corpus, per_class)
    held = stratified_holdout(docs.column("label").to_numpy(), HOLDOUT, seed)
    log(f"demo pawn: {docs.num_rows} docs ({int(held.sum())} held out), scoring with {model_dir.name} "
        f"(max {DEMO_MAX_TOKENS} tokens)")
    scored = score_documents(docs, model_dir, DEMO_MAX_TOKENS, log=log)
    train, test = scored.filter(pa.array(~held)), scored.filter(pa.array(held))
    head, history = train_pawn(features_from_documents(train, DEMO_MODEL), epochs=epochs, seed=seed)
    log(f"demo pawn: trained {epochs} epochs, last train loss {history[-1]['loss']:.3f}")
    results = heldout_eval(head, features_from_documents(test, DEMO_MODEL), test)
    return {"head": head, "model": str(model_dir), "max_tokens": DEMO_MAX_TOKENS, "seed": seed,
            "n_train": train.num_rows, "n_test": test.num_rows, "history": history,
            "heldout": results}


def format_demo_eval(report: dict) -> str:
    """Held-out AUROC of PAWN and the zero-shot scores, best first."""
    rows = [f"demo PAWN head: {report['n_train']} train / {report['n_test']} held-out docs "
            f"(max {report['max_tokens']} tokens)",
            f"{'score':<28}{'direction':>10}{'AUROC':>8}{'TPR@5%FPR':>11}"]
    for r in sorted(report["heldout"].values(), key=lambda r: -r["auroc"]):
        rows.append(f"{r['score']:<28}{r['direction']:>10}{r['auroc']:>8.3f}{r['tpr_at_fpr']:>11.3f}")
    return "\n".join(rows)
