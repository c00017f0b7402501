"""``resources.share``: consecutive stages with one label run in one actor pool (``pipelines.pools``,
``pipelines.stage_runner.StageChain``), each stage keeping its own rows, quarantine and timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import ray._private.state as ray_state
import yaml
from conftest import tiny_pipeline

from jobs.cli.main import main
from jobs.ops.query import query
from operators.base import Resources
from operators.membership.lowercase import LowercaseTextConfig
from pipelines.config import ConfigError, load_config, parse_config
from pipelines.pools import pool_resources, pools, share_problems
from pipelines.resources import reserved
from pipelines.stage_runner import StageChain, StageRunner

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def lower(name: str, share: str | None = None, **resources) -> LowercaseTextConfig:
    return LowercaseTextConfig(name=name, column=f"{name}_col",
                               resources=Resources(**{"num_cpus": 0.5, "share": share, **resources}))


def rows(*texts: str) -> pa.Table:
    n = len(texts)
    return pa.table({"id": [f"d{i}" for i in range(n)], "text": list(texts),
                     "quarantine_reason": pa.nulls(n, pa.string()), "quarantine_stage": pa.nulls(n, pa.string())})


def test_only_consecutive_stages_with_one_label_share_a_pool():
    stages = [lower("a", "x"), lower("b", "x"), lower("c"), lower("d", "y"), lower("e", "y"), lower("f", "x")]
    assert [[s.stage_name for s in g] for g in pools(stages)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    problems = share_problems(stages, cached=set())
    assert problems == ["stages.5.lowercase_text.resources.share: 'x' is also the label of stages.0, which is not "
                        "next to it: only consecutive stages share an actor; use another label"]


def test_shared_stages_must_agree_on_pool_size_and_gpus_and_never_be_cached():
    stages = [lower("a", "x"), lower("b", "x", concurrency=2), lower("c", "x", num_gpus=1, concurrency=2)]
    problems = share_problems(stages, cached={"a"})
    assert any(p.startswith("stages.0.lowercase_text.resources.share: stage 'a' caches its results") for p in problems)
    assert any(p.startswith("stages.1.lowercase_text.resources.concurrency: 2 differs from stages.0's 1")
               for p in problems)
    assert any(p.startswith("stages.2.lowercase_text.resources.num_gpus: 1.0 differs from stages.1's 0.0")
               for p in problems)
    assert len(problems) == 3


def test_a_pool_reserves_the_largest_cpus_and_the_sum_of_memory():
    group = [lower("a", "x", num_cpus=0.2, batch_size=1024, nice=5, memory=100 * MiB),
             lower("b", "x", num_cpus=0.3, batch_size=256, nice=2, memory=200 * MiB)]
    assert pool_resources(group) == {"num_cpus": 0.3, "num_gpus": 0.0, "memory": 300 * MiB, "batch_size": 256,
                                     "nice": 5, "concurrency": 1, "min_actors": 1}


def test_the_resource_check_counts_pools_not_stages():
    cfg = load_config(ROOT / "pipelines" / "nightly.yaml")
    assert [[s.stage_name for s in g] for g in pools(cfg.stages)] == [
        ["token_premium", "preselect"], ["lm_smollm2"], ["scores_smollm2", "sae_select"]]
    cpus, parts = reserved(cfg)["CPU"]
    assert cpus == pytest.approx(0.25 + 0.25 + 0.2 + 0.6 + 0.3)  # read + writer + three pools
    assert parts[0] == "stages[0..1] token_premium+preselect: 0.2 × 1" and parts[2].startswith("stages[3..4]")
    memory, _ = reserved(cfg)["memory"]
    assert memory == sum(s.memory_bytes() for s in cfg.stages)


def test_a_bad_share_is_a_config_error_naming_the_field(tmp_path):
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    raw["stages"].append({"op": "lowercase_text", "resources": {"share": "light", "concurrency": 2}})
    raw["stages"][0]["resources"]["share"] = "light"
    with pytest.raises(ConfigError, match=r"stages\.1\.lowercase_text\.resources\.concurrency: 2 differs"):
        parse_config(raw, "p.yaml")


def test_a_chain_equals_its_stages_one_after_another_and_skips_rows_an_earlier_one_quarantined():
    a, b = lower("a", "x"), lower("b", "x")
    batch = rows("Hello", "BAD row", "World")
    chain = StageChain([a, b])
    original = chain.runners[0].operator.process

    def fail_on_bad(table: pa.Table) -> pa.Table:
        if any("BAD" in t for t in table.column("text").to_pylist()):
            raise ValueError("a bad row")
        return original(table)

    chain.runners[0].operator.process = fail_on_bad
    out = chain(batch)
    assert out.column("a_col").to_pylist() == ["hello", None, "world"]
    assert out.column("b_col").to_pylist() == ["hello", None, "world"]  # b never saw the quarantined row
    assert out.column("quarantine_stage").to_pylist() == [None, "a", None]
    assert "a bad row" in out.column("quarantine_reason")[1].as_py()
    alone = StageRunner(b)(StageRunner(a)(rows("Hello", "World")))
    assert alone.column("b_col").to_pylist() == ["hello", "world"]
    timing = [c for c in out.column_names if c.startswith("__timing__")]
    assert {c.rsplit("__", 1)[1] for c in timing} == {"a", "b"}  # each stage reports its own timing


CHILD = """
import json, os
from operators.base import Resources
from operators.membership.lowercase import LowercaseTextConfig
from pipelines.stage_runner import StageChain
before = os.nice(0)
StageChain([LowercaseTextConfig(name="a", resources=Resources(num_cpus=0.5, nice=3, share="x")),
            LowercaseTextConfig(name="b", column="b", resources=Resources(num_cpus=0.5, nice=5, share="x"))])
print(json.dumps({"before": before, "after": os.nice(0)}))
"""


def test_a_chain_lowers_its_process_priority_once_by_its_largest_nice():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["after"] == min(19, seen["before"] + 5)


def test_shared_stages_run_end_to_end_with_their_own_counts(tmp_path, small_corpus, local_ray, capsys):
    out = tmp_path / "out"
    raw = tiny_pipeline(str(small_corpus), str(out))
    raw["stages"][0]["resources"]["share"] = "light"
    raw["stages"].append({"op": "lowercase_text", "resources": {"num_cpus": 0.5, "share": "light"}})
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    before = set(ray_state.actors())
    assert main(["run", str(pipeline), "--date", "2026-03-04"]) == 0
    new = [a["ActorClassName"] for key, a in ray_state.actors().items() if key not in before]
    assert [c for c in new if "StageChain" in c or "StageRunner" in c] == ["MapWorker(MapBatches(StageChain))"]
    assert "rows in 6 = out 5 + quarantined 1" in capsys.readouterr().out
    docs = query(str(out), "SELECT text, text_lower, tokens__cl100k FROM documents ORDER BY text").to_pylist()
    assert len(docs) == 5 and all(d["text_lower"] == d["text"].lower() and d["tokens__cl100k"] > 0 for d in docs)
    stages = json.loads(query(str(out), "SELECT stages FROM runs").column("stages")[0].as_py())
    assert [s["name"] for s in stages] == ["read", "token_premium", "lowercase_text"]
    assert [(s["rows_in"], s["rows_out"]) for s in stages[1:]] == [(5, 5), (5, 5)]
    assert all(s["began_s"] is not None for s in stages[1:])
