"""The demo PAWN head: trained on the demo corpus's human and machine-written docs, evaluated on a held-out split."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.demo.assets import build_demo_asset
from jobs.demo.constants import DEMO_DOCS_PER_CLASS, DEMO_MAX_TOKENS, DEMO_MODEL
from jobs.demo.lmpass import prepare_demo_lmpass

HOLDOUT = 0.3
ZERO_SHOT = ("ppl", "mean_entropy", "mean_log_rank", "binoculars")
#: 2: trained with the real h_{t+1} of the last row (the engine keeps the last token's state).
#: 3: features from the shared demo lm pass (``jobs.demo.lmpass``; the corpus's machine docs are vLLM's).
ASSET_VERSION = 3


# ---------------------------------------------------------------------------- the demo head


def stratified_holdout(labels: np.ndarray, fraction: float = HOLDOUT, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out rows: round(fraction · n_c) of each class c, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held[rng.permutation(rows)[: round(fraction * len(rows))]] = True
    return held


def heldout_eval(head: Any, test_features: pa.Table, scored_test: pa.Table) -> dict[str, dict]:
    """AUROC etc. of PAWN and of every zero-shot score present, on the same held-out documents."""
    from jobs.eval.roc import evaluate_score
    from operators.detection.features import read_features
    from operators.detection.pawn import pad_batch

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


def prepare_demo_pawn(cache: Path | None = None, log: Any = print, seed: int = 0, epochs: int = 5) -> Path:
    """Train (once) a PAWN head on the demo corpus's PAWN documents (``demo_documents``, scored by the
    shared lm pass); return ``<cache>/demo/pawn`` (head + eval.json)."""
    from operators.detection.pawn import save_pawn

    def build(tmp: Path, model_dir: Path, corpus: Path) -> dict:
        start = time.perf_counter()
        scored = pq.read_table(prepare_demo_lmpass(cache, log) / "pawn.parquet")
        report = _train_demo(model_dir, scored, seed, epochs, log)
        report["seconds"] = round(time.perf_counter() - start, 1)
        save_pawn(report.pop("head"), str(tmp))
        (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        return {"seed": seed, "per_class": DEMO_DOCS_PER_CLASS, "epochs": epochs}

    out = build_demo_asset("pawn", build, cache, log, ASSET_VERSION)
    log(format_demo_eval(json.loads((out / "eval.json").read_text())))
    return out


def _train_demo(model_dir: Path, scored: pa.Table, seed: int, epochs: int, log: Any) -> dict:
    """Train on the scored PAWN documents (``demo_documents`` + the lm and scores columns) but a
    stratified held-out share, and evaluate there."""
    from operators.detection.features import features_from_documents
    from operators.detection.train import train_pawn

    held = stratified_holdout(scored.column("label").to_numpy(), HOLDOUT, seed)
    log(f"demo pawn: {scored.num_rows} docs ({int(held.sum())} held out), scored by {model_dir.name} "
        f"(max {DEMO_MAX_TOKENS} tokens)")
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
