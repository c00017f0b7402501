"""PreSelect across tokenizers: every family member scores every content token (issue: a model whose
tokenizer adds no BOS used to lose its first token's loss, a BOS model kept it, which shifts S)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from jobs.train.preselect import Family, family_pipeline
from operators.lm.models import ModelSpec, bos_id
from operators.lm.torch_engine import TorchEngine
from tests.operators.lm.tiny_lm import TEXT, WORDS, build_tiny_lm


@pytest.fixture(scope="module")
def two_tokenizer_family(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny LM twice: ``bos`` has a tokenizer that adds <s>, ``plain`` one that adds nothing."""
    root = tmp_path_factory.mktemp("family")
    plain = build_tiny_lm(root / "plain")
    bos = build_tiny_lm(root / "bos")
    tok = PreTrainedTokenizerFast.from_pretrained(bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", WORDS.index("<s>"))])
    tok.save_pretrained(bos)
    return bos, plain


def _score(path: Path, score_first_token: bool) -> tuple[list[int], np.ndarray]:
    engine = TorchEngine(ModelSpec(name="m", path=str(path)), max_tokens=64, metrics=("logprob",),
                         score_first_token=score_first_token)
    doc = engine.encode([TEXT])[0]
    return doc.ids, engine.score([doc])[0].metrics["logprob"]


def test_every_member_scores_every_content_token(two_tokenizer_family, one_torch_thread):
    bos, plain = two_tokenizer_family
    assert bos_id(PreTrainedTokenizerFast.from_pretrained(bos)) is not None
    assert bos_id(PreTrainedTokenizerFast.from_pretrained(plain)) is None
    n_content = len(TEXT.replace(".", " . ").split())  # word-level tokenizer: one id per word
    ids_bos, lp_bos = _score(bos, score_first_token=True)
    ids_plain, lp_plain = _score(plain, score_first_token=True)
    # both start with the context token <s> and score all n content tokens
    assert ids_bos == ids_plain and ids_plain[0] == WORDS.index("<s>")
    assert len(lp_bos) == len(lp_plain) == n_content
    # same weights, same ids: the two members' losses agree token for token
    np.testing.assert_allclose(lp_bos, lp_plain, rtol=0, atol=1e-6)
    # without the option the plain tokenizer loses its first token's loss (the old behaviour)
    _, lp_old = _score(plain, score_first_token=False)
    assert len(lp_old) == n_content - 1


def test_family_pipeline_asks_every_lm_stage_to_score_the_first_token(two_tokenizer_family, tmp_path, local_ray):
    bos, plain = two_tokenizer_family
    family = Family.model_validate({"models": [
        {"name": "bos", "path": str(bos), "bench_score": 0.2},
        {"name": "plain", "path": str(plain), "bench_score": 0.4},
        {"name": "plain2", "path": str(plain), "bench_score": 0.6}]})
    cfg = family_pipeline(family, str(tmp_path / "in"), str(tmp_path / "out"), 64, ["logprob"], False, 8)
    assert [s.score_first_token for s in cfg.stages] == [True, True, True]
