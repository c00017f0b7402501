"""The first run from a clone, timed step by step: clone, install (empty and warm pip cache), make run
(empty and warm ``CURATE_CACHE``).

    python -m bench.first_run [--repo PATH_OR_URL] -> bench/results/first_run.json

Every step runs in a fresh clone under a temporary directory, with its own pip cache and its own
``CURATE_CACHE``, so nothing of this checkout or this machine's caches is reused:

1. ``git clone`` of ``--repo`` (default: this checkout);
2. ``make install`` with an empty pip cache (``install_empty_pip_cache``);
3. the venv removed, ``make install`` again, now with a warm pip cache (``install_warm_pip_cache``);
4. ``make run`` with an empty ``CURATE_CACHE``: demo assets built, then the pipeline (``run_cold``);
5. ``make run`` again into a fresh ``./output``: assets cached, no result cache (``run_warm``);
6. ``make run`` once more, ``./output`` kept: the result cache serves the night (``run_warm_cached``).

``first_run_cold`` = clone + install (empty pip cache) + run_cold: what a new user waits for. The
pipeline's own seconds ("committed in") come from each run's summary line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, save

COMMITTED = re.compile(r"committed in ([0-9.]+)s")


def step(name: str, cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run ``cmd``; its seconds, and the pipeline's own seconds when it printed a summary."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc {proc.returncode}); last lines of {log}:\n{text[-3000:]}")
    found = COMMITTED.findall(text)
    print(f"{name}: {seconds:.1f} s", file=sys.stderr)
    return {"seconds": round(seconds, 1), **({"pipeline_seconds": float(found[-1])} if found else {})}


def first_run(repo: str, work: Path) -> dict:
    clone, logs = work / "curate", work / "logs"
    logs.mkdir()
    env = {**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache"), "CURATE_CACHE": str(work / "curate-cache")}
    env.pop("VIRTUAL_ENV", None)
    steps = {"clone": step("clone", ["git", "clone", "--quiet", repo, str(clone)], work, env, logs / "clone.log")}
    steps["install_empty_pip_cache"] = step("install (empty pip cache)", ["make", "install"], clone, env,
                                            logs / "install1.log")
    shutil.rmtree(clone / ".venv")
    steps["install_warm_pip_cache"] = step("install (warm pip cache)", ["make", "install"], clone, env,
                                           logs / "install2.log")
    steps["run_cold"] = step("make run (empty CURATE_CACHE)", ["make", "run"], clone, env, logs / "run1.log")
    shutil.rmtree(clone / "output")
    steps["run_warm"] = step("make run (assets cached, fresh output)", ["make", "run"], clone, env,
                             logs / "run2.log")
    steps["run_warm_cached"] = step("make run (output kept: result cache)", ["make", "run"], clone, env,
                                    logs / "run3.log")
    cold = steps["clone"]["seconds"] + steps["install_empty_pip_cache"]["seconds"] + steps["run_cold"]["seconds"]
    return {"repo": repo, "commit": _head(clone), "steps": steps, "first_run_cold_seconds": round(cold, 1),
            "targets": {"first_run_cold_seconds": 600, "run_warm_seconds": 150},
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def _head(clone: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT), help="what to clone (default: this checkout)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-first-run-") as tmp:
        save("first_run", first_run(args.repo, Path(tmp)))


if __name__ == "__main__":
    main()
