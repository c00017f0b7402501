"""The ``curate`` command line. Each subcommand lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jobs.errors import UserError

__all__ = ["UserError", "build_parser", "main"]

# Modules that add subcommands; each defines ``register(subparsers)``.
COMMAND_MODULES = ["jobs.run_cmd", "jobs.ops_cmds", "jobs.eval_cmd", "jobs.freq_cmd", "jobs.pawn_cmd",
                   "jobs.sae_cmd", "jobs.sae_eval_cmd", "jobs.preselect_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
