"""``curate nightly``: run a pipeline over one night's input, never twice at once, catching up.

* Input by date: ``{date}`` in ``input.url`` (or ``--input``) becomes the run date, e.g.
  ``s3://bucket/crawl/dt={date}/``; ``{date:%Y/%m/%d}`` takes a strftime format. Without it the
  whole input URL is the night's input.
* A lock file ``<output>/_locks/<pipeline>-<date>.lock`` (JSON: pid, host, start time) makes sure
  two runs of the same pipeline and date never overlap. It appears atomically and is removed when
  the run ends. A lock whose pid is dead on this host is stale and taken over (with a warning); a
  lock held from another host is never taken over. Remote outputs keep their locks in
  ``$CURATE_LOCK_DIR`` (default ``~/.cache/curate/locks``): per host only.
* ``--since D`` catches up: every date from D to the target date without a ``committed`` row in
  ``runs`` (for this pipeline) runs, oldest first. A failed night does not stop the later ones;
  the command exits 1 if any night failed, and a later ``--since`` retries it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import yaml

from jobs.errors import UserError
from jobs.ops.query import connect, is_local, views
from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.io import InputError, url_to_fs

log = logging.getLogger("curate.nightly")
_DATE_TOKEN = re.compile(r"\{date(?::([^}]*))?\}")


class LockHeld(UserError):
    """Another live run holds the lock of this pipeline and date."""


# ---------------------------------------------------------------------------------------- input


def night_url(url: str, run_date: str) -> str:
    """``url`` with ``{date}`` (ISO) or ``{date:FORMAT}`` (strftime) replaced by ``run_date``."""
    day = date.fromisoformat(run_date)
    return _DATE_TOKEN.sub(lambda m: day.strftime(m.group(1)) if m.group(1) else run_date, url)


def load_night_config(pipeline: str, run_date: str, input_url: str | None = None,
                      output_url: str | None = None, address: str | None = None) -> PipelineConfig:
    """The pipeline config for one night: ``{date}`` in the input URL substituted before validation."""
    url = input_url or raw_input_url(pipeline)
    overrides = {"input": {"url": night_url(url, run_date) if url else None},
                 "output": {"url": output_url}, "ray": {"address": address}}
    return load_config(pipeline, overrides)


def raw_input_url(pipeline: str) -> str | None:
    """``input.url`` as written in the YAML (``{date}`` and ``${VAR}`` not yet replaced)."""
    try:
        raw = yaml.safe_load(Path(pipeline).read_text()) or {}
        url = raw.get("input", {}).get("url")
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # load_config reports the problem with its field path
    return url if isinstance(url, str) else None


# ----------------------------------------------------------------------------------------- lock


def lock_path(output_url: str, pipeline: str, run_date: str) -> Path:
    """Where the lock of ``pipeline`` on ``run_date`` lives (under the output when it is local)."""
    fs, root = url_to_fs(output_url)
    if is_local(fs):
        return Path(root) / "_locks" / f"{pipeline}-{run_date}.lock"
    lock_dir = os.environ.get("CURATE_LOCK_DIR", str(Path.home() / ".cache" / "curate" / "locks"))
    digest = hashlib.sha1(output_url.encode()).hexdigest()[:10]
    return Path(lock_dir) / f"{digest}-{pipeline}-{run_date}.lock"


@contextmanager
def run_lock(path: Path) -> Iterator[dict]:
    """Hold the lock at ``path`` for the ``with`` block; raises ``LockHeld`` if a live run has it."""
    owner = acquire_lock(path)
    try:
        yield owner
    finally:
        release_lock(path, owner)


def acquire_lock(path: Path) -> dict:
    """Create the lock file atomically (fails if it exists); take over a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    for _ in range(3):
        if _create_exclusive(path, owner):
            return owner
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile: try again
        if holder.get("unreadable"):
            raise LockHeld(f"{path} is unreadable; remove it if no run of this night is going")
        if not is_stale(holder):
            raise LockHeld(f"{path} is held by pid {holder.get('pid')} on {holder.get('host')} "
                           f"since {holder.get('started_at')}: that run is still going")
        _remove_stale(path, holder)
    raise LockHeld(f"could not take the lock {path}: other runs keep racing for it")


def _create_exclusive(path: Path, owner: dict) -> bool:
    """Write the owner to a private file (O_CREAT|O_EXCL), then hard-link it into place.

    ``link`` fails when the lock exists, like O_EXCL, and a reader never sees a half-written lock.
    """
    private = path.with_name(f".{path.name}.{owner['token']}")
    fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink()


def read_lock(path: Path) -> dict | None:
    """The lock's owner, or None when there is no lock."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started_at": None, "unreadable": True}


def is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its pid is gone (other hosts: never stale)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _remove_stale(path: Path, holder: dict) -> None:
    """Move the stale lock aside; if it changed since we read it, put it back untouched."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    if read_lock(aside) != holder:  # a new owner slipped in between our read and the rename
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log.warning("taking over stale lock %s: pid %s on %s (since %s) is gone", path,
                    holder["pid"], holder["host"], holder["started_at"])
    aside.unlink()


def release_lock(path: Path, owner: dict) -> None:
    """Remove the lock if it is still ours."""
    holder = read_lock(path)
    if holder is not None and holder.get("token") == owner["token"]:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- catch-up


def date_range(start: str, end: str) -> list[str]:
    """Every ISO date from ``start`` to ``end``, inclusive."""
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    if first > last:
        raise UserError(f"--since {start} is after the run date {end}")
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def committed_dates(output_url: str, pipeline: str) -> set[str]:
    """Dates with a ``committed`` row of ``pipeline`` in the ``runs`` table."""
    con = connect(output_url)
    try:
        if "runs" not in views(con):
            return set()
        rows = con.execute("SELECT DISTINCT run_date FROM runs WHERE status = 'committed' "
                           "AND pipeline = ?", [pipeline]).fetchall()
        return {r[0] for r in rows}
    finally:
        con.close()


def missing_dates(output_url: str, pipeline: str, since: str, until: str) -> list[str]:
    """Dates from ``since`` to ``until`` not yet committed, oldest first."""
    done = committed_dates(output_url, pipeline)
    return [d for d in date_range(since, until) if d not in done]


# -------------------------------------------------------------------------------------- command


def nightly_command(args: argparse.Namespace) -> int:
    """Run every night that needs it; print each summary, then which nights failed."""
    cfg = _night_config(args, args.date)
    dates = missing_dates(cfg.output.url, cfg.name, args.since or args.date, args.date)
    if args.force and args.date not in dates:
        dates.append(args.date)
    if not dates:
        print(f"nothing to do: {cfg.name} is committed for every night up to {args.date}")
        return 0
    print(f"{cfg.name}: running {len(dates)} night(s): {', '.join(dates)}")
    failed = {d: err for d in dates if (err := run_night(args, d)) is not None}
    for d, err in failed.items():
        print(f"night {d} FAILED: {err}")
    return 1 if failed else 0


def run_night(args: argparse.Namespace, run_date: str) -> str | None:
    """Run one night under its lock; returns the error, or None when it committed."""
    from jobs.ops.report import write_report
    from jobs.ops.summary import format_summary
    from pipelines.runner import run_pipeline

    try:
        cfg = _night_config(args, run_date)
        with run_lock(lock_path(cfg.output.url, cfg.name, run_date)):
            result = run_pipeline(cfg, run_date)
    except (UserError, ConfigError, InputError) as err:
        return str(err)
    except Exception as err:  # one broken night must not stop the others
        log.exception("night %s failed", run_date)
        return f"{type(err).__name__}: {err}"
    print(format_summary(result))
    try:
        print(f"report: {write_report(cfg.output.url, run_date)}")
    except Exception:  # the night is committed; a report problem is only logged
        log.exception("report for %s failed", run_date)
    return None


def _night_config(args: argparse.Namespace, run_date: str) -> PipelineConfig:
    try:
        return load_night_config(args.pipeline, run_date, args.input, args.output, args.address)
    except ConfigError as err:
        raise UserError(str(err)) from None
