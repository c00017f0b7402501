"""The ``curate`` command line: the parser, and the one place user errors become exit status 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from jobs.errors import UserError
from pipelines.progress import VERBOSE_ENV

DESCRIPTION = "curate: distributed data curation for language-model corpora, on Ray."
EPILOG = """examples:
  curate run pipelines/nightly.yaml --output ./output
  curate query "SELECT tokenizer, lang, premium FROM token_premium ORDER BY premium DESC LIMIT 5"
  curate nightly pipelines/nightly.yaml --since 2026-11-01
  curate report --output ./output"""

# Modules that add subcommands; each defines ``register(subparsers)``.
COMMAND_MODULES = ["jobs.cli.run", "jobs.cli.ops", "jobs.cli.eval", "jobs.cli.freq", "jobs.cli.pawn",
                   "jobs.cli.sae", "jobs.cli.eval_selection", "jobs.cli.preselect"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and Ray's own logs (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read by pipelines.progress in this process and in Ray jobs it submits
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 2

