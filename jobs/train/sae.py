"""Training a TopK SAE on a corpus: activations from the LM engine's tap, then ``operators.sae.train``."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Log = Callable[[str], Any]

@dataclass(frozen=True)
class TrainSettings:
    """What ``train_sae`` does: data collection and SAE hyper-parameters."""

    layer: int
    d_sae: int | None = None  # latents; None: 4 × the activations' width H
    k: int = 32
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    max_rows: int = 50_000
    max_tokens: int = 256
    skip_first: int = 1
    seed: int = 0
    text_column: str = "text"


@dataclass(frozen=True)
class SAETrainReport:
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


def shuffled_texts(input_url: str, s: TrainSettings) -> list[str]:
    """The texts activations are collected from, in collection order (a shuffle seeded by ``s.seed``)."""
    from operators.sae.stage import read_texts

    texts = read_texts(input_url, s.text_column)
    random.Random(s.seed).shuffle(texts)
    return texts


def train_sae(input_url: str, model: str, output: str | Path, s: TrainSettings, log: Log = print) -> SAETrainReport:
    """Collect activations through the LM engine, train, save (sparsify layout), report.

    ``s.layer`` is the HF ``hidden_states`` index; sparsify names the output of block L-1, so the
    SAE is written to ``<output>/layers.<L-1>/``."""
    from operators.sae.embed import collect_activations, open_tap_engine
    from operators.sae.head import check_sae_layer

    texts = shuffled_texts(input_url, s)
    start = time.perf_counter()
    engine = open_tap_engine(model, s.layer, max_tokens=s.max_tokens)
    check_sae_layer(s.layer, engine.model_info().num_layers, f"model {model!r}")
    log(f"sae train: collecting up to {s.max_rows} layer-{s.layer} activations from {len(texts)} texts")
    acts = collect_activations(engine, texts, s.layer, s.max_rows, s.skip_first)
    del engine
    source = {"input": str(input_url), "model": str(model), "n_texts": len(texts),
              "seconds_collect": round(time.perf_counter() - start, 1)}
    return train_on_activations(acts, output, s, source, log)


def train_on_activations(acts: Any, output: str | Path, s: TrainSettings, source: dict[str, Any],
                         log: Log = print) -> SAETrainReport:
    """Train on collected activations [N, H], save (sparsify layout), write ``train_stats.json``.

    ``source`` says where the activations came from: ``input``, ``model``, ``n_texts`` and
    ``seconds_collect`` (reported), and anything else worth recording."""
    import torch

    from operators.sae.io import save_sparsify
    from operators.sae.train import train_topk_sae

    d_sae = s.d_sae or 4 * acts.shape[1]
    log(f"sae train: {acts.shape[0]} activations [{acts.shape[1]}] in {source['seconds_collect']:.1f} s; "
        f"training d_sae={d_sae} k={s.k} for {s.epochs} epochs")
    start = time.perf_counter()
    sae, stats = train_topk_sae(acts, d_sae, s.k, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                                seed=s.seed)
    trained = time.perf_counter() - start
    path = save_sparsify(sae, output, layer=s.layer)
    report = SAETrainReport(path, stats.fvu, stats.dead_fraction, stats.n_train, stats.n_valid,
                            source["n_texts"], source["seconds_collect"], round(trained, 1))
    meta = {**{k: v for k, v in asdict(report).items() if k != "path"}, "settings": asdict(s) | {"d_sae": d_sae},
            **{k: v for k, v in source.items() if k not in ("n_texts", "seconds_collect")},
            "torch": torch.__version__}
    (path / "train_stats.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report
