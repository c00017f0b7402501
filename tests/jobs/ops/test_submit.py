"""``curate submit`` / ``curate jobs`` against a real local Ray head with its dashboard (Jobs API).

The head runs on free ports with its own ``--temp-dir``, so a ``ray.init()`` elsewhere in the test
session never finds it, and it is stopped by killing its own process group (not ``ray stop``,
which would stop every Ray on the machine, the session's embedded one included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import free_port, tiny_pipeline

from jobs.cli.main import main
from jobs.errors import UserError
from jobs.ops import submit
from jobs.ops.query import query

VENV_BIN = Path(sys.executable).parent
DATE = "2026-04-05"


# ---------------------------------------------------------------------------- without a cluster


def test_first_attempt_uses_the_deterministic_id():
    assert submit.next_submission_id([("raysubmit_x", "SUCCEEDED")], "curate-p-2026-04-05") \
        == "curate-p-2026-04-05"


@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_a_running_night_is_refused(status):
    jobs = [("curate-p-2026-04-05", "FAILED"), ("curate-p-2026-04-05-r2", status)]
    with pytest.raises(UserError, match="curate-p-2026-04-05-r2 is already running"):
        submit.next_submission_id(jobs, "curate-p-2026-04-05", force=True)


def test_a_succeeded_night_needs_force():
    jobs = [("curate-p-2026-04-05", "SUCCEEDED")]
    with pytest.raises(UserError, match="already SUCCEEDED; use --force"):
        submit.next_submission_id(jobs, "curate-p-2026-04-05")
    assert submit.next_submission_id(jobs, "curate-p-2026-04-05", force=True) == "curate-p-2026-04-05-r2"


@pytest.mark.parametrize("status", ["FAILED", "STOPPED"])
def test_a_failed_night_is_resubmitted_with_the_next_suffix(status):
    jobs = [("curate-p-2026-04-05", "SUCCEEDED"), ("curate-p-2026-04-05-r2", "SUCCEEDED"),
            ("curate-p-2026-04-05-r3", status), ("curate-p-2026-04-06", "RUNNING"),
            ("curate-p-2026-04-05-rx", "RUNNING")]
    assert submit.next_submission_id(jobs, "curate-p-2026-04-05") == "curate-p-2026-04-05-r4"


def test_entrypoint_and_runtime_env(monkeypatch):
    monkeypatch.delenv("CURATE_VERBOSE", raising=False)
    assert submit.entrypoint("pipelines/nightly.yaml", DATE, "s3://b/out") == (
        "python -m jobs.cli run pipelines/nightly.yaml --date 2026-04-05 --output s3://b/out")
    monkeypatch.setenv("CURATE_VERBOSE", "1")  # curate -v submit ... -> the job logs verbosely too
    assert submit.entrypoint("pipelines/nightly.yaml", DATE) == (
        "python -m jobs.cli -v run pipelines/nightly.yaml --date 2026-04-05")
    env = submit.runtime_env()
    assert env["working_dir"] == str(submit.PROJECT_ROOT)
    assert {".venv", ".git", "output", "__pycache__"} <= set(env["excludes"])
    assert "pip" not in env  # only when asked
    assert submit.runtime_env(str(submit.PROJECT_ROOT / "requirements.lock"))["pip"].endswith(
        "requirements.lock")
    assert submit.cluster_path(str(submit.PROJECT_ROOT / "pipelines" / "nightly.yaml")) == \
        "pipelines/nightly.yaml"


def test_relative_output_is_refused(capsys, demo_freq_table):
    nightly = str(submit.PROJECT_ROOT / "pipelines" / "nightly.yaml")  # output: ./output
    assert main(["submit", nightly, "--address", "http://127.0.0.1:1"]) == 2
    assert "output.url './output' is relative" in capsys.readouterr().err
    submit.check_output_url("s3://bucket/out")
    submit.check_output_url("/shared/out")


def test_auth_token_is_read_where_ray_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t1")
    assert submit.auth_headers() == {"Authorization": "Bearer t1"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("t2\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer t2"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_unreachable_dashboard_is_a_clear_error(capsys):
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


# ------------------------------------------------------------------------- real Ray head + jobs


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            submit.client(url)
            return
        except UserError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not answer in {timeout}s")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with the dashboard on free ports and token auth; yields its Jobs API address."""
    temp_dir = tempfile.mkdtemp(prefix="curate-ray-", dir="/tmp")  # short: unix socket paths
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(16))
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard,
             "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs run this venv's python
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *(f"{flag}={port}" for flag, port in ports.items())],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # what `curate` reads to authenticate
            mp.delenv("RAY_AUTH_TOKEN", raising=False)
            wait_for_dashboard(address, head)
            yield address
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def live_in_group(pgid: int) -> list[int]:
    """Pids of the process group that are still running (zombies waiting to be reaped don't count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block`` (it stops the processes it started); SIGKILL what is left.

    After jobs ran, the raylet may drain for a long time: the group gets SIGKILL after 10 s.
    """
    proc.terminate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc.poll()
        if not live_in_group(proc.pid):
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_for_status(address: str, sid: str, wanted: set[str], timeout: float = 60) -> str:
    client = submit.client(address)
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(sid))) not in wanted:
        assert time.monotonic() < deadline, f"{sid} still {status}"
        time.sleep(0.5)
    return status


def test_submit_wait_query_refuse_and_force(tmp_path, small_corpus, ray_head, capsys):
    out = tmp_path / "out"
    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(out))))
    base = f"curate-tiny-{DATE}"
    args = ["submit", str(pipeline), "--address", ray_head, "--date", DATE]

    assert main([*args, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert f"submitted {base}\n" in printed
    assert "rows in 6 = out 5 + quarantined 1" in printed  # the job's own logs, streamed
    assert printed.rstrip().endswith(f"{base}: SUCCEEDED")
    assert query(str(out), "SELECT count(*) AS n FROM documents")["n"].to_pylist() == [5]
    premium = query(str(out), "SELECT lang FROM token_premium ORDER BY lang")["lang"].to_pylist()
    assert premium == ["eng_Latn", "fra_Latn"]

    assert main(args) == 2  # the night already succeeded
    assert f"{base} already SUCCEEDED; use --force" in capsys.readouterr().err

    assert main([*args, "--force", "--wait"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"{base}-r2: SUCCEEDED")
    runs = query(str(out), "SELECT status FROM runs")["status"].to_pylist()
    assert runs == ["committed", "committed"]

    assert main(["jobs", "status", base, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith(f"{base}: SUCCEEDED")
    assert main(["jobs", "logs", f"{base}-r2", "--address", ray_head]) == 0
    assert "rows in 6 = out 5 + quarantined 1" in capsys.readouterr().out


def test_running_night_is_refused_then_stopped(tmp_path, small_corpus, ray_head, capsys):
    out = tmp_path / "out"
    pipeline = tmp_path / "tiny.yaml"
    spec = tiny_pipeline(str(small_corpus), str(out), name="slow")
    pipeline.write_text(yaml.safe_dump(spec))
    args = ["submit", str(pipeline), "--address", ray_head, "--date", DATE]
    sid = f"curate-slow-{DATE}"

    assert main(args) == 0
    assert main(args) == 2  # still PENDING or RUNNING
    assert f"{sid} is already running" in capsys.readouterr().err

    assert main(["jobs", "stop", sid, "--address", ray_head]) == 0
    assert wait_for_status(ray_head, sid, {"STOPPED", "SUCCEEDED", "FAILED"}) in {"STOPPED", "SUCCEEDED"}
    assert main(["jobs", "list", "--address", ray_head]) == 0
    listed = capsys.readouterr().out
    assert sid in listed


def test_a_wrong_token_is_a_clear_error(ray_head, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", ray_head]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray dashboard" in err and "Authentication" in err
