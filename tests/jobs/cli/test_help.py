"""``curate --help`` speaks to users: every verb has one line of what it does and an example."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

from jobs.cli.main import COMMAND_MODULES, build_parser

ROOT = Path(__file__).resolve().parents[3]


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
    """Every (sub)command: its path of names -> (its parser, the one-line help in its parent)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                found[(*path, name)] = (sub, summaries[name])
                found |= _verbs(sub, (*path, name))
    return found


def _developer_text() -> list[str]:
    """Lines of the CLI modules' and their command functions' docstrings (what users must not see)."""
    lines = []
    for name in COMMAND_MODULES + ["jobs.cli.main", "jobs.cli.ops"]:
        module = importlib.import_module(name)
        docs = [ast.get_docstring(ast.parse(inspect.getsource(module)))]
        docs += [f.__doc__ for _, f in inspect.getmembers(module, inspect.isfunction) if f.__doc__]
        lines += [ln.strip() for doc in docs if doc for ln in doc.splitlines() if len(ln.strip()) > 25]
    return lines


def test_every_verb_has_one_line_and_an_example():
    verbs = _verbs(build_parser())
    assert {("run",), ("nightly",), ("report",), ("query",), ("pawn", "train"), ("preselect", "label")} <= set(verbs)
    developer = _developer_text()
    assert len(developer) > 20
    for path, (parser, summary) in verbs.items():
        text = parser.format_help()
        name = " ".join(path)
        assert summary and "\n" not in summary and len(summary.replace("%%", "%")) <= 62, name
        assert summary.replace("%%", "%") in text, name
        lines = text.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("example"))
        assert (lines[at + 1] + " ").startswith(f"  curate {name} "), (name, lines[at:])
        assert "``" not in text, name
        leaked = [d for d in developer if d in text]
        assert not leaked, (name, leaked)


def test_top_level_help_lists_every_verb_on_one_line():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    for path, (_, summary) in _verbs(build_parser()).items():
        if len(path) == 1:
            assert summary.replace("%%", "%") in proc.stdout, path
    assert "examples:\n  curate run " in proc.stdout
    assert "-v, --verbose" in proc.stdout and "Ray's own logs" in proc.stdout
