"""How a ``curate`` verb presents itself: one line of what it does, and examples to copy."""

from __future__ import annotations

import argparse


def verb(sub: argparse._SubParsersAction, name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
    """Add the subcommand ``name``: ``summary`` in ``curate --help`` and atop its own ``--help``,
    which ends with ``examples`` (full command lines)."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=summary.replace("%", "%%"), description=summary, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_table_source(p: argparse.ArgumentParser) -> None:
    """``--catalog``/``--storage`` for an input named as a committed table ``<output>/<table>`` whose
    catalog is shared (default: the output's embedded catalog)."""
    p.add_argument("--catalog", action="append", default=[], metavar="KEY=VALUE",
                   help="pyiceberg property of the input table's shared catalog (repeatable)")
    p.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                   help="object store setting of the input (repeatable): endpoint, region, key, secret")


def table_source(args: argparse.Namespace) -> dict:
    """``{"catalog": ..., "storage": ...}`` from ``add_table_source``'s options (None where not given)."""
    from jobs.ops.target import parse_pairs

    catalog = parse_pairs(getattr(args, "catalog", None) or [], "--catalog")
    storage = parse_pairs(getattr(args, "storage", None) or [], "--storage")
    return {"catalog": catalog or None, "storage": storage or None}
