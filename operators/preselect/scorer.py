"""The PreSelect fastText scorer: train it on labelled documents, load it (path or fsspec URL), score texts."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fasttext
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from operators import cache as model_cache
from operators.preselect.math import NEGATIVE_LABEL, POSITIVE_LABEL, normalize_for_fasttext

# ---------------------------------------------------------------------------------------------
# fastText scorer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerTrainReport:
    """Result of ``train_scorer``; precision and recall are for label 1 on the held-out split
    (NaN when undefined: no valid examples, no predicted positives or no true positives)."""

    model_path: str
    n_train: int
    n_valid: int
    precision: float
    recall: float


def train_scorer(
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    out_path: str | os.PathLike,
    *,
    epoch: int = 3,
    lr: float = 0.1,
    word_ngrams: int = 2,
    dim: int = 100,
    bucket: int = 2_000_000,
    min_count: int = 1,
    seed: int = 0,
    thread: int = 1,
    valid_fraction: float = 0.1,
) -> ScorerTrainReport:
    """Train a fastText classifier for P(label 1 | text) and save it to ``out_path``.

    Examples are shuffled with ``seed`` and the last ``round(valid_fraction · n)`` are held
    out. fastText's Hogwild training is only reproducible with ``thread=1`` (the default);
    more threads train faster but not bit-for-bit identically. ``bucket`` sizes the hashed
    n-gram table (the input matrix has n_words + bucket rows of ``dim`` floats: 2M × 100 is
    800 MB, keep it small for tests).

    precision = TP / (TP + FP), recall = TP / (TP + FN), predicting 1 when P(label 1) ≥ 0.5.
    """
    labels = np.asarray(labels).astype(np.int64)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_valid = round(valid_fraction * len(order))
    train_idx, valid_idx = order[: len(order) - n_valid], order[len(order) - n_valid :]
    if len({int(labels[i]) for i in train_idx}) < 2:
        raise ValueError("the training split needs both labels")

    with tempfile.TemporaryDirectory() as tmp:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as f:
            for i in train_idx:
                f.write(f"__label__{labels[i]} {normalize_for_fasttext(texts[i])}\n")
        model = fasttext.train_supervised(
            input=train_file, epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim, bucket=bucket,
            minCount=min_count, seed=seed, thread=thread, verbose=0,
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(out_path))

    precision = recall = math.nan
    if valid_idx:
        y = labels[valid_idx] == 1
        pred = score_texts(model, [texts[i] for i in valid_idx]) >= 0.5
        tp = int((pred & y).sum())
        precision = tp / int(pred.sum()) if pred.any() else math.nan
        recall = tp / int(y.sum()) if y.any() else math.nan
    return ScorerTrainReport(str(out_path), len(train_idx), len(valid_idx), precision, recall)


def load_scorer(path_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """Load a fastText ``.bin`` from a local path or any fsspec URL (s3://, gs://, memory://, …).

    fastText only reads local files, so a remote model is first copied to
    ``cache_dir / sha256(url)[:16].bin`` (default ``$CURATE_CACHE_DIR/fasttext`` or
    ``~/.cache/curate/fasttext``) via a temp file and an atomic rename; a cached copy is
    reused, keyed by URL only (a changed remote object under the same URL is not refetched).
    """
    url = os.fspath(path_or_url)
    fs, fs_path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return fasttext.load_model(fs_path)

    local = model_cache.fetch_atomic(
        fs, fs_path, model_cache.cache_dir("fasttext", cache_dir) / f"{model_cache.url_key(url)}.bin")
    return fasttext.load_model(str(local))


def score_texts(model, texts: Sequence[str]) -> np.ndarray:
    """P(__label__1 | text) for each text, as float64 in [0, 1].

    Texts are normalised with ``normalize_for_fasttext`` and predicted with the list form
    ``model.predict(list, k=-1)`` (the single-string form breaks with fastText 0.9.3 on
    NumPy 2). The model's labels must be exactly {__label__0, __label__1}, in any order.
    fastText's probabilities can exceed 1 by ~1e-5, so they are clipped to [0, 1]. A text
    for which fastText returns no prediction (no tokens, e.g. "") scores NaN.
    """
    return score_normalized(model, [normalize_for_fasttext(t) for t in texts])


def score_normalized(model, lines: Sequence[str]) -> np.ndarray:
    """``score_texts`` for texts already normalised (single lines)."""
    model_labels = set(model.get_labels())
    if model_labels != {POSITIVE_LABEL, NEGATIVE_LABEL}:
        raise ValueError(f"scorer labels must be {{{NEGATIVE_LABEL}, {POSITIVE_LABEL}}}, got {sorted(model_labels)}")
    if len(lines) == 0:
        return np.empty(0, dtype=np.float64)
    all_labels, all_probs = model.predict(list(lines), k=-1)
    out = np.full(len(lines), np.nan)
    for row, (labels, probs) in enumerate(zip(all_labels, all_probs, strict=True)):
        if POSITIVE_LABEL in labels:
            out[row] = probs[list(labels).index(POSITIVE_LABEL)]
    return np.clip(out, 0.0, 1.0)
