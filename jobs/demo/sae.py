"""The demo SAE: a TopK SAE on layer 15 of the demo model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from jobs.demo.assets import build_demo_asset
from jobs.demo.cache import MARKER, Log
from jobs.demo.constants import DEMO_SAE
from jobs.demo.lmpass import prepare_demo_lmpass
from jobs.train.sae import train_on_activations

#: 2: saved as sparsify ``layers.14`` (the output of block 14 = HF hidden_states[15]); version 1
#: wrote ``layers.15`` (off by one) and is rebuilt. 3: activations from the shared demo lm pass
#: (the same rows ``train_sae`` collects; the corpus's machine docs are vLLM's).
ASSET_VERSION = 3


def prepare_demo_sae(cache: Path | None = None, log: Log = print) -> Path:
    """Train (once, cached at ``<cache>/demo/sae/``) a TopK SAE on the demo model's layer 15 from the
    demo corpus: d_sae = 4 · 576, k = 32; returns the directory (the SAE on HF hidden_states[15] is in
    sparsify's ``layers.14/``, the output of block 14). The activations come from the shared lm pass
    (``jobs.demo.lmpass``)."""

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        lmpass = prepare_demo_lmpass(cache, log)
        acts = torch.from_numpy(np.load(lmpass / "sae.npy"))
        made = json.loads((lmpass / MARKER).read_text())  # the shared pass's counts and time
        source = {"input": str(corpus), "model": str(model), "activations": str(lmpass / "sae.npy"),
                  "n_texts": made["sae_texts"], "seconds_collect": made["seconds"]}
        report = train_on_activations(acts, tmp, DEMO_SAE, source, log)
        log(f"demo SAE: held-out FVU {report.fvu:.4f}, dead latents {100 * report.dead_fraction:.1f}%")
        return {"settings": asdict(DEMO_SAE)}

    return build_demo_asset("sae", build, cache, log, ASSET_VERSION)
