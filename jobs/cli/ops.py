"""Subcommands to operate curate: query, tables, report, nightly, maintain, schedule, submit, jobs."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable

from jobs.cli.run import parse_date, today

DEFAULT_OUTPUT = os.environ.get("CURATE_OUTPUT", "./output")


def register(sub: argparse._SubParsersAction) -> None:
    """Add every operating subcommand to the ``curate`` parser."""
    for add in (_query, _tables, _report, _nightly, _maintain, _schedule, _submit, _jobs):
        add(sub)


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports its module only when its command runs (keeps ``curate -h`` fast)."""
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)
    return handler


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help="output URL of the tables (default: $CURATE_OUTPUT or ./output)")


def _query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="SQL (DuckDB) over the committed tables")
    p.add_argument("sql", help='e.g. "SELECT lang, count(*) FROM documents GROUP BY lang"')
    _output(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="json: one object per line")
    p.add_argument("--date", type=parse_date, help="only this run date's partitions")
    p.add_argument("--as-of", dest="as_of", metavar="RUN_ID",
                   help="the tables as they were when this run committed (time travel)")
    p.set_defaults(func=_lazy("jobs.ops.query", "query_command"))


def _tables(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tables", help="list tables, partitions and row counts")
    _output(p)
    p.set_defaults(func=_lazy("jobs.ops.query", "tables_command"))


def _report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="print the HTML report of a run date (built if missing)")
    p.add_argument("--date", type=parse_date, help="run date (default: the latest committed)")
    _output(p)
    p.add_argument("--columns", nargs="+", help="score columns to chart (default: float columns)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if it exists")
    p.set_defaults(func=_lazy("jobs.ops.report", "report_command"))


def _nightly(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="run a night's input under a lock; --since catches up")
    p.add_argument("pipeline", help="pipeline YAML ({date} in input.url becomes the run date)")
    p.add_argument("--date", type=parse_date, default=today(), help="run date (default: today, UTC)")
    p.add_argument("--since", type=parse_date,
                   help="also run every uncommitted date from this one on, oldest first")
    p.add_argument("--force", action="store_true", help="rerun --date even if committed")
    p.add_argument("--input", help="override input.url ({date} is substituted)")
    p.add_argument("--output", help="override output.url")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    p.set_defaults(func=_lazy("jobs.ops.nightly", "nightly_command"))


def _maintain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("maintain", help="expire old snapshots and remove orphan files of the tables")
    p.add_argument("--output", help="output URL of the tables (default: the pipeline's output.url, "
                                    "else $CURATE_OUTPUT or ./output)")
    p.add_argument("--pipeline", help="pipeline YAML whose output (url and catalog) to maintain")
    p.add_argument("--retain-days", dest="retain_days", type=_days, default=14, metavar="N",
                   help="keep snapshots (and --as-of) of runs committed in the last N days (default 14); "
                        "each date's latest run is always kept")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print what would be removed, remove nothing")
    p.set_defaults(func=_lazy("jobs.ops.maintain", "maintain_command"), default_output=DEFAULT_OUTPUT)


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {value!r}")
    return days


def _schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="install/show/remove a nightly `curate submit` (or, with "
                                        "--maintain, `curate maintain`) in cron")
    p.add_argument("action", choices=["install", "show", "remove"])
    p.add_argument("--pipeline", help="pipeline YAML (remove: its name is enough)")
    p.add_argument("--at", default="02:00", help="HH:MM, cron's time zone (default 02:00)")
    p.add_argument("--address", help="Ray dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--print", choices=["systemd", "k8s"],
                   help="print a systemd timer or a Kubernetes CronJob instead of using cron")
    p.add_argument("--image", default="curate:latest", help="container image for --print k8s")
    p.add_argument("--maintain", action="store_true",
                   help="schedule `curate maintain` of the pipeline's output instead (expire old "
                        "snapshots, remove orphan files; no --address needed)")
    p.add_argument("--retain-days", dest="retain_days", type=_days, default=14, metavar="N",
                   help="with --maintain: the retention in days (default 14)")
    p.set_defaults(func=_lazy("jobs.ops.schedule", "schedule_command"))


def _submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a pipeline's night to a Ray cluster (Jobs API)")
    p.add_argument("pipeline", help="pipeline YAML, best inside the project (it is shipped)")
    p.add_argument("--address", help="Ray dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--date", type=parse_date, default=today(), help="run date (default: today, UTC)")
    p.add_argument("--output", help="override output.url on the cluster")
    p.add_argument("--wait", action="store_true", help="stream the logs; exit 0 only on SUCCEEDED")
    p.add_argument("--force", action="store_true", help="run a night that already SUCCEEDED again")
    p.add_argument("--pip", nargs="?", const="requirements.lock", metavar="REQUIREMENTS",
                   help="install these requirements in the job (default file: requirements.lock)")
    p.set_defaults(func=_lazy("jobs.ops.submit", "submit_command"))


def _jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list Ray jobs, or show the status/logs of one, or stop it")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--address", help="Ray dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=_lazy("jobs.ops.submit", "jobs_command"))
