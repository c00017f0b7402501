"""``curate submit`` and ``curate jobs``: run pipelines on a Ray cluster through the Ray Jobs API.

A submission ships the project as the job's ``working_dir`` and runs
``python -m jobs.cli run PIPELINE --date D`` on the cluster. Its id is deterministic,
``curate-<pipeline>-<date>``, so the same night is never submitted twice by accident:

* an attempt of that night is PENDING/RUNNING → refused ("already running");
* the last attempt SUCCEEDED → refused unless ``--force``, which submits ``...-r2``, ``-r3``, …;
* the last attempt FAILED/STOPPED → resubmitted under the next ``-rN`` id.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import UserError
from jobs.ops.nightly import night_url, raw_input_url
from pipelines.config import ConfigError, load_config
from pipelines.progress import verbose as ray_logs_verbose

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger("curate.submit")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never uploaded with the working_dir (Ray also honours .gitignore).
EXCLUDES = [".venv", "venv", ".git", "output", "__pycache__", "*.pyc", ".pytest_cache",
            ".ruff_cache", ".mypy_cache", "*.egg-info", "build", "bench/results",
            "_data", "_catalog", "curate_locks", "curate.db"]  # an output's data files, catalog, locks, metadata
ACTIVE = {"PENDING", "RUNNING"}


def submission_base(pipeline: str, run_date: str) -> str:
    """The deterministic submission id of a pipeline's night (first attempt)."""
    return f"curate-{pipeline}-{run_date}"


def attempts(jobs: Iterable[tuple[str, str]], base: str) -> list[tuple[int, str, str]]:
    """(attempt number, submission id, status) of ``base``'s attempts, oldest first."""
    pattern = re.compile(re.escape(base) + r"(?:-r(\d+))?")
    found = [(int(m.group(1) or 1), sid, status) for sid, status in jobs
             if sid and (m := pattern.fullmatch(sid))]
    return sorted(found)


def next_submission_id(jobs: Iterable[tuple[str, str]], base: str, force: bool = False) -> str:
    """The id to submit under, given the cluster's (submission id, status) pairs; or refuse."""
    tries = attempts(jobs, base)
    running = [sid for _, sid, status in tries if status in ACTIVE]
    if running:
        raise UserError(f"{running[-1]} is already running; see: curate jobs status {running[-1]}")
    if not tries:
        return base
    number, last, status = tries[-1]
    if status == "SUCCEEDED" and not force:
        raise UserError(f"{last} already SUCCEEDED; use --force to run this night again")
    return f"{base}-r{number + 1}"


def entrypoint(pipeline: str, run_date: str, output: str | None = None,
               input_url: str | None = None, verbose: bool | None = None) -> str:
    """The shell command the job runs on the cluster (inside the shipped working_dir); ``curate -v``
    here (``verbose``, default: this process's setting) is ``-v`` there."""
    verbose = ray_logs_verbose() if verbose is None else verbose
    args = ["python", "-m", "jobs.cli", *(["-v"] if verbose else []), "run", pipeline, "--date", run_date]
    if input_url:
        args += ["--input", input_url]
    if output:
        args += ["--output", output]
    return shlex.join(args)


def runtime_env(pip: str | None = None) -> dict:
    """Ship the project (minus venvs, outputs, caches); install ``pip`` requirements if given."""
    env: dict = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    if pip:
        if not Path(pip).exists():
            raise UserError(f"--pip: requirements file not found: {pip}")
        env["pip"] = str(Path(pip).resolve())
    return env


def cluster_path(pipeline: str) -> str:
    """The pipeline's path as the job sees it: relative to the shipped project when inside it."""
    resolved = Path(pipeline).resolve()
    if resolved.is_relative_to(PROJECT_ROOT):
        return str(resolved.relative_to(PROJECT_ROOT))
    log.warning("%s is outside the project, so it is not shipped: the cluster must see this path",
                resolved)
    return str(resolved)


def auth_headers() -> dict[str, str]:
    """Ray token auth, found where Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Ray's client only sends it when RAY_AUTH_MODE=token is set here; clusters started with a token
    require it, so curate sends it whenever one exists (``RAY_AUTH_MODE=disabled`` opts out).
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None) -> JobSubmissionClient:
    """A Jobs API client (ray imported lazily: it is slow); an unreachable dashboard is a UserError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as err:
        raise UserError(f"cannot reach the Ray dashboard at {address or '$RAY_ADDRESS'}: {err}") from None


def check_output_url(url: str) -> None:
    """Refuse a relative output path: on the cluster it would land in the job's temporary copy."""
    if "://" not in url and not Path(url).is_absolute():
        raise UserError(f"output.url {url!r} is relative: on the cluster it would be written inside "
                        "the job's temporary working_dir; pass --output with an absolute path shared "
                        "by the cluster or a bucket URL (s3://…)")


def check_cluster_output(cfg, address: str | None) -> None:  # noqa: ANN001 - PipelineConfig
    """Refuse a local output when the cluster behind ``address`` has several nodes (``runner``
    checks the same when the job starts); an unreachable node list only skips this early check."""
    from pipelines.config import ConfigError
    from pipelines.runner import check_output_reachable
    from pipelines.tables import output_of_config

    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the job's own check still runs on the cluster
        return
    try:
        check_output_reachable(cfg, output_of_config(cfg), len(nodes))
    except ConfigError as err:
        raise UserError(str(err)) from None


def submit(pipeline: str, address: str | None, run_date: str, force: bool = False,
           output: str | None = None, pip: str | None = None) -> tuple[JobSubmissionClient, str]:
    """Validate the pipeline here, then submit its night; returns (client, submission id)."""
    try:
        cfg = load_config(pipeline, {"output": {"url": output}})
    except ConfigError as err:
        raise UserError(str(err)) from None
    check_output_url(cfg.output.url)
    check_cluster_output(cfg, address)
    name = cfg.name
    raw_url = raw_input_url(pipeline)
    dated_input = night_url(raw_url, run_date) if raw_url and "{date" in raw_url else None
    jobs = client(address)
    sid = next_submission_id(((j.submission_id, str(j.status)) for j in jobs.list_jobs()),
                             submission_base(name, run_date), force)
    try:
        jobs.submit_job(entrypoint=entrypoint(cluster_path(pipeline), run_date, output, dated_input),
                        submission_id=sid, runtime_env=runtime_env(pip),
                        metadata={"pipeline": name, "run_date": run_date, "submitted_by": "curate"})
    except RuntimeError as err:  # e.g. the same id was submitted a moment ago by someone else
        raise UserError(f"submitting {sid} failed: {err}") from None
    return jobs, sid


def wait(jobs: JobSubmissionClient, sid: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(sid):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(jobs.get_job_status(sid))


# ------------------------------------------------------------------------------------- commands


def submit_command(args: argparse.Namespace) -> int:
    """``curate submit``: submit a night; with ``--wait``, exit 0 only if it SUCCEEDED."""
    jobs, sid = submit(args.pipeline, args.address, args.date, args.force, args.output, args.pip)
    print(f"submitted {sid}\n  logs:   curate jobs logs {sid} --address {args.address or '…'}")
    if not args.wait:
        return 0
    status = wait(jobs, sid)
    print(f"{sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def jobs_command(args: argparse.Namespace) -> int:
    """``curate jobs list|status|logs|stop``."""
    jobs = client(args.address)
    if args.action == "list":
        print(format_jobs(jobs.list_jobs()))
        return 0
    if not args.id:
        raise UserError(f"curate jobs {args.action} needs a submission id (see: curate jobs list)")
    try:
        return _job_action(jobs, args)
    except RuntimeError as err:
        raise UserError(f"{args.id}: {err}") from None


def _job_action(jobs: JobSubmissionClient, args: argparse.Namespace) -> int:
    if args.action == "status":
        info = jobs.get_job_info(args.id)
        print(f"{args.id}: {info.status}  {info.message or ''}".rstrip())
    elif args.action == "logs":
        if args.follow:
            print(f"{args.id}: {wait(jobs, args.id)}")
        else:
            print(jobs.get_job_logs(args.id), end="")
    elif args.action == "stop":
        stopped = jobs.stop_job(args.id)
        print(f"{args.id}: {'stop requested' if stopped else 'not running'}")
    return 0


def format_jobs(details: list) -> str:
    """One line per job: submission id, status, start time (UTC), entrypoint."""
    lines = [f"{'submission id':<40}{'status':<11}{'started (UTC)':<21}entrypoint"]
    for j in sorted(details, key=lambda j: j.start_time or 0):
        started = (datetime.fromtimestamp(j.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
                   if j.start_time else "-")
        lines.append(f"{j.submission_id or j.job_id:<40}{j.status!s:<11}{started:<21}{j.entrypoint}")
    return "\n".join(lines)
