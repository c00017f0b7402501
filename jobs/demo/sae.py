"""The demo SAE: a TopK SAE on layer 15 of the demo model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from jobs.demo.cache import Log
from jobs.train.sae import TrainSettings, train_sae

DEMO_LAYER = 15
#: 2: saved as sparsify ``layers.14`` (the output of block 14 = HF hidden_states[15]); version 1
#: wrote ``layers.15`` (off by one) and is rebuilt.
ASSET_VERSION = 2


def prepare_demo_sae(cache: Path | None = None, log: Log = print) -> Path:
    """Train (once, cached at ``<cache>/demo/sae/``) a TopK SAE on the demo model's layer 15 from the
    demo corpus: d_sae = 4 · 576, k = 32; returns the directory (the SAE on HF hidden_states[15] is in
    sparsify's ``layers.14/``, the output of block 14)."""
    from jobs.demo.assets import build_demo_asset

    settings = TrainSettings(layer=DEMO_LAYER, epochs=10, max_rows=32_768, max_tokens=128)

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        report = train_sae(str(corpus), str(model), tmp, settings, log)
        log(f"demo SAE: held-out FVU {report.fvu:.4f}, dead latents {100 * report.dead_fraction:.1f}%")
        return {"settings": asdict(settings)}

    return build_demo_asset("sae", build, cache, log, ASSET_VERSION)
