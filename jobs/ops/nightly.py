"""``curate nightly``: run a pipeline over one night's input, never twice at once, catching up.

* Input by date: ``{date}`` in ``input.url`` (or ``--input``) becomes the run date, e.g.
  ``s3://bucket/crawl/dt={date}/``; ``{date:%Y/%m/%d}`` takes a strftime format. Without it the
  whole input URL is the night's input.
* ``run_pipeline`` holds the lock of the date in the catalog (``pipelines.lock``), so two runs of
  one date never overlap, from any host, whether started by ``nightly`` or ``run``; the second is
  refused, naming the holder.
* ``--since D`` catches up: every date from D to the target date without a ``committed`` row in
  ``runs`` (for this pipeline) runs, oldest first. A failed night does not stop the later ones;
  the command exits 1 if any night failed, and a later ``--since`` retries it.
* Drift: after the nights ran (or, with nothing to do, for ``--date``) each night's flags
  (``jobs.ops.trend``) are logged; ``--fail-on-drift`` then exits 3.
"""

from __future__ import annotations

import argparse
import logging
import re
from datetime import date, timedelta
from pathlib import Path

import yaml

from jobs.errors import UserError
from operators.base import RunFailed
from pipelines import tables
from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.io import InputError
from pipelines.lock import LockHeld, LockLost
from pipelines.tables import CatalogError, NothingCommitted, Output, open_output, output_of_config

log = logging.getLogger("curate.nightly")
_DATE_TOKEN = re.compile(r"\{date(?::([^}]*))?\}")


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


# ------------------------------------------------------------------------------------- catch-up


def date_range(start: str, end: str) -> list[str]:
    """Every ISO date from ``start`` to ``end``, inclusive."""
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    if first > last:
        raise UserError(f"--since {start} is after the run date {end}")
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def committed_dates(output: str | Output, pipeline: str, catalog: dict | None = None) -> set[str]:
    """Dates with a ``committed`` row of ``pipeline`` in the ``runs`` table (none when nothing was
    ever committed; a catalog that cannot be opened is an error)."""
    out = output if isinstance(output, Output) else open_output(output, catalog)
    try:
        return tables.committed_dates(out.catalog(), pipeline)
    except NothingCommitted:
        return set()
    except CatalogError as err:
        raise UserError(str(err)) from None


def missing_dates(output: str | Output, pipeline: str, since: str, until: str,
                  catalog: dict | None = None) -> list[str]:
    """Dates from ``since`` to ``until`` not yet committed, oldest first."""
    done = committed_dates(output, pipeline, catalog)
    return [d for d in date_range(since, until) if d not in done]


# -------------------------------------------------------------------------------------- command


def nightly_command(args: argparse.Namespace) -> int:
    """Run every night that needs it; print each summary, then which nights failed."""
    cfg = _night_config(args, args.date)
    dates = missing_dates(output_of_config(cfg), cfg.name, args.since or args.date, args.date)
    if args.force and args.date not in dates:
        dates.append(args.date)
    if not dates:
        print(f"nothing to do: {cfg.name} is committed for every night up to {args.date}")
        return 3 if drifted(cfg, [args.date]) and args.fail_on_drift else 0
    print(f"{cfg.name}: running {len(dates)} night(s): {', '.join(dates)}")
    failed = {d: err for d in dates if (err := run_night(args, d)) is not None}
    for d, err in failed.items():
        print(f"night {d} FAILED: {err}")
    drift = drifted(cfg, [d for d in dates if d not in failed])
    return 1 if failed else 3 if drift and args.fail_on_drift else 0


def drifted(cfg: PipelineConfig, dates: list[str]) -> bool:
    """Log the drift flags of ``dates`` (``jobs.ops.trend``: quarantine share or a score's median more
    than 3 MADs from the trailing 14 nights); True when any night is flagged."""
    from jobs.ops.trend import check_drift

    if not dates:
        return False
    try:
        return bool(check_drift(output_of_config(cfg), dates))
    except Exception:  # the nights are committed; a problem reading them back is only logged
        log.exception("drift check of %s failed", ", ".join(dates))
        return False


def run_night(args: argparse.Namespace, run_date: str) -> str | None:
    """Run one night under its lock; returns the error, or None when it committed."""
    from jobs.ops.report import write_report
    from jobs.ops.summary import format_summary
    from pipelines.runner import run_pipeline

    try:
        cfg = _night_config(args, run_date)
        result = run_pipeline(cfg, run_date,  # holds the lock of (output, date) while it runs
                              allow_shrink=getattr(args, "allow_shrink", False))
    except (UserError, ConfigError, InputError, LockHeld, LockLost, CatalogError, RunFailed) as err:
        return str(err)  # RunFailed: the budget or the shrink guard (pipelines.guards), recorded in runs
    except OSError as err:  # a full disk, a lost mount: one line, the other nights go on
        from jobs.cli.run import storage_error

        return storage_error(err, args.output or args.pipeline)
    except Exception as err:  # one broken night must not stop the others
        log.exception("night %s failed", run_date)
        return f"{type(err).__name__}: {err}"
    print(format_summary(result))
    try:
        print(f"report: {write_report(output_of_config(cfg), run_date)}")
    except Exception:  # the night is committed; a report problem is only logged
        log.exception("report for %s failed", run_date)
    return None


def _night_config(args: argparse.Namespace, run_date: str) -> PipelineConfig:
    try:
        return load_night_config(args.pipeline, run_date, args.input, args.output, args.address)
    except ConfigError as err:
        raise UserError(str(err)) from None
