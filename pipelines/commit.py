"""Staged writes and atomic commits of table partitions.

Layout under the output URL::

    <table>/run_date=YYYY-MM-DD/part-*.parquet + _manifest.json    committed, visible
    _staging/<run_date>/<run_id>/<table>/...                       being written, invisible
    _trash/<run_id>/<table>/run_date=...                           the partition a commit replaced

A commit writes the manifest into the staged partition, moves the old partition (if any) to
``_trash``, then renames the staged partition into place: one directory rename, so a reader sees
the old partition or the new one, never a mix. Readers only trust partitions with a manifest and
only the files it lists. ``recover`` undoes a commit that died between the two renames. On object
stores (no atomic rename) the manifest, written last, is what makes a partition visible.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from pipelines.io import url_to_fs

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run (``root`` is the output path inside ``fs``)."""

    fs: fsspec.AbstractFileSystem
    root: str
    run_date: str
    run_id: str

    @classmethod
    def for_url(cls, url: str, run_date: str, run_id: str) -> RunLayout:
        fs, root = url_to_fs(url)
        return cls(fs, root.rstrip("/"), run_date, run_id)

    def table_dir(self, table: str) -> str:
        return f"{self.root}/{table}/run_date={self.run_date}"

    @property
    def staging_root(self) -> str:
        return f"{self.root}/_staging/{self.run_date}/{self.run_id}"

    def staging_dir(self, table: str) -> str:
        return f"{self.staging_root}/{table}/run_date={self.run_date}"

    def trash_dir(self, table: str) -> str:
        return f"{self.root}/_trash/{self.run_id}/{table}/run_date={self.run_date}"

    def url(self, path: str) -> str:
        """A path of this layout as a URL that fsspec (and Ray workers) can open."""
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def code_version() -> str:
    """``git describe`` of the code when it runs from a checkout, else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("curate")
    except PackageNotFoundError:
        return "unknown"


def clear_stale_staging(layout: RunLayout) -> None:
    """Remove staging left by earlier, interrupted runs of the same date (never visible)."""
    stale = f"{layout.root}/_staging/{layout.run_date}"
    if layout.fs.exists(stale):
        layout.fs.rm(stale, recursive=True)


def staged_tables(layout: RunLayout) -> list[str]:
    """Tables this run has staged so far."""
    if not layout.fs.exists(layout.staging_root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in layout.fs.ls(layout.staging_root, detail=False))


def write_manifest(layout: RunLayout, table: str, extra: dict) -> dict:
    """Describe the staged partition of ``table``: files, rows, schema, plus ``extra``."""
    fs, staged = layout.fs, layout.staging_dir(table)
    files = sorted(p for p in fs.find(staged) if p.endswith(".parquet"))
    rows, schema = 0, None
    for path in files:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            rows += meta.metadata.num_rows
            schema = schema or meta.schema_arrow
    manifest = {
        "table": table, "run_date": layout.run_date, "run_id": layout.run_id, "rows": rows,
        "files": [p.rsplit("/", 1)[-1] for p in files],
        "schema": [[f.name, str(f.type)] for f in schema] if schema else [],
        "committed_at": datetime.now(UTC).isoformat(timespec="seconds"), **extra,
    }
    fs.makedirs(staged, exist_ok=True)
    with fs.open(f"{staged}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def commit_table(layout: RunLayout, table: str) -> None:
    """Swap the staged partition of ``table`` into place (old one to ``_trash``, then deleted)."""
    fs, target, trash = layout.fs, layout.table_dir(table), layout.trash_dir(table)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    if fs.exists(target):
        fs.makedirs(trash.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(target, trash, recursive=True)
    fs.mv(layout.staging_dir(table), target, recursive=True)
    if fs.exists(trash):
        fs.rm(trash, recursive=True)


def commit_run(layout: RunLayout, manifest_extra: dict) -> dict[str, dict]:
    """Write manifests and commit every staged table of the run; returns manifests by table."""
    manifests = {t: write_manifest(layout, t, manifest_extra) for t in staged_tables(layout)}
    for table in manifests:
        commit_table(layout, table)
    clear_stale_staging(layout)
    return manifests


def recover(url: str) -> list[str]:
    """Restore partitions whose commit died after moving them to ``_trash``; returns them."""
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    restored = []
    for trashed in fs.glob(f"{root}/_trash/*/*/run_date=*"):
        run_table = trashed.split("/_trash/", 1)[1].split("/", 1)[1]  # <table>/run_date=D
        target = f"{root}/{run_table}"
        if not fs.exists(f"{target}/{MANIFEST}"):
            if fs.exists(target):
                fs.rm(target, recursive=True)
            fs.mv(trashed, target, recursive=True)
            restored.append(target)
        else:
            fs.rm(trashed, recursive=True)
    return restored
