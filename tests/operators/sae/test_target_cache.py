"""sae_select keeps the target's reference rows under the fingerprint of its and its lm stage's
configs and files: the same target later loads no engine; a changed target is embedded again."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_sae

import operators.sae.stage as sae_stage
from operators.sae.io import save_sparsify
from pipelines.config import parse_config

LAYER = 3


def sae_select_of(tmp_path, demo_model):
    sae = tmp_path / "sae"
    save_sparsify(random_sae(576), sae, layer=LAYER)
    lm = {"op": "lm", "model": {"name": "smol", "path": str(demo_model)}, "max_tokens": 32,
          "metrics": ["logprob"], "keep_positions": False,
          "heads": [{"kind": "sae", "params": {"sae": str(sae), "layer": LAYER, "name": "sae"}}]}
    select = {"op": "sae_select", "target": str(tmp_path / "target.parquet"), "lm": "lm_smol"}
    cfg = parse_config({"name": "t", "input": {"url": str(tmp_path)}, "stages": [lm, select]})
    return cfg.stages[1]


def test_same_target_loads_no_engine_and_a_changed_one_is_embedded_again(tmp_path, demo_model, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    pq.write_table(pa.table({"text": ["The cat sat on the mat.", "def add(a, b): return a + b"]}),
                   tmp_path / "target.parquet")
    stage = sae_select_of(tmp_path, demo_model)
    first = stage.references()
    assert len(list((tmp_path / "cache" / "sae_targets").glob("*.npy"))) == 1

    opened = []
    real_open = sae_stage.open_engine

    def counting_open(settings):  # noqa: ANN001, ANN202
        opened.append(settings)
        return real_open(settings)

    monkeypatch.setattr(sae_stage, "open_engine", counting_open)
    np.testing.assert_array_equal(sae_select_of(tmp_path, demo_model).references(), first)
    assert opened == []

    pq.write_table(pa.table({"text": ["Paris is the capital of France."]}), tmp_path / "target.parquet")
    changed = sae_select_of(tmp_path, demo_model).references()
    assert len(opened) == 1 and changed.shape == first.shape and not np.array_equal(changed, first)
    assert len(list((tmp_path / "cache" / "sae_targets").glob("*.npy"))) == 2


@pytest.mark.parametrize("garbage", [b"", b"not an npy file"])
def test_a_broken_kept_file_is_embedded_again(tmp_path, demo_model, monkeypatch, garbage):
    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    pq.write_table(pa.table({"text": ["The cat sat on the mat."]}), tmp_path / "target.parquet")
    want = sae_select_of(tmp_path, demo_model).references()
    (kept,) = (tmp_path / "cache" / "sae_targets").glob("*.npy")
    kept.write_bytes(garbage)
    np.testing.assert_array_equal(sae_select_of(tmp_path, demo_model).references(), want)
