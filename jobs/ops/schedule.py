"""``curate schedule install|show|remove``: a nightly ``curate submit`` from cron (or systemd, k8s).

One crontab line per pipeline, tagged with a trailing ``# curate:<pipeline>`` marker (a shell
comment, so cron runs the line unchanged), e.g.::

    30 2 * * * cd /srv/curate && /srv/curate/.venv/bin/curate submit pipelines/nightly.yaml \
--address http://head:8265 --date $(date -u +\\%F) # curate:nightly

``%`` is special to cron (it starts stdin), so the date format is written ``+\\%F``. Installing
again replaces the pipeline's line (never a duplicate). The crontab is read with ``crontab -l`` and
written with ``crontab -``; ``CURATE_CRONTAB_FILE`` points both at a plain file instead.
``--print systemd|k8s`` prints the equivalent systemd service+timer or Kubernetes CronJob instead.

``--maintain`` does the same for the upkeep of the pipeline's output (``curate maintain --pipeline P
--retain-days N``: expire old snapshots, remove orphan files), tagged ``# curate:<pipeline>.maintain``,
so it is installed, shown and removed beside the nightly submit, never in its place.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from jobs.errors import UserError
from pipelines.config import ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CRONTAB_FILE_ENV = "CURATE_CRONTAB_FILE"
_AT = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_MARKER = re.compile(r"# curate:([A-Za-z0-9_.-]+)\s*$")


def parse_at(at: str) -> tuple[int, int]:
    """``HH:MM`` (24h) as (hour, minute)."""
    m = _AT.match(at)
    if not m:
        raise UserError(f"--at must be HH:MM (24h), got {at!r}")
    return int(m.group(1)), int(m.group(2))


def marker(name: str) -> str:
    """The comment that tags a pipeline's crontab line."""
    return f"# curate:{name}"


def curate_command() -> str:
    """How cron should call curate: the ``curate`` script beside this Python, else ``python -m``."""
    script = Path(sys.executable).parent / "curate"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m jobs.cli"


def submit_args(pipeline: str, address: str) -> str:
    """The ``submit`` arguments, without the date (each scheduler writes today's date its way)."""
    return f"submit {shlex.quote(pipeline)} --address {shlex.quote(address)}"


def maintain_args(pipeline: str, retain_days: float) -> str:
    """The ``maintain`` arguments: the upkeep of ``pipeline``'s output (its url and catalog)."""
    return f"maintain --pipeline {shlex.quote(pipeline)} --retain-days {retain_days:g}"


def maintain_name(name: str) -> str:
    """The schedule entry name of a pipeline's upkeep."""
    return f"{name}.maintain"


def maintain_cron_line(name: str, pipeline: str, at: str, retain_days: float, project_dir: str,
                       curate: str) -> str:
    """The crontab line: every day at ``at``, ``curate maintain`` the pipeline's output."""
    hour, minute = parse_at(at)
    command = f"cd {shlex.quote(project_dir)} && {curate} {maintain_args(pipeline, retain_days)}"
    return f"{minute} {hour} * * * {command} {marker(maintain_name(name))}"


def cron_line(name: str, pipeline: str, at: str, address: str, project_dir: str,
              curate: str) -> str:
    """The crontab line: every day at ``at``, submit ``pipeline`` for today's UTC date."""
    hour, minute = parse_at(at)
    command = (f"cd {shlex.quote(project_dir)} && {curate} {submit_args(pipeline, address)} "
               r"--date $(date -u +\%F)")
    return f"{minute} {hour} * * * {command} {marker(name)}"


# -------------------------------------------------------------------------------------- crontab


def read_crontab() -> str:
    """The current crontab (empty when there is none)."""
    path = os.environ.get(CRONTAB_FILE_ENV)
    if path:
        return Path(path).read_text() if Path(path).exists() else ""
    out = _crontab(["-l"])
    if out.returncode != 0:
        if "no crontab" in out.stderr.lower():
            return ""
        raise UserError(f"crontab -l failed: {out.stderr.strip()}")
    return out.stdout


def write_crontab(text: str) -> None:
    """Replace the crontab with ``text``."""
    path = os.environ.get(CRONTAB_FILE_ENV)
    if path:
        Path(path).write_text(text)
        return
    out = _crontab(["-"], text)
    if out.returncode != 0:
        raise UserError(f"crontab - failed: {out.stderr.strip()}")


def _crontab(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["crontab", *args], input=stdin, capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise UserError("the crontab binary is not installed (apt-get install cron), or use "
                        "--print systemd|k8s for a systemd timer or a Kubernetes CronJob") from None


def entries(text: str, name: str | None = None) -> list[str]:
    """curate's lines in a crontab (every pipeline's, or only ``name``'s)."""
    return [line for line in text.splitlines() if _tag(line) and name in (None, _tag(line))]


def without(text: str, name: str) -> list[str]:
    """The crontab's lines minus ``name``'s entry."""
    return [line for line in text.splitlines() if _tag(line) != name]


def _tag(line: str) -> str | None:
    m = _MARKER.search(line)
    return m.group(1) if m else None


def install(line: str, name: str) -> bool:
    """Put ``line`` in the crontab in place of ``name``'s entry; False when it was already there."""
    current = read_crontab()
    if entries(current, name) == [line]:
        return False
    write_crontab("\n".join([*without(current, name), line]) + "\n")
    return True


def remove(name: str) -> bool:
    """Remove ``name``'s entry; False when there was none."""
    current = read_crontab()
    if not entries(current, name):
        return False
    kept = without(current, name)
    write_crontab("\n".join(kept) + "\n" if kept else "")
    return True


# ----------------------------------------------------------------------------- systemd and k8s


def systemd_units(name: str, pipeline: str, at: str, address: str, project_dir: str,
                  curate: str, maintain: float | None = None) -> str:
    """A oneshot service and a daily UTC timer (``Persistent=true`` runs a missed night at boot);
    ``maintain``: the upkeep of the output with that retention (days) instead of the submit."""
    hour, minute = parse_at(at)
    # systemd expands % specifiers and $VARS itself: write them %% and $$.
    if maintain is None:
        shell = f"{curate} {submit_args(pipeline, address)} --date $$(date -u +%%F)"
        what = f"submit the nightly run of {name}"
    else:
        shell = f"{curate} {maintain_args(pipeline, maintain)}".replace("%", "%%").replace("$", "$$")
        what, name = f"upkeep (maintain) of the output of {name}", maintain_name(name)
    return f"""\
# /etc/systemd/system/curate-{name}.service
[Unit]
Description=curate: {what}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={project_dir}
ExecStart=/bin/sh -c {shlex.quote(shell)}

# /etc/systemd/system/curate-{name}.timer
[Unit]
Description=curate: nightly {name} at {hour:02d}:{minute:02d} UTC

[Timer]
OnCalendar=*-*-* {hour:02d}:{minute:02d}:00 UTC
Persistent=true
Unit=curate-{name}.service

[Install]
WantedBy=timers.target

# enable with: systemctl daemon-reload && systemctl enable --now curate-{name}.timer
"""


def k8s_cronjob(name: str, pipeline: str, at: str, address: str, image: str,
                maintain: float | None = None) -> str:
    """A Kubernetes CronJob that never overlaps itself (``concurrencyPolicy: Forbid``);
    ``maintain``: the upkeep of the output with that retention (days) instead of the submit."""
    hour, minute = parse_at(at)
    if maintain is None:
        command = f"curate {submit_args(pipeline, address)} --date $(date -u +%F)"
    else:
        command, name = f"curate {maintain_args(pipeline, maintain)}", maintain_name(name)
    job = {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": f"curate-{name}".lower().replace("_", "-").replace(".", "-")},
        "spec": {
            "schedule": f"{minute} {hour} * * *", "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "submit" if maintain is None else "maintain", "image": image,
                                "command": ["/bin/sh", "-c", command]}],
            }}}},
        },
    }
    return yaml.safe_dump(job, sort_keys=False)


# -------------------------------------------------------------------------------------- command


def schedule_command(args: argparse.Namespace) -> int:
    """install / show / remove the crontab entry, or print systemd / k8s units."""
    if args.action == "show" and not args.print:
        return _show(args)
    name, pipeline = _pipeline(args)
    if getattr(args, "maintain", False):
        return _maintain(args, name, pipeline)
    if args.action == "remove":
        print(f"removed the schedule of {name}" if remove(name) else f"no schedule for {name}")
        return 0
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address is required (the Ray dashboard, e.g. http://head:8265)")
    if args.print == "systemd":
        print(systemd_units(name, pipeline, args.at, address, str(PROJECT_ROOT), curate_command()))
    elif args.print == "k8s":
        print(k8s_cronjob(name, pipeline, args.at, address, args.image), end="")
    else:
        line = cron_line(name, pipeline, args.at, address, str(PROJECT_ROOT), curate_command())
        print(("installed:\n  " if install(line, name) else "already installed:\n  ") + line)
    return 0


def _maintain(args: argparse.Namespace, name: str, pipeline: str) -> int:
    """``--maintain``: the daily ``curate maintain`` of the pipeline's output (no Ray address)."""
    days = args.retain_days
    if args.action == "remove":
        entry = maintain_name(name)
        print(f"removed the schedule of {entry}" if remove(entry) else f"no schedule for {entry}")
    elif args.print == "systemd":
        print(systemd_units(name, pipeline, args.at, "", str(PROJECT_ROOT), curate_command(), maintain=days))
    elif args.print == "k8s":
        print(k8s_cronjob(name, pipeline, args.at, "", args.image, maintain=days), end="")
    else:
        line = maintain_cron_line(name, pipeline, args.at, days, str(PROJECT_ROOT), curate_command())
        print(("installed:\n  " if install(line, maintain_name(name)) else "already installed:\n  ") + line)
    return 0


def _show(args: argparse.Namespace) -> int:
    name = _pipeline(args)[0] if args.pipeline else None
    text = read_crontab()
    if name is None:
        found = [line for line in entries(text)
                 if not getattr(args, "maintain", False) or _tag(line).endswith(".maintain")]
    elif getattr(args, "maintain", False):
        found = entries(text, maintain_name(name))
    else:  # the pipeline's nightly submit and its upkeep
        found = entries(text, name) + entries(text, maintain_name(name))
    print("\n".join(found) if found else "no curate schedule installed")
    return 0


def _pipeline(args: argparse.Namespace) -> tuple[str, str]:
    """(pipeline name, its path as the scheduler should pass it: relative to the project)."""
    if not args.pipeline:
        raise UserError(f"--pipeline is required for {args.action}")
    path = Path(args.pipeline)
    if not path.exists():
        if args.action == "remove":  # a name is enough to remove
            return args.pipeline, args.pipeline
        raise UserError(f"pipeline file not found: {path}")
    try:
        name = load_config(path).name
    except ConfigError as err:
        raise UserError(str(err)) from None
    resolved = path.resolve()
    shown = resolved.relative_to(PROJECT_ROOT) if resolved.is_relative_to(PROJECT_ROOT) else resolved
    return name, str(shown)
