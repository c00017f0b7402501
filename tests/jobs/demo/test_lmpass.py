"""The shared demo lm pass reads what the separate runs it replaces computed (jobs/demo/lmpass.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.demo.constants import DEMO_LAYERS, DEMO_SAE, member_name
from jobs.demo.lmpass import FamilyReader
from jobs.demo.preselect import save_truncated

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["The capital of Germany is Berlin, and the capital of France is Paris.",
         "Return a new list containing all items from the iterable in ascending order. " * 3,
         "Ein kurzer deutscher Satz über das Wetter."]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from jobs.demo.model import prepare_demo_model

    return prepare_demo_model(log=lambda _msg: None)


def engine(path: Path, max_tokens: int, layers: set | None = None, metrics: tuple = ("max_logprob",)):
    from operators.lm.models import ModelSpec
    from operators.lm.torch_engine import TorchEngine

    return TorchEngine(ModelSpec(name="m", path=str(path)), max_tokens=max_tokens, metrics=metrics, layers=layers)


def test_members_read_off_the_full_model_match_the_cut_checkpoints(model_dir: Path, tmp_path: Path) -> None:
    full = engine(model_dir, 32, set(DEMO_LAYERS))
    reader = FamilyReader(full, model_dir, TEXTS)
    docs = full.encode(TEXTS)
    for text, doc, res in zip(TEXTS, docs, full.score(docs, cache_layers=reader.cache_layers), strict=True):
        reader.read(text, doc, res)
    assert reader.rows[TEXTS[1]]["scored_text"] != TEXTS[1]  # cut at 32 tokens: the text those ids cover
    assert TEXTS[1].startswith(reader.rows[TEXTS[1]]["scored_text"])
    for k in reader.layers:
        save_truncated(model_dir, k, tmp_path / f"l{k}")
        cut = engine(tmp_path / f"l{k}", 32)
        for text, res in zip(TEXTS, cut.score(cut.encode(TEXTS)), strict=True):
            row, name = reader.rows[text], member_name(k)
            assert row[f"{name}__nll_sum"] == pytest.approx(-float(res.metrics["logprob"].sum()), rel=1e-4)
            assert row[f"{name}__tokens"] == len(res.metrics["logprob"])
            hits = int((res.metrics["logprob"] == res.metrics["max_logprob"]).sum())
            assert abs(row[f"{name}__hits"] - hits) <= 1  # an arg-max tie may fall either way


def test_sae_rows_of_the_long_pass_are_those_train_sae_collects(model_dir: Path) -> None:
    from operators.sae.embed import collect_activations, open_tap_engine

    texts = [" ".join([TEXTS[1]] * 8), TEXTS[0]]  # one longer than the SAE's 128 tokens
    want = collect_activations(open_tap_engine(model_dir, DEMO_SAE.layer, max_tokens=DEMO_SAE.max_tokens),
                               texts, DEMO_SAE.layer, 10_000, DEMO_SAE.skip_first).numpy()
    long = engine(model_dir, 256, {DEMO_SAE.layer}, metrics=())
    results = long.score(long.encode(texts), cache_layers={DEMO_SAE.layer})
    got = np.concatenate([r.hidden[DEMO_SAE.layer][DEMO_SAE.skip_first: DEMO_SAE.max_tokens] for r in results])
    assert got.shape == want.shape and got.shape[0] > DEMO_SAE.max_tokens
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
