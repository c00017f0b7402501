"""The demo cache: where assets live, and how each is built once (a lock, an atomic directory, a marker written last)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Log = Callable[[str], Any]

MARKER = ".complete.json"


class DemoAssetError(RuntimeError):
    """A demo asset could not be prepared; the message says why and what to do."""


# ---------------------------------------------------------------- cache layout and atomic writes


def cache_root() -> Path:
    """``$CURATE_CACHE`` or ``~/.cache/curate``."""
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate").expanduser()


def demo_dir(cache: Path | None) -> Path:
    demo = Path(cache or cache_root()) / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    return demo


def is_complete(path: Path, version: int = 1) -> bool:
    """True when ``path`` is a finished asset directory (its marker exists) of this ``version``
    (a marker without one is version 1)."""
    if not (path / MARKER).is_file():
        return False
    if version == 1:
        return True
    try:
        return json.loads((path / MARKER).read_text()).get("asset_version", 1) == version
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def locked(demo: Path, name: str) -> Iterator[None]:
    """Serialise preparation of one asset across processes (a second caller waits, then reuses)."""
    with open(demo / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: Path, meta: dict[str, Any]) -> Iterator[Path]:
    """Yield a temp dir next to ``final``; on success write the marker and move it into place."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the assets are meant to be shared read-only
    try:
        yield tmp
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers (safetensors) make their files private
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)  # an unfinished or outdated copy: it has no marker
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_once(name: str, build: Callable[[Path], dict[str, Any]], cache: Path | None = None,
               log: Log = print, version: int = 1) -> Path:
    """``<cache>/demo/<name>/``, built once. ``build(tmp_dir)`` fills a temp dir and returns the
    metadata for its marker; the dir then moves into place atomically. A lock makes a concurrent
    caller wait and reuse the result. A cached copy of another ``version`` is rebuilt (bump it when
    what the asset means changes)."""
    demo = demo_dir(cache)
    out = demo / name
    if is_complete(out, version):
        log(f"demo {name}: cached at {out}")
        return out
    with locked(demo, name):
        if not is_complete(out, version):
            meta: dict[str, Any] = {"asset_version": version} if version != 1 else {}
            with atomic_dir(out, meta) as tmp:  # the marker is written after the body: meta is filled
                meta.update(build(tmp))
            log(f"demo {name}: ready at {out}")
    return out


# ---------------------------------------------------------------- CPU threads


def busy_cores(window: float = 0.5) -> float:
    """Cores in use right now by all processes: ``/proc/stat`` sampled ``window`` s apart (the 1-min
    load average where there is no ``/proc``). Niced time counts as busy: with the kernel's
    autogroup scheduling (the default), a niced process of another session still takes its share."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def free_threads() -> int:
    """Threads for the demo's torch work: the cores other processes leave idle, at least 1.

    Oversubscribed cores make torch's OpenMP barriers crawl (5x slower on a 2-core box with one
    busy neighbour), so fewer threads win. ``CURATE_DEMO_THREADS`` overrides.
    """
    import torch

    if env := os.environ.get("CURATE_DEMO_THREADS"):
        return max(1, int(env))
    idle = (os.cpu_count() or 1) - round(busy_cores())
    return max(1, min(torch.get_num_threads(), idle))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
