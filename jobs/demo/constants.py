"""What the demo is made of: the constants every demo build reads, in one module that imports no
other demo module (so the builds import it, and each other, without a cycle)."""

from __future__ import annotations

from jobs.train.sae import TrainSettings

#: The demo model's column prefix (``model.name``) in the demo lm pass and ``pipelines/nightly.yaml``.
DEMO_MODEL = "smollm2"
#: Tokens per document of the PAWN demo (and of the nightly pipeline's lm stage).
DEMO_MAX_TOKENS = 256
#: Human and machine-written docs per class of the PAWN demo.
DEMO_DOCS_PER_CLASS = 80

#: The demo model's residual width (SmolLM2-135M) and the demo SAE's layer (HF hidden_states index).
DEMO_HIDDEN = 576
DEMO_LAYER = 15
#: What the demo SAE trains on and how: d_sae = 4 · 576, up to 32768 activations of ≤ 128-token documents.
DEMO_SAE = TrainSettings(layer=DEMO_LAYER, d_sae=4 * DEMO_HIDDEN, epochs=10, max_rows=32_768, max_tokens=128)

#: Blocks kept per PreSelect family member (the demo model has 30); the last is the demo model itself.
#: Cut models rank the same way on nearly every document: with k = 6, 15, 30 no document reaches
#: S = 1 (k=6 has a lower loss than k=15 everywhere), with 20, 24, 28, 30 every one does. The
#: per-document disagreement that S needs comes from the 15/20 pair, hence these.
DEMO_LAYERS = (10, 15, 20, 30)
#: The members score each document's first 128 tokens: the shared lm pass reads the documents that
#: only the family and the SAE use (128 tokens each) no further, and the cut models rank the same.
FAMILY_TOKENS = 128


def member_name(layers: int) -> str:
    """The PreSelect family member that keeps the first ``layers`` blocks."""
    return f"smollm2_l{layers:02d}"
