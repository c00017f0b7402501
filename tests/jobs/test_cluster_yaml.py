"""ray_cluster.yaml: a launcher config that Ray accepts, scales GPUs from zero, and sets up idempotently."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    found = [c for k in keys for c in cfg.get(k, [])]
    for node in cfg["available_node_types"].values():
        found += [c for k in keys for c in node.get(k, [])]
    return found


def test_head_and_node_types(cfg):
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["cluster_name"] and cfg["auth"]["ssh_user"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert isinstance(node["resources"], dict), name
        assert node["node_config"]["InstanceType"], name
        lo, hi = node.get("min_workers", 0), node.get("max_workers", 0)
        assert 0 <= lo <= hi <= cfg["max_workers"], name
    assert sum(n.get("min_workers", 0) for n in types.values()) <= cfg["max_workers"]


def test_gpu_worker_autoscales_from_zero_with_pinned_vllm(cfg):
    gpu = [n for n in cfg["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    node = gpu[0]
    assert node["min_workers"] == 0 and node["max_workers"] >= 1
    assert node["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    image = node.get("docker", {}).get("worker_image", "")
    assert image.endswith("-gpu") and ":2.60.0-" in image
    assert any(re.search(r"\bvllm==\d", c) for c in node["worker_setup_commands"])


def test_cpu_worker_for_cpu_stages(cfg):
    cpu = [n for n in cfg["available_node_types"].values()
           if n["resources"].get("CPU", 0) > 0 and not n["resources"].get("GPU")]
    assert cpu and all(n["max_workers"] >= 1 for n in cpu)


def test_idle_timeout_set(cfg):
    assert 0 < cfg["idle_timeout_minutes"] <= 60


def test_setup_commands_are_idempotent(cfg):
    commands = all_commands(cfg)
    assert commands
    for command in commands:
        assert ">>" not in command, f"appends are not idempotent: {command}"
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            if words[:1] == ["mkdir"]:
                assert "-p" in words, f"mkdir without -p: {command}"
            if words[:2] == ["pip", "install"]:
                packages = [w for w in words[2:] if not w.startswith("-")]
                assert packages, command
                unpinned = [p for p in packages if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+]+", p)]
                assert not unpinned, f"unpinned pip packages: {unpinned}"


def test_node_pins_match_the_lock(cfg):
    """Versions installed on the nodes are the ones the project is tested with."""
    lock = dict(line.split("==", 1) for line in (ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    lock = {k.lower(): v.strip() for k, v in lock.items()}
    pins = re.findall(r"([A-Za-z0-9_.\-]+)==([\w.+]+)", " ".join(all_commands(cfg)))
    checked = [(p, v) for p, v in pins if p.lower() in lock]
    assert len(checked) >= 10
    assert [(p, v) for p, v in checked if lock[p.lower()] != v] == []


def test_ray_accepts_it(cfg):
    """Ray's own schema, and the checks `ray up` runs after filling in the AWS defaults."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_a_broken_config_is_caught(cfg):
    """The checks above can fail: a GPU type with a bad resource value is rejected by the schema."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
