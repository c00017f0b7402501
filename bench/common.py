"""Helpers shared by the benchmarks: machine facts and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(name: str, result: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the command and machine facts."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.orig_argv[1:]]), "machine": machine(),
               **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
