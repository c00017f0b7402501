"""A local cache for remote model files: libraries such as fastText and safetensors read local paths only."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import fsspec


def cache_dir(kind: str, override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$CURATE_CACHE_DIR/<kind>`` (default ``~/.cache/curate/<kind>``)."""
    if override is not None:
        return Path(override)
    root = os.environ.get("CURATE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "curate")
    return Path(root) / kind


def url_key(url: str) -> str:
    """The cache name of a URL: the first 16 hex digits of its sha256 (keyed by URL, not content)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename (parents created): a killed
    process never leaves a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fetch_atomic(fs: fsspec.AbstractFileSystem, remote_path: str, target: Path) -> Path:
    """Copy ``remote_path`` to ``target`` unless it is there; via a temp file and an atomic rename,
    so a killed download never leaves a partial file under the final name."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        fs.get_file(remote_path, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
