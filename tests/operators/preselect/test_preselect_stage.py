"""PreSelect stage (operators/preselect/stage.py): scoring in actors, global selection, the table.

The scorer is a real fastText model trained here on two vocabularies ("good clear useful" → 1,
"bad noisy spam" → 0), seeded, single-threaded and in a fresh process, so its scores are
reproducible; their order is asserted before any selection built on it.
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import write_shard

from jobs.train.preselect import train_isolated
from operators.preselect.stage import PreSelectConfig
from operators.selection import SELECTED_SCHEMA, ThresholdPolicy, TopFractionCharsPolicy, select_documents
from pipelines.config import ConfigError, parse_config
from pipelines.runner import run_pipeline
from pipelines.stage_runner import StageRunner
from pipelines.tables import read_table

DOCS = {  # id: text (n_chars)
    "a": "good useful clear good",  # 22, all good words
    "b": "clear good good bad",  # 19, 3 of 4 good
    "c": "useful bad spam noisy",  # 21, 1 of 4 good
    "d": "bad spam noisy bad bad spam",  # 27, no good word
    "e": "bad\nbad",  # 7, a newline: scored after the same normalisation as training
}


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory) -> str:
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(200):
        words = ("good", "clear", "useful") if i % 2 else ("bad", "noisy", "spam")
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
        labels.append(i % 2)
    out = tmp_path_factory.mktemp("scorer") / "model.bin"
    # a fresh process: fastText training is only reproducible as the first one in a process
    train_isolated(texts, labels, str(out), epoch=20, lr=0.5, dim=16, bucket=1000, valid_fraction=0.2)
    return str(out)


# ------------------------------------------------------------------------ selection, by hand


def _frame(**cols) -> pl.LazyFrame:
    return pl.LazyFrame(cols)


def test_top_fraction_by_hand_ties_nan_and_text_length():
    # n_chars from len(text): p=4, q=2, r=4, s=6, t=4 -> total 20; fraction 0.5 -> budget 10.
    # Sorted by id first, so the tie q == r (0.8) goes to q. Visit order: p .9 (before 0 < 10 keep),
    # q .8 (4 < 10 keep), r .8 (6 < 10 keep, crosses the budget), s .1 (10, stop); t NaN never.
    docs = _frame(id=["s", "r", "q", "p", "t"], text=["ssssss", "rrrr", "qq", "pppp", "tttt"],
                  preselect_score=[0.1, 0.8, 0.8, 0.9, math.nan])
    out = select_documents(docs, "preselect_score", "preselect", TopFractionCharsPolicy(fraction=0.5))
    assert out.column("id").to_pylist() == ["p", "q", "r"]
    assert out.column("rank").to_pylist() == [1, 2, 3]
    assert out.column("n_chars").to_pylist() == [4, 2, 4]
    assert set(out.column("policy").to_pylist()) == {"top_fraction_chars(0.5)"}
    assert set(out.column("operator").to_pylist()) == {"preselect"}
    assert out.schema == SELECTED_SCHEMA


def test_threshold_by_hand_uses_n_chars_column_and_skips_nulls():
    # threshold 0.5: 0.5 (>=) and 0.7 kept, 0.49 and null not; n_chars comes from the column.
    docs = _frame(id=["w", "x", "y", "z"], text=["?", "?", "?", "?"], n_chars=[10, 20, 30, 40],
                  quality_score=[0.5, 0.49, 0.7, None])
    out = select_documents(docs, "quality_score", "quality", ThresholdPolicy(threshold=0.5))
    assert out.to_pydict() == {
        "id": ["y", "w"], "operator": ["quality"] * 2, "policy": ["threshold(0.5)"] * 2,
        "score": [0.7, 0.5], "n_chars": [30, 10], "rank": [1, 2],
        "source_file": [None, None], "source_row": [None, None]}


def test_no_documents_select_nothing():
    empty = pl.LazyFrame({"id": []}, schema={"id": pl.String})
    assert select_documents(empty, "preselect_score", "preselect", ThresholdPolicy()).num_rows == 0


def test_config_names_and_validation(scorer_path):
    raw = {"name": "p", "input": {"url": "/x"},
           "stages": [{"op": "preselect", "model": scorer_path},
                      {"op": "preselect", "name": "quality", "model": scorer_path,
                       "selection": {"policy": "threshold", "threshold": 0.7}}]}
    cfg = parse_config(raw)
    default, named = cfg.stages
    assert (default.score_column, named.score_column) == ("preselect_score", "quality_score")
    assert default.selection == TopFractionCharsPolicy(fraction=0.10)
    assert named.selection.describe() == "threshold(0.7)"
    raw["stages"][1]["selection"] = {"policy": "top_fraction_chars", "fraction": 1.5}
    with pytest.raises(ConfigError, match=r"stages\.1\.preselect\.selection\.top_fraction_chars\.fraction"):
        parse_config(raw)
    with pytest.raises(FileNotFoundError, match="preselect model not found"):
        PreSelectConfig(model="/nowhere/model.bin").build()


# ------------------------------------------------------------------------ through the pipeline


def test_pipeline_scores_and_selects_globally(tmp_path: Path, scorer_path, local_ray):
    ids = list(DOCS)
    write_shard(tmp_path / "in" / "s1.parquet", id=["a", "c", "e", "x"],
                text=[DOCS["a"], DOCS["c"], DOCS["e"], "   "])  # x: whitespace, quarantined
    write_shard(tmp_path / "in" / "s2.parquet", id=["b", "d"], text=[DOCS["b"], DOCS["d"]])
    # 0.25 + 0.25 + writer 0.5 leaves 1 CPU of 2 for the read tasks; batches of 2 rows, so a
    # per-batch selection would differ from the global one.
    cpu = {"num_cpus": 0.25, "batch_size": 2}
    cfg = parse_config({
        "name": "ps", "input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
        "stages": [
            {"op": "preselect", "model": scorer_path, "resources": cpu,
             "selection": {"policy": "top_fraction_chars", "fraction": 0.2}},
            {"op": "preselect", "name": "quality", "model": scorer_path, "resources": cpu,
             "selection": {"policy": "threshold", "threshold": 0.5}},
        ]})
    result = run_pipeline(cfg, "2026-01-02")
    assert result.status == "committed" and result.tables["selected"] == 3

    docs = read_table(str(tmp_path / "out" / "documents")).to_pandas().set_index("id")
    assert sorted(docs.index) == ids
    np.testing.assert_array_equal(docs["preselect_score"], docs["quality_score"])
    order = docs["preselect_score"].sort_values(ascending=False).index.tolist()
    assert order == ["a", "b", "c", "e", "d"]  # the trained model ranks by share of good words
    assert docs.loc["a", "preselect_score"] > 0.9 and docs.loc["b", "preselect_score"] > 0.5
    assert docs.loc["c", "preselect_score"] < 0.5

    selected = read_table(str(tmp_path / "out" / "selected")).to_pylist()
    by_op = {op: [(r["id"], r["rank"], r["n_chars"]) for r in selected if r["operator"] == op]
             for op in ("preselect", "quality")}
    # top 20% of 22+19+21+27+7 = 96 chars -> budget 19.2: a (0 kept before) in, b (22 >= 19.2) out.
    assert sorted(by_op["preselect"]) == [("a", 1, 22)]
    # threshold 0.5 over the whole run: a and b (from different shards and batches).
    assert sorted(by_op["quality"]) == [("a", 1, 22), ("b", 2, 19)]
    policies = {r["operator"]: r["policy"] for r in selected}
    assert policies == {"preselect": "top_fraction_chars(0.2)", "quality": "threshold(0.5)"}
    assert {r["source_file"].rsplit("/", 1)[1] for r in selected if r["id"] == "b"} == {"s2.parquet"}


class _Probe(StageRunner):
    """The real stage runner, plus the actor's pid and its scorer-load count on every row."""

    def __init__(self, stage: PreSelectConfig) -> None:
        import operators.preselect.stage as stage_module

        real_load, self.loads = stage_module.load_scorer, 0

        def counting_load(*args, **kwargs):
            self.loads += 1
            return real_load(*args, **kwargs)

        stage_module.load_scorer = counting_load  # this actor's process only
        super().__init__(stage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        n = out.num_rows
        return out.append_column("pid", pa.array([os.getpid()] * n)).append_column(
            "loads", pa.array([self.loads] * n))


def test_scorer_loaded_once_per_actor(scorer_path, local_ray):
    import ray.data
    from ray import cloudpickle
    from ray.data import ActorPoolStrategy

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    stage = PreSelectConfig(model=scorer_path)
    rows = [{"id": str(i), "text": DOCS["abcde"[i % 5]], "quarantine_reason": None,
             "quarantine_stage": None} for i in range(12)]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows)).map_batches(
        _Probe, fn_constructor_kwargs={"stage": stage}, batch_size=2, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=1), num_cpus=0.5)
    out = ds.take_all()
    assert len(out) == 12 and all(r["preselect_score"] is not None for r in out)
    assert len({r["pid"] for r in out}) == 1 and out[0]["pid"] != os.getpid()
    assert {r["loads"] for r in out} == {1}  # six batches, one load
