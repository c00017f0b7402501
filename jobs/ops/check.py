"""``curate check`` and ``curate recover``: verify an output's committed files, repair its catalog.

``check`` opens every table's metadata and every data file the committed snapshots reference (each
file's Parquet footer is read) and prints one line per problem naming table and file; exit 1 when
any. ``recover`` points tables whose metadata file is missing or broken back at their newest readable
metadata, registers tables the catalog lost (pyiceberg ``register_table``) and replaces an unreadable
catalog database (kept aside); then it checks again (``pipelines.recover``).

``reading_storage`` turns a storage failure of a reading verb (``query``, ``tables``, ``report``) into
one ``curate: error:`` line naming the file and the table.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable

from jobs.errors import UserError
from pipelines.recover import recover, verify
from pipelines.tables import NAMESPACE, CatalogError, open_output

_TABLE_IN_PATH = re.compile(rf"/{NAMESPACE}/([^/]+)/metadata/|/_data/([^/]+)/")


def check_command(args: argparse.Namespace) -> int:
    """Print every problem of the output's committed state; 0 when there is none."""
    problems, opened = verify(open_output(args.output))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) under {args.output}; see: curate recover --output {args.output}")
        return 1
    print(f"ok: the catalog and all {opened} committed data file(s) under {args.output} open")
    return 0


def recover_command(args: argparse.Namespace) -> int:
    """Repair the catalog, print what was done, then check again."""
    output = open_output(args.output)
    for line in recover(output) or ["nothing to recover: every table's metadata loads"]:
        print(line)
    return check_command(args)


def reading_storage(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a reading verb: a missing or broken file or catalog becomes one ``UserError`` line."""
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (OSError, CatalogError) as err:
            raise UserError(storage_message(err, args.output)) from None
        except Exception as err:
            if type(err).__module__.split(".")[0] in ("sqlalchemy", "pyiceberg"):
                raise UserError(storage_message(err, args.output)) from None
            raise
    return wrapped


def storage_message(err: Exception, output_url: str) -> str:
    """``<table>: cannot read <file>: <why>; run curate check`` (the table taken from the file's path)."""
    path = getattr(err, "filename", None) or ""
    found = _TABLE_IN_PATH.search(path or str(err))
    table = next((g for g in found.groups() if g), None) if found else None
    what = f"table {table}: " if table else f"catalog of {output_url}: " if not path else ""
    why = (getattr(err, "strerror", None) or str(err).strip().splitlines()[0] if str(err).strip()
           else type(err).__name__)
    return (f"{what}cannot read {path or 'it'}: {type(err).__name__}: {why[:300]}; "
            f"see: curate check --output {output_url} (curate recover repairs the catalog)")
