"""Subcommands to operate curate: query, tables, report, nightly, maintain, schedule, submit, jobs, quarantine."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable

from jobs.cli.run import add_allow_shrink, parse_date, today
from jobs.cli.verbs import verb

DEFAULT_OUTPUT = os.environ.get("CURATE_OUTPUT", "./output")


def register(sub: argparse._SubParsersAction) -> None:
    """Add every operating subcommand to the ``curate`` parser."""
    for add in (_query, _tables, _report, _nightly, _maintain, _cache, _schedule, _submit, _jobs, _quarantine,
                _check, _recover):
        add(sub)


def _lazy(module: str, name: str, reading: bool = False) -> Callable[[argparse.Namespace], int]:
    """A handler that imports its module only when its command runs (keeps ``curate -h`` fast);
    ``reading``: a storage failure is one ``curate: error:`` line (``jobs.ops.check.reading_storage``)."""
    def handler(args: argparse.Namespace) -> int:
        run = getattr(importlib.import_module(module), name)
        if reading:
            run = importlib.import_module("jobs.ops.check").reading_storage(run)
        return run(args)
    return handler


def _output(p: argparse.ArgumentParser) -> None:
    """``--output``, ``--pipeline``, ``--catalog`` and ``--storage``: which output a reader reads
    (resolved by ``jobs.ops.target.output_from_args``)."""
    p.add_argument("--output", default=None,
                   help="output URL of the tables (default: the pipeline's output.url, else "
                        "$CURATE_OUTPUT or ./output)")
    p.add_argument("--pipeline", dest="output_pipeline", metavar="FILE",
                   help="pipeline YAML whose output section (url, catalog, storage) to read")
    p.add_argument("--catalog", action="append", default=[], metavar="KEY=VALUE",
                   help="pyiceberg property of a shared catalog (repeatable), e.g. type=sql uri=postgresql+psycopg2://...")
    p.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                   help="object store setting (repeatable): endpoint, region, key, secret, token "
                        "(default: the AWS_* environment variables)")
    p.set_defaults(default_output=DEFAULT_OUTPUT)


def _query(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "query", "SQL (DuckDB) over the committed tables",
             'curate query "SELECT lang, count(*) FROM documents GROUP BY lang" --output ./output')
    p.add_argument("sql", help='e.g. "SELECT lang, count(*) FROM documents GROUP BY lang"')
    _output(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="json: one object per line")
    p.add_argument("--date", type=parse_date, help="only this run date's partitions")
    p.add_argument("--as-of", dest="as_of", metavar="RUN_ID",
                   help="the tables as they were when this run committed (time travel)")
    p.set_defaults(func=_lazy("jobs.ops.query", "query_command", reading=True))


def _tables(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "tables", "list the tables, their dates and row counts", "curate tables --output ./output")
    _output(p)
    p.set_defaults(func=_lazy("jobs.ops.query", "tables_command", reading=True))


def _report(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "report", "path of a night's HTML report, or of the trend across nights",
             "curate report --output ./output --date 2026-01-31",
             "curate report --trend --since 2026-01-01 --output ./output")
    p.add_argument("--date", type=parse_date, help="run date (default: the latest committed)")
    _output(p)
    p.add_argument("--columns", nargs="+", help="score columns to chart (default: float columns)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if it exists")
    p.add_argument("--trend", action="store_true",
                   help="one page across nights: counts, speed, selection, score quantiles, drift flags")
    p.add_argument("--since", type=parse_date, help="--trend: first night shown (default: all)")
    p.set_defaults(func=_report_or_trend)


def _report_or_trend(args: argparse.Namespace) -> int:
    """``curate report``: one night's page, or with ``--trend`` the page across nights."""
    if args.trend:
        return _lazy("jobs.ops.trend", "trend_command", reading=True)(args)
    return _lazy("jobs.ops.report", "report_command", reading=True)(args)


def _nightly(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "nightly", "run tonight's input under a lock; --since catches up",
             "curate nightly pipelines/nightly.yaml --since 2026-01-01 --fail-on-drift")
    p.add_argument("pipeline", help="pipeline YAML ({date} in input.url becomes the run date)")
    p.add_argument("--date", type=parse_date, default=today(), help="run date (default: today, UTC)")
    p.add_argument("--since", type=parse_date,
                   help="also run every uncommitted date from this one on, oldest first")
    p.add_argument("--force", action="store_true", help="rerun --date even if committed")
    p.add_argument("--input", help="override input.url ({date} is substituted)")
    p.add_argument("--output", help="override output.url")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    p.add_argument("--fail-on-drift", action="store_true",
                   help="exit 3 when a night drifts (see curate report --trend); logged either way")
    add_allow_shrink(p)
    p.set_defaults(func=_lazy("jobs.ops.nightly", "nightly_command"))


def _maintain(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "maintain", "expire old snapshots and remove orphan files of the tables",
             "curate maintain --output ./output --retain-days 14 --dry-run")
    _output(p)
    p.add_argument("--retain-days", dest="retain_days", type=_days, default=14, metavar="N",
                   help="keep snapshots (and --as-of) of runs committed in the last N days (default 14); "
                        "each date's latest run is always kept")
    p.add_argument("--grace-hours", dest="grace_hours", type=_hours, default=24, metavar="H",
                   help="remove unreferenced files only when older than H hours (default 24; "
                        "longer than any run, which commits the files it writes)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print what would be removed, remove nothing")
    p.add_argument("--cache-days", dest="cache_days", type=_days, default=30, metavar="N",
                   help="remove result cache entries neither made nor used by a night in the last N days "
                        "(default 30)")
    p.set_defaults(func=_lazy("jobs.ops.maintain", "maintain_command"))


def _cache(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "cache", "result cache entries, size, and recent hits and misses",
             "curate cache stats --output ./output")
    p.add_argument("action", choices=["stats"], help="stats: per cache table and per night")
    _output(p)
    p.add_argument("--nights", type=int, default=7, help="how many recent nights to show (default 7)")
    p.set_defaults(func=_lazy("jobs.ops.cache", "cache_command", reading=True))


def _amount(unit: str) -> Callable[[str], float]:
    """An argparse type: a number of ``unit`` >= 0."""
    def parse(value: str) -> float:
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not amount >= 0:
            raise argparse.ArgumentTypeError(f"must be a number of {unit} >= 0, got {value!r}")
        return amount
    return parse


_hours, _days = _amount("hours"), _amount("days")


def _schedule(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "schedule", "install, show or remove a nightly submit or maintain in cron",
             "curate schedule install --pipeline pipelines/nightly.yaml --at 02:00",
             "curate schedule install --maintain --pipeline pipelines/nightly.yaml --at 04:00")
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
    p = verb(sub, "submit", "submit a night of a pipeline to a Ray cluster as a Ray job",
             "curate submit pipelines/nightly.yaml --address http://head:8265 --wait")
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
    p = verb(sub, "jobs", "list Ray jobs, show the status or logs of one, or stop it",
             "curate jobs logs raysubmit_XYZ --follow --address http://head:8265")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--address", help="Ray dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=_lazy("jobs.ops.submit", "jobs_command"))


def _quarantine(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "quarantine", "replay a night's quarantined rows through the pipeline",
             "curate quarantine replay pipelines/nightly.yaml --date 2026-01-31")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = verb(actions, "replay", "rerun a night's quarantined rows into a separate output",
             "curate quarantine replay pipelines/nightly.yaml --date 2026-01-31 --into ./replay")
    r.add_argument("pipeline", help="pipeline YAML (its output holds the night's quarantine table)")
    r.add_argument("--date", type=parse_date, required=True, help="the night whose quarantine is replayed")
    r.add_argument("--output", help="override output.url (where the night was committed)")
    r.add_argument("--into", help="output URL of the replay's tables (default: <output>/replays/<date>)")
    r.add_argument("--into-catalog", dest="into_catalog", action="append", default=[], metavar="KEY=VALUE",
                   help="pyiceberg property of the replay output's own catalog (repeatable; default: "
                        "the embedded one, local --into only)")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else embedded Ray)")
    add_allow_shrink(r)
    r.set_defaults(func=_lazy("jobs.ops.replay", "replay_command"))


def _check(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "check", "check that every committed file exists and opens",
             "curate check --output ./output")
    _output(p)
    p.set_defaults(func=_lazy("jobs.ops.check", "check_command", reading=True))


def _recover(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "recover", "repair the catalog: roll back or register its tables",
             "curate recover --output ./output")
    _output(p)
    p.set_defaults(func=_lazy("jobs.ops.check", "recover_command"))
