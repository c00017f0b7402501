"""How well does a score separate positives from negatives? AUROC, TPR at low FPR, balanced accuracy.

Pure functions over a score vector s and binary labels y (1 = positive: a member of the training
data, or machine-written). ``direction`` says which way the score points:

* ``higher``: a document is called positive when s ≥ t;
* ``lower``:  when s ≤ t (the score is negated, -s ≥ -t, and the same formulas apply).

For a threshold t, TPR(t) = |{s_i ≥ t, y_i = 1}| / P and FPR(t) = |{s_i ≥ t, y_i = 0}| / N.

* ``auroc``            P(s⁺ > s⁻) + ½·P(s⁺ = s⁻) over all positive/negative pairs (Mann-Whitney U / (P·N));
                       ties count one half, so a constant score has AUROC 0.5.
* ``roc_curve``        (FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); tied scores
                       move together (one diagonal step), never one document at a time.
* ``tpr_at_fpr``       max TPR over the curve's points with FPR ≤ α (no interpolation: a threshold
                       you could actually use). α = 0.05 by default.
* ``best_balanced_accuracy``  max_t ½·(TPR(t) + 1 - FPR(t)).

``evaluate_score`` reports every metric in the score's own direction, fixed before the labels are
seen: given, or from the registry of score definitions (``operators.scores.SCORE_DIRECTIONS``). A
score worse than chance therefore shows AUROC < 0.5. ``best=True`` (``--best-direction``) instead
picks the direction whose AUROC is ≥ 0.5 after looking at the labels: exploratory only, and
labelled so. Missing scores (null/NaN) are left out and counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import ArrayLike

from operators.scores import score_direction

#: The false-positive rate at which ``evaluate_score`` reports the TPR.
DEFAULT_FPR = 0.05


def _check(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) have different lengths")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; drop missing scores first")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need at least one positive and one negative label")
    return s, y


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order; tied values share their average rank."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]                       # exclusive
    avg = (starts + 1 + ends) / 2.0                         # mean of ranks starts+1 … ends
    ranks = np.empty(v.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """AUROC = (R⁺ - P(P+1)/2) / (P·N), R⁺ = sum of the positives' average ranks (ties count ½)."""
    s, y = _check(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    r_pos = float(average_ranks(s)[y].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), calling s ≥ t positive; thresholds descend from +inf (the (0, 0) point)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]   # a threshold after each tie group
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr: ArrayLike, tpr: ArrayLike, max_fpr: float = DEFAULT_FPR) -> float:
    """max TPR over ROC points with FPR ≤ ``max_fpr`` (the (0, 0) point makes this ≥ 0)."""
    f, t = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    ok = f <= max_fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def best_balanced_accuracy(fpr: ArrayLike, tpr: ArrayLike) -> float:
    """max over thresholds of ½·(TPR + 1 - FPR); 0.5 for an uninformative score."""
    f, t = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(((t + 1.0 - f) / 2.0).max())


@dataclass(frozen=True)
class ScoreEval:
    """One score's separation of the labels, in its direction."""

    score: str
    direction: str          # "higher" or "lower" means positive
    auroc: float
    tpr_at_fpr: float       # TPR at FPR ≤ ``fpr``
    fpr: float
    balanced_accuracy: float
    n_pos: int
    n_neg: int
    n_missing: int          # rows whose score was null/NaN (left out)
    direction_from: str = "registry"  # "registry", "given", or "best (exploratory)": chosen after the labels

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_score(name: str, scores: ArrayLike, labels: ArrayLike, max_fpr: float = DEFAULT_FPR,
                   direction: str | None = None,
                   best: bool = False) -> tuple[ScoreEval, tuple[np.ndarray, np.ndarray]]:
    """Metrics of one score and its ROC curve (fpr, tpr) in its direction: ``direction`` if given,
    else the registered one (``score_direction(name)``; ValueError if there is none). AUROC may be
    below 0.5. ``best=True`` is the exploratory alternative: the direction with AUROC ≥ 0.5."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"{name}: scores ({s.size}) and labels ({y.size}) have different lengths")
    if best:
        source = "best (exploratory)"
    elif direction is not None:
        source = "given"
    else:
        direction, source = score_direction(name), "registry"
        if direction is None:
            raise ValueError(f"{name}: no registered direction; give one (--direction {name}=higher|lower) "
                             "or use --best-direction (exploratory)")
    if not best and direction not in ("higher", "lower"):
        raise ValueError(f"{name}: direction must be 'higher' or 'lower', not {direction!r}")
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    area = auroc(s, y)
    if best:
        direction = "higher" if area >= 0.5 else "lower"
    if direction == "lower":
        s, area = -s, 1.0 - area
    fpr, tpr, _ = roc_curve(s, y)
    result = ScoreEval(name, direction, area, tpr_at_fpr(fpr, tpr, max_fpr), max_fpr,
                       best_balanced_accuracy(fpr, tpr), int((y == 1).sum()), int((y == 0).sum()),
                       int((~ok).sum()), source)
    return result, (fpr, tpr)


def score_columns(schema: pa.Schema, label: str = "label", directions: dict[str, str] | None = None,
                  best: bool = False) -> list[str]:
    """The default scores to evaluate: floating-point columns other than the label that have a
    direction (given or registered); with ``best``, every floating-point column."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type) and f.name != label]
    return [c for c in floats if best or c in (directions or {}) or score_direction(c) is not None]


def evaluate_table(table: pa.Table, scores: list[str] | None = None, label: str = "label",
                   max_fpr: float = DEFAULT_FPR, directions: dict[str, str] | None = None,
                   best: bool = False) -> tuple[list[ScoreEval], dict]:
    """``evaluate_score`` for each score column of ``table`` against ``label`` (rows without a label
    are left out), each in its given (``directions``) or registered direction, or with ``best`` the
    exploratory best one. Returns the results and the ROC curves by score name."""
    directions = directions or {}
    if label not in table.column_names:
        raise ValueError(f"no {label!r} column (1 = member / machine-written, 0 = not)")
    scores = scores or score_columns(table.schema, label, directions, best)
    missing = [c for c in scores if c not in table.column_names]
    if missing:
        raise ValueError(f"score columns not found: {missing}; have {table.column_names}")
    if not scores:
        raise ValueError("no score columns (floating-point columns other than the label with a registered "
                         "or given direction)")
    table = table.filter(pc.is_valid(table.column(label)))
    y = table.column(label).to_numpy(zero_copy_only=False).astype(np.int64)
    results, curves = [], {}
    for name in scores:
        col = table.column(name).cast(pa.float64()).fill_null(math.nan)
        result, curve = evaluate_score(name, col.to_numpy(zero_copy_only=False), y, max_fpr,
                                       directions.get(name), best)
        results.append(result)
        curves[name] = curve
    return results, curves


def format_results(results: list[ScoreEval]) -> str:
    """A fixed-width table, best AUROC first."""
    if not results:
        return "(no scores)"
    fpr = results[0].fpr
    head = (f"{'score':<28}{'direction':>10}{'AUROC':>8}{f'TPR@{fpr:.0%}FPR':>14}"
            f"{'bal.acc':>9}{'pos':>6}{'neg':>6}{'missing':>9}")
    rows = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: -r.auroc):
        mark = "*" if r.direction_from.startswith("best") else " "
        rows.append(f"{r.score:<28}{r.direction + mark:>10}{r.auroc:>8.3f}{r.tpr_at_fpr:>14.3f}"
                    f"{r.balanced_accuracy:>9.3f}{r.n_pos:>6}{r.n_neg:>6}{r.n_missing:>9}")
    if any(r.direction_from.startswith("best") for r in results):
        rows.append("* EXPLORATORY: direction picked after seeing the labels (--best-direction); "
                    "AUROC is never below 0.5 this way")
    return "\n".join(rows)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], results: list[ScoreEval],
             path: str | Path, title: str = "ROC") -> Path:
    """One ROC curve per score (legend: AUROC and direction), the chance diagonal; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.score: r for r in results}
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (fpr, tpr) in curves.items():
        r = by_name[name]
        ax.plot(fpr, tpr, label=f"{name} ({r.direction}, AUROC {r.auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

