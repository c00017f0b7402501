"""The docs run as written: README.md's cheap shell commands against a committed run, and every
relative link in README.md, bench/README.md and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_DATE = "2026-03-04"  # the date README.md's examples query

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def fenced(text: str, *langs: str) -> list[str]:
    """The bodies of the fenced blocks of ``text`` whose language is one of ``langs``."""
    return [body for lang, body in FENCE.findall(text) if lang in langs]


def shell_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of every console/sh/bash block: a console block's commands
    start with ``$ ``, the lines up to the next one are its output; in sh/bash every line is a
    command. Lines ending in a backslash continue."""
    commands: list[tuple[str, list[str]]] = []
    for lang, body in FENCE.findall(text):
        if lang not in ("console", "sh", "bash"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            if lang == "console" and not line.startswith("$ "):
                if commands and line.strip():
                    commands[-1][1].append(line)
                continue
            command = line.removeprefix("$ ").strip()
            if command and not command.startswith("#"):
                commands.append((command, []))
    return commands


def cheap(argv: list[str]) -> bool:
    """A command the test runs: ``curate`` help, ``query`` or ``tables``."""
    return argv[:1] == ["curate"] and ("--help" in argv or argv[1:2] in (["query"], ["tables"]))


def squash(text: str) -> str:
    return " ".join(text.split())


def test_readme_shell_blocks_run_as_written(local_ray, small_corpus: Path, monkeypatch, capsys) -> None:
    from jobs.cli.main import main
    from pipelines.config import parse_config
    from pipelines.runner import run_pipeline

    text = README.read_text()
    monkeypatch.chdir(small_corpus.parent)
    monkeypatch.delenv("CURATE_OUTPUT", raising=False)
    minimal = yaml.safe_load(fenced(text, "yaml")[0])
    tiny = tiny_pipeline("./corpus/", "./output", name=minimal["name"])
    assert minimal == tiny | {"stages": [s | {"ref_lang": "eng_Latn"} for s in tiny["stages"]]}, \
        "README's minimal pipeline is no longer tests/conftest.py's tiny_pipeline (ref_lang spelt out)"
    parse_config(minimal)  # validates as written
    run_pipeline(parse_config(tiny), RUN_DATE)
    capsys.readouterr()

    ran = []
    for command, expected in shell_commands(text):
        argv = shlex.split(command, comments=True)
        if not cheap(argv):
            continue
        try:
            status = main(argv[1:])
        except SystemExit as exit_:  # --help
            status = exit_.code
        out = capsys.readouterr()
        assert status == 0, f"README: `{command}` exited {status}: {out.err[-2000:]}"
        for line in expected:
            assert squash(line) in squash(out.out), f"README: `{command}` did not print {line!r}:\n{out.out}"
        ran.append(argv[1])
    assert {"--help", "query", "tables"} <= set(ran) and len(ran) >= 6, ran


def test_shell_commands_are_parsed_with_their_output() -> None:
    text = "```console\n$ curate tables\ntable  rows\n$ curate query \\\n  'SELECT 1'\n```\n" \
           "```bash\nmake run   # demo\n# a comment\n```\n```yaml\nname: x\n```\n"
    assert shell_commands(text) == [("curate tables", ["table  rows"]), ("curate query    'SELECT 1'", []),
                                    ("make run   # demo", [])]
    assert [cheap(shlex.split(c, comments=True)) for c, _ in shell_commands(text)] == [True, True, False]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (outside code blocks), duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            base = slug(m.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def test_slug_follows_github() -> None:
    assert slug("Min-K%++ from top-k estimates") == "min-k-from-top-k-estimates"
    assert slug("`token_premium`") == "token_premium"
    assert slug("Output on an object store, catalog in Postgres") == "output-on-an-object-store-catalog-in-postgres"
    assert slug("Replay a night's quarantine") == "replay-a-nights-quarantine"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_doc_is_linked_from_the_readme_or_docs() -> None:
    linked = {(doc.parent / t.partition("#")[0]).resolve() for doc in DOCS
              for t in LINK.findall(FENCE.sub("", doc.read_text())) if not re.match(r"[a-z]+:", t)}
    assert not [str(d.relative_to(ROOT)) for d in DOCS[1:] if d.resolve() not in linked]


def test_bench_readme_owns_the_tables_run_all_writes(tmp_path: Path) -> None:
    from bench import run_all

    assert run_all.README == ROOT / "bench" / "README.md"
    text = run_all.README.read_text()
    markers = [(run_all.START, run_all.END)] + [(f"<!-- {n}:start -->", f"<!-- {n}:end -->") for n in run_all.TESTBEDS]
    for start, end in markers:
        assert text.count(start) == 1 and text.count(end) == 1, start
        assert start not in README.read_text(), f"README.md still holds {start}"
    copy = tmp_path / "README.md"
    copy.write_text(text)
    run_all.write_readme("| new |", path=copy)
    assert copy.read_text().split(run_all.START)[1].split(run_all.END)[0] == "\n| new |\n"
    assert copy.read_text().split(run_all.END)[1] == text.split(run_all.END)[1]
