"""Check and recover an output's catalog: nothing is silently lost, replaced or written elsewhere.

* ``catalog_problems``: before a run creates or uses a catalog. Refused when table metadata exists
  under ``<output>/curate/<table>/metadata/`` but the catalog is missing or lacks that table (a lost
  catalog: a new, empty one would hide every earlier night and the ``runs`` history), and when a
  table's metadata lies outside the output (a copied output: its catalog still points at the
  original, and a run would write there; Iceberg records absolute paths).
* ``verify`` (``curate check``): every table's metadata loads, and every data file the committed
  snapshots reference exists and opens as Parquet (its footer is read).
* ``recover`` (``curate recover``): a table whose metadata file is missing or broken is pointed back at
  its newest readable ``*.metadata.json`` (highest version); a table missing from the catalog is
  registered from it (pyiceberg ``register_table``); a catalog database that cannot be opened is moved
  aside (``catalog.db.broken-<time>``) and a new one registers every table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipelines.tables import (
    CATALOG_DIR,
    NAMESPACE,
    CatalogError,
    NothingCommitted,
    Output,
    committed_views,
    table_names,
)

log = logging.getLogger("curate.recover")
_VERSION = re.compile(r"^(\d+)-.*\.metadata\.json$")
RECOVER_HINT = "curate recover --output {url}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an output: the table (or ``catalog``), the file, and what."""

    table: str
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.table}: {self.what}: {self.path}"


def metadata_dirs(output: Output) -> dict[str, str]:
    """``{table: metadata directory}`` of every table with metadata files under the output."""
    fs, root = output.fs, output.root
    found = {}
    for path in fs.glob(f"{root}/{NAMESPACE}/*/metadata/*.metadata.json"):
        directory = path.rsplit("/", 1)[0]
        found.setdefault(directory.rsplit("/", 2)[-2], directory)
    return dict(sorted(found.items()))


def newest_readable(output: Output, directory: str, before: str | None = None) -> str | None:
    """The readable ``*.metadata.json`` of ``directory`` with the highest version (below ``before``'s)."""
    fs = output.fs
    limit = _version(before) if before else None
    candidates = []
    for path in fs.glob(f"{directory}/*.metadata.json"):
        version = _version(path)
        if version is None or (limit is not None and version >= limit):
            continue
        try:
            with fs.open(path, "rb") as f:
                meta = json.load(f)
            stamp = int(meta.get("last-updated-ms", 0))
        except (OSError, ValueError):
            continue
        candidates.append((version, stamp, path))
    return output.url_of(max(candidates)[2]) if candidates else None


def _version(path: str) -> int | None:
    m = _VERSION.match(path.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def _embedded_db(output: Output) -> str | None:
    return None if output.catalog_props else f"{output.root}/{CATALOG_DIR}/catalog.db"


def catalog_problems(output: Output) -> list[str]:
    """Why a run must not create or use this output's catalog (a lost catalog; a copied output)."""
    dirs = metadata_dirs(output)
    db = _embedded_db(output)
    hint = RECOVER_HINT.format(url=output.url)
    if db is not None and not os.path.exists(db):
        if dirs:
            return [f"the catalog {db} is missing, but table metadata exists under {output.root}/{NAMESPACE}/ "
                    f"({', '.join(dirs)}): a new catalog would hide every earlier night; run `{hint}` "
                    "to register the tables again"]
        return []
    try:
        catalog = output.catalog()
        known = set(table_names(catalog))
        locations = {name: catalog.load_table(f"{NAMESPACE}.{name}").metadata_location for name in known}
    except NothingCommitted:  # a reachable catalog without our namespace yet: a first run
        known, locations = set(), {}
    except Exception as err:  # noqa: BLE001 - any failure: the catalog is not usable as it is
        return [f"the catalog of {output.url} cannot be read ({type(err).__name__}: {_short(err)}); "
                f"run `{hint}`"]
    problems = []
    lost = sorted(set(dirs) - known)
    if lost:
        problems.append(f"the catalog of {output.url} lacks table(s) {', '.join(lost)} whose metadata exists "
                        f"under {output.root}/{NAMESPACE}/ (a lost or replaced catalog); run `{hint}`")
    elsewhere = {n: loc for n, loc in locations.items() if not _inside(output, loc)}
    if db is not None and elsewhere:  # an embedded catalog copied along with the output
        name, loc = sorted(elsewhere.items())[0]
        problems.append(f"the catalog of {output.url} points at tables outside it ({name}: {loc}): a copied or "
                        "moved output (Iceberg records absolute paths), a run would write into the original; "
                        "run into a new output instead, or move the output back")
    return problems


def _inside(output: Output, location: str) -> bool:
    """True when ``location`` (a metadata file's URL) lies under the output (local paths resolved)."""
    if location.startswith("file://") or "://" not in location:
        path = os.path.realpath(location.removeprefix("file://"))
        return path.startswith(os.path.realpath(output.root).rstrip("/") + "/")
    return location.startswith(output.url_of(output.root).rstrip("/") + "/")


def check_catalog_home(output: Output) -> None:
    """Raise ``CatalogError`` when ``catalog_problems`` finds any (called before a run opens its catalog)."""
    problems = catalog_problems(output)
    if problems:
        raise CatalogError("; ".join(problems))


def verify(output: Output) -> tuple[list[Problem], int]:
    """Problems of the output's committed state, and how many data files were opened."""
    hint = RECOVER_HINT.format(url=output.url)
    try:
        catalog = output.catalog()
    except Exception as err:  # noqa: BLE001
        return [Problem("catalog", _embedded_db(output) or output.url, f"cannot be opened ({_short(err)}); "
                        f"run `{hint}`")], 0
    problems: list[Problem] = []
    for name in table_names(catalog):
        try:
            catalog.load_table(f"{NAMESPACE}.{name}")
        except Exception as err:  # noqa: BLE001
            path = getattr(err, "filename", None) or str(err)
            problems.append(Problem(name, path, f"metadata cannot be read ({type(err).__name__}); run `{hint}`"))
    if problems:
        return problems, 0
    try:
        views = committed_views(catalog)
    except Exception as err:  # noqa: BLE001 - e.g. a snapshot a committed night recorded is gone
        return [Problem("runs", output.url, f"committed snapshots cannot be planned: {_short(err)}")], 0
    opened = 0
    for name, view in views.items():
        for date, files in view.files_by_date.items():
            for url in files:
                opened += 1
                problem = _open_problem(output, url)
                if problem:
                    problems.append(Problem(name, url, f"data file of {date} {problem} (rerun that night)"))
    return problems, opened


def _open_problem(output: Output, url: str) -> str | None:
    fs = output.fs
    path = url.removeprefix("file://")
    try:
        with fs.open(path, "rb") as f:
            pq.ParquetFile(f).metadata  # noqa: B018 - reading the footer is the check
    except FileNotFoundError:
        return "is missing"
    except Exception as err:  # noqa: BLE001
        return f"does not open ({type(err).__name__}: {_short(err)})"
    return None


def recover(output: Output) -> list[str]:
    """Point every broken or missing table back at its newest readable metadata; what was done."""
    done = []
    db = _embedded_db(output)
    if db is not None and os.path.exists(db):
        try:
            table_names(output.catalog())
            output.catalog().list_namespaces()
        except Exception as err:  # noqa: BLE001 - unreadable database: keep it aside, start a new one
            aside = f"{db}.broken-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(db, aside)
            done.append(f"catalog {db} could not be read ({type(err).__name__}); moved to {aside}")
    catalog = output.catalog(create=True)
    known = set(table_names(catalog))
    for name, directory in metadata_dirs(output).items():
        ident = f"{NAMESPACE}.{name}"
        current = None
        if name in known:
            try:
                catalog.load_table(ident)
                continue
            except Exception:  # noqa: BLE001 - its metadata file is missing or broken: roll back
                current = _location(catalog, name)
        found = newest_readable(output, directory, current)
        if found is None:
            done.append(f"{name}: no readable metadata file under {directory}; rerun its nights")
            continue
        if name in known:
            catalog.drop_table(ident)  # the catalog entry only; no file is removed
        catalog.register_table(ident, found)
        done.append(f"{name}: {'rolled back' if current else 'registered'} to {found}")
    return done


def _location(catalog, name: str) -> str | None:  # noqa: ANN001 - a pyiceberg SqlCatalog
    """The metadata location the SQL catalog records for ``name`` (without reading that file)."""
    from sqlalchemy import text

    engine = getattr(catalog, "engine", None)
    if engine is None:
        return None
    with engine.connect() as con:
        row = con.execute(text("SELECT metadata_location FROM iceberg_tables WHERE table_namespace = :ns "
                               "AND table_name = :t"), {"ns": NAMESPACE, "t": name}).fetchone()
    return row[0] if row else None


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
