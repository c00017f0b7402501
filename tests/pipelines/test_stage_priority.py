"""``resources.nice``: a stage's actor process lowers its own priority before building its operator,
so a light stage leaves the cores to a model stage on a small machine (docs/config.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from operators.base import Resources

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import json, os
from operators.membership.lowercase import LowercaseTextConfig
from operators.base import Resources
from pipelines.stage_runner import StageRunner
before = os.nice(0)
StageRunner(LowercaseTextConfig(resources=Resources(num_cpus=0.5, nice={nice})))
print(json.dumps({{"before": before, "after": os.nice(0)}}))
"""


def niceness_around_build(nice: int) -> dict:
    """The child process's niceness before and after a ``StageRunner`` with ``resources.nice`` is built."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(nice=nice)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_a_stage_adds_its_nice_to_the_process():
    seen = niceness_around_build(3)
    assert seen["after"] == min(19, seen["before"] + 3)


def test_nice_zero_leaves_the_priority_alone():
    seen = niceness_around_build(0)
    assert seen["after"] == seen["before"]


@pytest.mark.parametrize("value", [-1, 20])
def test_nice_outside_unix_range_is_a_config_error(value):
    with pytest.raises(ValidationError, match="nice"):
        Resources(nice=value)
