"""One run per (output, date): a lock file beside the catalog, naming its holder.

``<output>/_locks/<date>.lock`` (JSON: pid, host, start time) appears atomically and is removed when
the run ends. A lock whose pid is dead on this host is stale and taken over (with a warning); a lock
held from another host is never taken over. Remote outputs keep their locks in ``$CURATE_LOCK_DIR``
(default ``~/.cache/curate/locks``): per host only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipelines.io import url_to_fs

log = logging.getLogger("curate.lock")


class LockHeld(RuntimeError):
    """Another live run holds the lock of this output and date."""


def lock_path(output_url: str, run_date: str) -> Path:
    """Where the lock of ``run_date`` on this output lives (beside the catalog when it is local)."""
    fs, root = url_to_fs(output_url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return Path(root).absolute() / "_locks" / f"{run_date}.lock"
    lock_dir = os.environ.get("CURATE_LOCK_DIR", str(Path.home() / ".cache" / "curate" / "locks"))
    digest = hashlib.sha1(output_url.encode()).hexdigest()[:10]
    return Path(lock_dir) / f"{digest}-{run_date}.lock"


@contextmanager
def run_lock(path: Path) -> Iterator[dict]:
    """Hold the lock at ``path`` for the ``with`` block; raises ``LockHeld`` if a live run has it."""
    owner = acquire_lock(path)
    try:
        yield owner
    finally:
        release_lock(path, owner)


def acquire_lock(path: Path) -> dict:
    """Create the lock file atomically (fails if it exists); take over a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    for _ in range(3):
        if _create_exclusive(path, owner):
            return owner
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile: try again
        if holder.get("unreadable"):
            raise LockHeld(f"{path} is unreadable; remove it if no run of this night is going")
        if not is_stale(holder):
            raise LockHeld(f"a run of this date is already going: {path} is held by pid {holder.get('pid')} on {holder.get('host')} "
                           f"since {holder.get('started_at')}: that run is still going")
        _remove_stale(path, holder)
    raise LockHeld(f"could not take the lock {path}: other runs keep racing for it")


def _create_exclusive(path: Path, owner: dict) -> bool:
    """Write the owner to a private file (O_CREAT|O_EXCL), then hard-link it into place.

    ``link`` fails when the lock exists, like O_EXCL, and a reader never sees a half-written lock.
    """
    private = path.with_name(f".{path.name}.{owner['token']}")
    fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink()


def read_lock(path: Path) -> dict | None:
    """The lock's owner, or None when there is no lock."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started_at": None, "unreadable": True}


def is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its pid is gone (other hosts: never stale)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _remove_stale(path: Path, holder: dict) -> None:
    """Move the stale lock aside; if it changed since we read it, put it back untouched."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    if read_lock(aside) != holder:  # a new owner slipped in between our read and the rename
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log.warning("taking over stale lock %s: pid %s on %s (since %s) is gone", path,
                    holder["pid"], holder["host"], holder["started_at"])
    aside.unlink()


def release_lock(path: Path, owner: dict) -> None:
    """Remove the lock if it is still ours."""
    holder = read_lock(path)
    if holder is not None and holder.get("token") == owner["token"]:
        path.unlink(missing_ok=True)


def held_locks(output_url: str) -> dict[str, dict]:
    """Run date -> holder of every lock of this output that a live run holds (``pipelines.maintain``).

    Stale locks (a dead pid on this host) are left out; unreadable ones and those from other hosts
    count as held, since nothing here can tell that their run is gone.
    """
    probe = lock_path(output_url, "DATE")
    prefix, suffix = probe.name.split("DATE")
    if not probe.parent.is_dir():
        return {}
    held = {}
    for path in sorted(probe.parent.glob(f"{prefix}*{suffix}")):
        run_date = path.name[len(prefix):len(path.name) - len(suffix)]
        if path.name.startswith(".") or not run_date:
            continue
        holder = read_lock(path)
        if holder is not None and (holder.get("unreadable") or not is_stale(holder)):
            held[run_date] = holder
    return held
