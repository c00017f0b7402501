"""Fingerprints of what a stage computes with: its config, the files it names, the code it runs.

A stage's fingerprint (``stage_fingerprint``) is the sha256 of a JSON document holding

* ``op`` and the stage's ``cache_version`` (bumped when the operator's output changes);
* every config field except ``cache_ignore`` (resources, batch sizes, finalize-only settings);
* the columns it provides;
* for every string in the config that names a file or directory (a model, a tokenizer, a head's
  weights, a frequency table): the sha256 of its content (a directory: of every file in it, by
  relative path); an object store URL (``s3://…``): its size and ETag / modification time;
* the versions of the stage's ``cache_packages`` (torch, transformers, tokenizers…);
* the fingerprints of the earlier stages that make the columns it reads (``requires``).

Two runs whose stage fingerprints are equal compute the same columns for the same text. Hashing
multi-GB weights every night would cost minutes, so a file's hash is remembered by
(real path, size, modification time in ns) in ``$CURATE_CACHE_DIR/fingerprints/files.json``: a file
rewritten in place gets a new mtime, hence a new hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from operators.base import StageConfig
from operators.cache import cache_dir

log = logging.getLogger("curate.cache")
#: Directories with more files than this are fingerprinted by their listing (path, size, mtime).
MAX_HASHED_FILES = 10_000
_CHUNK = 1 << 20


def _known_hashes() -> Path:
    return cache_dir("fingerprints") / "files.json"


def _load_known() -> dict[str, Any]:
    try:
        return json.loads(_known_hashes().read_text())
    except (OSError, ValueError):
        return {}


def _save_known(known: dict[str, Any]) -> None:
    """Write the remembered hashes atomically (a concurrent run may write them too: last wins)."""
    target = _known_hashes()
    with contextlib.suppress(OSError):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, target)


def file_sha256(path: Path, known: dict[str, Any] | None = None) -> str:
    """sha256 of a file's bytes, remembered in ``known`` by (real path, size, mtime_ns)."""
    stat = path.stat()
    real = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    if known is not None and known.get(real, {}).get("stamp") == stamp:
        return known[real]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if known is not None:
        known[real] = {"stamp": stamp, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def path_fingerprint(value: str, known: dict[str, Any] | None = None) -> str | None:
    """A fingerprint of the file or directory ``value`` names, None when it names none.

    Local file: its sha256. Local directory: sha256 over (relative path, file sha256) of its files.
    URL with ``://``: sha256 of its size and ETag / mtime from the store (no download)."""
    if "://" in value and not value.startswith("file://"):
        return _remote_fingerprint(value)
    local = Path(value.removeprefix("file://")).expanduser()
    try:
        if local.is_file():
            return file_sha256(local, known)
        if not local.is_dir():
            return None
    except OSError:
        return None
    files = sorted(p for p in local.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    if len(files) > MAX_HASHED_FILES:
        for p in files:
            st = p.stat()
            digest.update(f"{p.relative_to(local)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "listing:" + digest.hexdigest()
    for p in files:
        digest.update(f"{p.relative_to(local)}\0{file_sha256(p, known)}\n".encode())
    return digest.hexdigest()


def _remote_fingerprint(url: str) -> str | None:
    from pipelines.io import url_to_fs

    try:
        fs, path = url_to_fs(url)
        if not fs.exists(path):
            return None
        infos = [fs.info(path)] if fs.isfile(path) else list(fs.find(path, detail=True).values())
    except Exception as err:  # noqa: BLE001 - unknown: the caller refuses to cache with it
        raise OSError(f"cannot fingerprint {url}: {type(err).__name__}: {err}") from None
    stamps = sorted(json.dumps([i.get("name"), i.get("size"),
                                str(i.get("ETag") or i.get("etag") or i.get("md5Hash") or i.get("mtime")
                                    or i.get("LastModified") or i.get("updated"))]) for i in infos)
    return "remote:" + hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None when not installed)."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def stage_document(stage: StageConfig, dependencies: dict[str, str],
                   known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``stage_fingerprint`` hashes (see the module docstring); ``dependencies``: the
    fingerprints of the earlier stages whose columns it reads, by stage name."""
    config = stage.model_dump(mode="json", exclude=set(stage.cache_ignore))
    files = {}
    for value in sorted(set(_strings(config))):
        fingerprint = path_fingerprint(value, known)
        if fingerprint is not None:
            files[value] = fingerprint
    return {"op": stage.op, "version": stage.cache_version, "config": config,
            "provides": stage.provides(), "files": files,
            "packages": package_versions(stage.cache_packages), "depends_on": dict(sorted(dependencies.items()))}


def stage_fingerprint(stage: StageConfig, dependencies: dict[str, str],
                      known: dict[str, Any] | None = None) -> str:
    """sha256 (hex) of ``stage_document``."""
    blob = json.dumps(stage_document(stage, dependencies, known), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_fingerprints(stages: list[StageConfig], wanted: set[str]) -> dict[str, str | None]:
    """Fingerprint of each stage named in ``wanted`` (computed with those of the earlier stages it
    reads from); None for a stage that reads a column no earlier stage makes (an input column: the
    text alone does not decide its output, so it is never cached) or whose files cannot be read."""
    known = _load_known()
    done: dict[int, str | None] = {}

    def fingerprint(i: int) -> str | None:
        if i in done:
            return done[i]
        stage, earlier = stages[i], stages[:i]
        deps: dict[str, str] = {}
        result: str | None = ""
        for need in stage.requires():
            makers = [j for j, s in enumerate(earlier) if set(need.columns) & set(s.provides())]
            if not makers:
                result = None
            for j in makers:
                fp = fingerprint(j)
                if fp is None:
                    result = None
                else:
                    deps[stages[j].stage_name] = fp
        if result is not None:
            try:
                result = stage_fingerprint(stage, deps, known)
            except OSError as err:
                log.warning("cache: %s runs without the cache: %s", stage.stage_name, err)
                result = None
        done[i] = result
        return result

    found = {s.stage_name: fingerprint(i) for i, s in enumerate(stages) if s.stage_name in wanted}
    _save_known(known)
    return found


def configs_fingerprint(stages: list[StageConfig]) -> str | None:
    """One fingerprint of several stage configs together (each as ``stage_fingerprint`` with no
    dependencies), for results derived from them outside the stage cache; None when a file they
    name cannot be fingerprinted."""
    known = _load_known()
    try:
        parts = [stage_fingerprint(s, {}, known) for s in stages]
    except OSError as err:
        log.warning("cannot fingerprint %s: %s", ", ".join(s.stage_name for s in stages), err)
        return None
    _save_known(known)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
