"""Config validation: errors name the field path and the bad value; unknown keys are errors."""

from __future__ import annotations

import pytest
import yaml

from pipelines.config import ConfigError, load_config, parse_config

BASE = {"name": "t", "input": {"url": "/data"}}


def test_minimal_config_gets_defaults():
    cfg = parse_config(BASE)
    assert cfg.output.url == "./output"
    assert cfg.stages == []


def test_unknown_key_names_the_path():
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "input": {"url": "/data", "textcolumn": "body"}}, "p.yaml")
    assert "p.yaml: input.textcolumn: Extra inputs are not permitted" in str(err.value)


def test_bad_value_names_path_and_value():
    raw = {**BASE, "stages": [{"op": "token_premium", "tokenizers": [
        {"name": "a", "kind": "tiktoken", "encoding": "cl100k_base"}],
        "resources": {"batch_size": -3}}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "p.yaml")
    assert "stages.0.token_premium.resources.batch_size" in str(err.value)
    assert "(got -3)" in str(err.value)


def test_unknown_operator_is_rejected():
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "stages": [{"op": "nope"}]})
    assert "stages.0" in str(err.value) and "nope" in str(err.value)


def test_tokenizer_kind_needs_its_field():
    raw = {**BASE, "stages": [{"op": "token_premium", "tokenizers": [{"name": "a", "kind": "tiktoken"}]}]}
    with pytest.raises(ConfigError, match="needs 'encoding'"):
        parse_config(raw)


def test_duplicate_stage_names_rejected():
    stage = {"op": "token_premium", "tokenizers": [{"name": "a", "kind": "tiktoken", "encoding": "x"}]}
    with pytest.raises(ConfigError, match="repeated"):
        parse_config({**BASE, "stages": [stage, stage]})


def test_env_expansion_and_missing_variable(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "input": {"url": "${CORPUS_DIR}/x"}}))
    monkeypatch.setenv("CORPUS_DIR", "/mnt/c")
    assert load_config(path).input.url == "/mnt/c/x"
    monkeypatch.delenv("CORPUS_DIR")
    with pytest.raises(ConfigError, match=r"\$\{CORPUS_DIR\} is not set"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hash_is_stable_and_sensitive():
    a, b = parse_config(BASE), parse_config(dict(BASE))
    c = parse_config({**BASE, "output": {"url": "/elsewhere"}})
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_default_pipeline_validates(demo_freq_table):
    assert load_config("pipelines/nightly.yaml").name == "nightly"
