"""The plan is checked as a whole when the config loads: every cross-stage reference, typed heads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.config import ConfigError, parse_config

BASE = {"name": "t", "input": {"url": "/data"}}


@pytest.fixture(scope="module")
def model() -> dict:
    from jobs.demo.model import prepare_demo_model

    return {"name": "smollm2", "path": str(prepare_demo_model(log=lambda _msg: None))}


def lm(model: dict, **extra) -> dict:
    return {"op": "lm", "model": model, **extra}


def sae_head(name: str = "sae") -> dict:
    return {"kind": "sae", "params": {"sae": "/sae", "layer": 3, "name": name}}


def plan(*stages: dict) -> object:
    return parse_config({**BASE, "stages": list(stages)}, "p.yaml")


def error(*stages: dict) -> str:
    with pytest.raises(ConfigError) as err:
        plan(*stages)
    return str(err.value)


def test_scores_model_typo_names_field_value_and_choices(model):
    msg = error(lm(model), {"op": "scores", "model": "smolm2"})
    assert msg.startswith(
        "p.yaml: stages.1.scores.model: 'smolm2': no earlier stage makes column 'smolm2__logprob'"
    )
    assert msg.endswith("valid choices: ['smollm2']")
    # the lm stage must come first, and compute what the scores read
    assert "stages.0.scores.model: 'smollm2'" in error({"op": "scores", "model": "smollm2"}, lm(model))
    short = error(lm(model, metrics=["logprob", "rank"]), {"op": "scores", "model": "smollm2"})
    assert "'smollm2__entropy'" in short and "allow_topk_estimates" in short and "valid choices: []" in short
    assert "smollm2__logprob" in error(lm(model, keep_positions=False), {"op": "scores", "model": "smollm2"})
    assert [s.stage_name for s in plan(lm(model), {"op": "scores", "model": "smollm2"}).stages] == [
        "lm_smollm2",
        "scores_smollm2",
    ]


def test_binoculars_needs_an_lm_observer(model):
    msg = error(lm(model), {"op": "scores", "model": "smollm2", "binoculars": True})
    assert "stages.1.scores.binoculars: True: no earlier stage makes column 'smollm2__xent'" in msg
    assert "observer" in msg
    observer = {**model, "name": "observer"}
    assert plan(lm(model, observer=observer), {"op": "scores", "model": "smollm2", "binoculars": True})


def test_lowercase_pass_needs_lowercase_text_before_its_lm_stage(model):
    lower = lm({**model, "name": "smollm2_lower"}, text_column="text_lower")
    scores = {"op": "scores", "model": "smollm2", "lowercase": {"enabled": True, "model": "smollm2_lower"}}
    msg = error(lm(model), lower, scores)
    assert "stages.1.lm.text_column: 'text_lower': no earlier stage makes column 'text_lower'" in msg
    assert "lowercase_text" in msg
    assert "stages.1.lm.text_column" in error(lm(model), lower, {"op": "lowercase_text"}, scores)  # too late
    msg = error(
        lm(model), {"op": "scores", "model": "smollm2", "lowercase": {"enabled": True, "model": "lower"}}
    )
    assert "stages.1.scores.lowercase.model: 'lower': no earlier stage makes column 'lower__logprob'" in msg
    assert "valid choices: ['smollm2']" in msg
    cfg = plan({"op": "lowercase_text"}, lm(model), lower, scores)
    assert [s.op for s in cfg.stages] == ["lowercase_text", "lm", "lm", "scores"]


def test_sae_select_names_its_lm_stage_and_head(model):
    target = {"op": "sae_select", "target": "t.parquet"}
    msg = error(lm(model, heads=[sae_head()]), {**target, "lm": "lm_smolm2"})
    assert "stages.1.sae_select.lm: 'lm_smolm2' is not an earlier lm stage with an SAE head" in msg
    assert msg.endswith("valid choices: ['lm_smollm2']")
    assert "valid choices: []" in error(lm(model), {**target, "lm": "lm_smollm2"})  # no SAE head
    two = lm(model, heads=[sae_head("a"), sae_head("b")], max_tokens=77)
    assert "stages.1.sae_select.head: None" in error(two, {**target, "lm": "lm_smollm2"})
    assert "valid choices: ['a', 'b']" in error(two, {**target, "lm": "lm_smollm2", "head": "c"})
    moved = error(
        lm(model, heads=[sae_head()]), {**target, "lm": "lm_smollm2", "model": model, "max_tokens": 8}
    )
    assert "stages.1.sae_select" in moved and "no longer repeats" in moved

    bound = plan(two, {**target, "lm": "lm_smollm2", "head": "b"}).stages[1]
    assert bound._lm.max_tokens == 77 and bound._lm.model.name == "smollm2" and bound._head.name == "b"
    assert [n.columns for n in bound.requires()] == [("b__sae_idx", "b__sae_val")]


def test_heads_are_typed_by_kind(model):
    msg = error(lm(model, heads=[{"kind": "pawn", "params": {"pth": "/p"}}]))
    assert "stages.0.lm.heads.0.pawn.params.path: Field required" in msg
    assert "stages.0.lm.heads.0.pawn.params.pth: Extra inputs are not permitted" in msg
    msg = error(
        lm(model, heads=[{"kind": "operators.sae.head:build_head", "params": {"sae": "/s", "layer": "x"}}])
    )
    assert "stages.0.lm.heads.0.sae.params.layer" in msg and "(got 'x')" in msg
    assert "cannot import" in error(lm(model, heads=[{"kind": "nowhere:Head"}]))
    cfg = plan(
        lm(
            model,
            heads=[
                {"kind": "pawn", "params": {"path": "/p", "column": "p"}},
                {"kind": "operators.lm.stage:LMOperator", "params": {"free": [1, 2]}},
            ],
        )
    )
    pawn, custom = cfg.stages[0].heads
    assert pawn.params.max_tokens == 512 and custom.params == {"free": [1, 2]}
    assert "p" in cfg.stages[0].provides()


@pytest.mark.parametrize("concurrency", [0, [0, 0], [2, 1]])
def test_concurrency_zero_fails_validation(concurrency):
    stage = {
        "op": "token_premium",
        "tokenizers": [{"name": "c", "kind": "tiktoken", "encoding": "cl100k_base"}],
        "resources": {"concurrency": concurrency},
    }
    with pytest.raises(ConfigError, match=r"stages\.0\.token_premium\.resources\.concurrency"):
        plan(stage)


def test_input_columns_count_as_made(model):
    scores = {"op": "scores", "model": "m", "zlib": False}
    assert "stages.0.scores.model" in error(scores)
    cfg = parse_config(
        {
            **BASE,
            "input": {"url": "/data", "columns": ["m__logprob", "m__entropy", "m__logp2", "m__rank"]},
            "stages": [scores],
        }
    )
    assert cfg.stages[0].provides()[0] == "m__ppl"


def test_declared_columns_match_what_the_operators_write(model, one_torch_thread):
    """provides() is what the plan check trusts: it must equal each operator's output schema."""
    cfg = plan(
        {"op": "token_premium", "tokenizers": [{"name": "c", "kind": "tiktoken", "encoding": "cl100k_base"}]},
        {"op": "lowercase_text"},
        lm(model, cache_hidden=["last"], max_tokens=16),
        {"op": "scores", "model": "smollm2", "zlib": False},
    )
    for stage in cfg.stages:
        assert stage.provides() == stage.build().output_schema().names, stage.stage_name
    assert isinstance(cfg.stages[0].build().output_schema(), pa.Schema)


def test_default_pipeline_binds_sae_select_to_its_lm_stage(demo_freq_table):
    from pipelines.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "pipelines" / "nightly.yaml")
    lm_stage = next(s for s in cfg.stages if s.op == "lm")
    sae = next(s for s in cfg.stages if s.op == "sae_select")
    assert sae._lm == lm_stage and sae._head == lm_stage.sae_heads[0].params and sae._lm.max_tokens == 256
