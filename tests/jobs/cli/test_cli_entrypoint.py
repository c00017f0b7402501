"""`python -m jobs.cli` (what `curate submit` runs on the cluster) reports user errors like `curate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_module_entrypoint_prints_user_errors_and_exits_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"curate: error: pipeline file not found: {missing}"
    assert "Traceback" not in proc.stderr
