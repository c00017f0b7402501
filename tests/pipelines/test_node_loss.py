"""A two-node Ray cluster on this machine: losing the worker node mid-run loses no row.

The head node has too little ``memory`` for the stage actor (it asks for 300 MiB), so the actor runs
on the worker node. Mid-run the worker's raylet is SIGKILLed (the node and every actor on it die),
and a replacement worker joins, as an autoscaler would start one. Then either the run commits every
row exactly once, or it fails cleanly (nothing committed, ``runs`` says failed) and a rerun of the
date gives the tables of an uninterrupted run.

The cluster is stopped by killing the processes started for it (found by their temp dirs), never
with ``ray stop``, which would also stop every other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port, run_rows, table_rows, tiny_pipeline, write_shard

from jobs.ops.query import query

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
DRIVER = """
import json, sys
from operators.base import RunFailed
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
try:
    result = run_pipeline(parse_config(json.loads(sys.argv[1])), sys.argv[2])
except RunFailed as err:
    print(f"RUN FAILED: {err}", flush=True)
    sys.exit(3)
print(json.dumps({"status": result.status, "rows_out": result.rows_out}), flush=True)
"""


def _env() -> dict[str, str]:
    """Nodes and drivers of this cluster: no RAY_ADDRESS, and no token auth (local test cluster)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def cmdline(proc: psutil.Process) -> str:
    """A process's command line, or "" for one that has exited meanwhile (e.g. a zombie helper)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


class Cluster:
    """Ray nodes started with ``ray start``, each with its own temp dir (which names its processes)."""

    def __init__(self) -> None:
        self.temp_dirs: list[str] = []
        self.worker = ""
        self.port = free_port()
        from ray._private.services import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{self.port}"

    def start_node(self, head: bool, num_cpus: int, memory: int) -> str:
        temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: socket paths are limited to 107 bytes
        self.temp_dirs.append(temp)
        where = (
            ["--head", f"--port={self.port}", "--include-dashboard=false"]
            if head
            else [f"--address={self.address}"]
        )
        subprocess.run(
            [
                RAY,
                "start",
                *where,
                f"--num-cpus={num_cpus}",
                f"--memory={memory}",
                f"--object-store-memory={100 * MiB}",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            env=_env(),
        )
        return temp

    def processes(self, temp: str | None = None) -> list[psutil.Process]:
        """Processes of one node (``temp``) or of every node of this cluster."""
        temps = [temp] if temp else self.temp_dirs
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(t in cmdline for t in temps) and proc.pid != os.getpid():
                found.append(proc)
        return found

    def raylet(self, temp: str) -> psutil.Process:
        # the command line read by process_iter: a zombie (an exited Ray helper) cannot be asked again
        (raylet,) = [p for p in self.processes(temp) if "raylet/raylet" in " ".join(p.info["cmdline"] or [])]
        return raylet

    def stop(self) -> None:
        procs = self.processes()
        for proc in list(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                procs += proc.children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start_node(head=True, num_cpus=1, memory=200 * MiB)
        c.worker = c.start_node(head=False, num_cpus=1, memory=2048 * MiB)
        yield c
    finally:
        c.stop()


def driver(raw: dict, run_date: str, log: Path) -> subprocess.Popen:
    """A fresh driver process (this test process may already run an embedded Ray)."""
    env = {**_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(raw), run_date],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the driver hung after the node loss:\n{log.read_text()[-3000:]}")


def pipeline(tmp_path: Path, cluster: Cluster, out: str) -> dict:
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / out))
    raw["ray"] = {"address": cluster.address, "resource_wait_s": 30}
    raw["output"]["shared_mount"] = True  # both nodes run on this machine: they share its disk
    raw["stages"][0]["resources"] = {"num_cpus": 0.5, "batch_size": 50, "memory": 300 * MiB}
    return raw


def test_worker_node_lost_mid_run(tmp_path, cluster):
    n = 0
    for s in range(4):
        rows = 1000
        write_shard(
            tmp_path / "in" / f"s{s}.parquet",
            id=[f"d{s}-{i}" for i in range(rows)],
            text=[f"Document {s}-{i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(rows)],
            lang=["eng_Latn"] * rows,
        )
        n += rows
    out = tmp_path / "out"
    log = tmp_path / "driver.log"
    proc = driver(pipeline(tmp_path, cluster, "out"), "2026-05-05", log)
    deadline = time.time() + 90
    while (
        time.time() < deadline
        and proc.poll() is None
        and not list(out.glob("_data/documents/*/*/*.parquet"))
    ):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the node could be lost:\n{log.read_text()[-3000:]}"
    stage_actors = [p for p in cluster.raylet(cluster.worker).children(recursive=True) if "StageRunner" in cmdline(p)]
    assert stage_actors, "the stage actor is not on the worker node"
    cluster.raylet(cluster.worker).kill()  # the worker node dies with its actors and objects
    cluster.worker = cluster.start_node(head=False, num_cpus=1, memory=2048 * MiB)  # its replacement
    rc = finish(proc, log, timeout=120)

    date = "2026-05-05"
    print(f"node loss: the run {'committed' if rc == 0 else 'failed'} (driver exit {rc})")
    if rc == 0:  # every row exactly once
        ids = [r["id"] for r in table_rows(out, "documents", date, columns="id")]
        assert len(ids) == n and len(set(ids)) == n
        runs = run_rows(out)
        assert [r["status"] for r in runs] == ["committed"] and runs[0]["rows_out"] == n
        return
    # a clean failure: nothing committed, the run recorded as failed; then a rerun is whole
    assert table_rows(out, "documents", date) == [], log.read_text()[-3000:]
    assert [r["status"] for r in run_rows(out)] == ["failed"]
    assert finish(driver(pipeline(tmp_path, cluster, "out"), date, log), log, 120) == 0
    assert finish(driver(pipeline(tmp_path, cluster, "clean"), date, log), log, 120) == 0
    sql = "SELECT id, text, n_chars, tokens__cl100k FROM documents ORDER BY id"
    rerun = query(str(out), sql, date=date)
    assert rerun.equals(query(str(tmp_path / "clean"), sql))


def test_gpus_an_addressed_cluster_lacks_warn_then_fail_after_the_deadline(tmp_path, cluster):
    write_shard(tmp_path / "in" / "a.parquet", text=["x"])
    raw = pipeline(tmp_path, cluster, "out")
    raw["ray"]["resource_wait_s"] = 2
    raw["stages"][0]["resources"] = {"num_gpus": 1, "num_cpus": 0.5}
    log = tmp_path / "driver.log"
    started = time.monotonic()
    rc = finish(driver(raw, "2026-05-06", log), log, timeout=90)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "waiting up to 2s (ray.resource_wait_s) for the cluster to scale up" in text
    assert "ResourceError: the stages reserve 1 GPUs" in text and "did not scale up within" in text
    assert time.monotonic() - started < 80
    assert [r["status"] for r in run_rows(tmp_path / "out")] == ["failed"]
