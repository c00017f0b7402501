"""How a ``curate`` verb presents itself: one line of what it does, and examples to copy."""

from __future__ import annotations

import argparse


def verb(sub: argparse._SubParsersAction, name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
    """Add the subcommand ``name``: ``summary`` in ``curate --help`` and atop its own ``--help``,
    which ends with ``examples`` (full command lines)."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=summary.replace("%", "%%"), description=summary, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
