"""Stages that cannot all fit the Ray cluster fail before running; stages declare memory to Ray."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_pipeline, write_shard

from pipelines.config import ConfigError, parse_config
from pipelines.pools import pools
from pipelines.resources import reserved, shortfalls
from pipelines.runner import run_pipeline

GiB = 1 << 30


def test_gpus_the_embedded_ray_lacks_fail_before_running(tmp_path, local_ray):
    write_shard(tmp_path / "in" / "a.parquet", text=["x"])
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    raw["stages"][0]["resources"] = {"num_gpus": 1, "num_cpus": 0.5}
    assert local_ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(
        ConfigError,
        match=r"reserve 1 GPUs \(stages\[0\] token_premium: 1 × 1\) but the Ray "
        r"cluster has 0",
    ):
        run_pipeline(parse_config(raw), "2026-02-01")
    assert not list((tmp_path / "out").glob("_data/**/*.parquet"))  # nothing staged


def test_memory_the_embedded_ray_lacks_fails_before_running(tmp_path, local_ray):
    write_shard(tmp_path / "in" / "a.parquet", text=["x"])
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    raw["stages"][0]["resources"] = {"memory": "4096GiB", "num_cpus": 0.5}
    with pytest.raises(
        ConfigError,
        match=r"reserve 4096\.00 GiB of memory \(stages\[0\] token_premium: "
        r"4\.1e\+03 GiB × 1\)",
    ):
        run_pipeline(parse_config(raw), "2026-02-01")


def test_default_pipeline_and_test_configs_fit_two_cores_and_24_gib(demo_freq_table):
    """nightly.yaml (every operator, one LM) on the machine the README promises: 2 CPUs, 24 GiB RAM.

    Ray's ``memory`` resource on such a machine is what is left after its object store (30 %) and
    reserved share: about 24 GiB × 0.6 = 14.4 GiB; the stages must fit in far less.
    """
    from pipelines.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "pipelines" / "nightly.yaml")
    machine = {"CPU": 2.0, "GPU": 0.0, "memory": 0.6 * 24 * GiB}
    assert shortfalls(cfg, machine) == []
    memory, parts = reserved(cfg)["memory"]
    assert 2 * GiB < memory < 10 * GiB, parts  # every stage declares memory; the LM stages dominate
    assert len(parts) == len(pools(cfg.stages)) == 3  # one part per actor pool: two shared, the lm's own
    # the heaviest test config (tests/operators/detection/test_pawn_pipeline.py): an lm stage with an observer, then scores
    model = next(s for s in cfg.stages if s.op == "lm").model.model_dump()
    cpu = {"num_cpus": 0.25, "batch_size": 10}
    heavy = parse_config(
        {
            "name": "detect",
            "input": {"url": "/x"},
            "stages": [
                {
                    "op": "lm",
                    "model": model,
                    "observer": {**model, "name": "observer"},
                    "cache_hidden": ["last"],
                    "heads": [{"kind": "pawn", "params": {"path": "/p"}}],
                    "resources": cpu,
                },
                {"op": "scores", "model": model["name"], "binoculars": True, "resources": cpu},
            ],
        }
    )
    assert shortfalls(heavy, machine) == []


def test_stage_actors_reserve_their_memory_and_ray_data_stops_warning(tmp_path, local_ray):
    """While the lm actor lives, Ray's free ``memory`` is lower by what the stage declares (Ray places
    actors by it), and Ray Data's high-memory detector, run every 0.2 s, has nothing to report."""
    from ray.data import DataContext

    from jobs.demo.model import prepare_demo_model

    write_shard(
        tmp_path / "in" / "a.parquet",
        id=[f"d{i}" for i in range(24)],
        text=[f"Some text to score, number {i}, with a few more words." for i in range(24)],
    )
    model = {"name": "smol", "path": str(prepare_demo_model(log=lambda _m: None))}
    raw = {
        "name": "mem",
        "input": {"url": str(tmp_path / "in")},
        "output": {"url": str(tmp_path / "out")},
        "stages": [
            {
                "op": "lm",
                "model": model,
                "max_tokens": 32,
                "cpu_threads": 1,
                "resources": {"num_cpus": 0.25, "batch_size": 4},
            }
        ],
    }
    cfg = parse_config(raw)
    declared = cfg.stages[0].memory_bytes()
    assert declared > 1024 * (1 << 20)  # overhead + the 513 MiB of float32 weights

    total = local_ray.cluster_resources()["memory"]
    lowest = [total]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], local_ray.available_resources().get("memory", total))
            time.sleep(0.02)

    detector = DataContext.get_current().issue_detectors_config.high_memory_detector_config
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager")
    before = detector.detection_time_interval_s
    detector.detection_time_interval_s = 0.2  # check every 0.2 s instead of every 30 s
    logger.addHandler(handler)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        result = run_pipeline(cfg, "2026-02-01")
    finally:
        done.set()
        thread.join()
        logger.removeHandler(handler)
        detector.detection_time_interval_s = before
    assert result.status == "committed" and result.rows_out == 24
    assert total - lowest[0] >= declared  # the actor held its declared memory
    assert not [m for m in messages if "memory" in m], messages
