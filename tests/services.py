"""Real services for the many-machines tests: an S3 HTTP endpoint (moto) and a Postgres server.

Both listen on 127.0.0.1 only, on free ports, and are started and stopped by the tests themselves
(the Postgres server by its pid). ``cluster_output`` is a pipeline ``output`` section that puts the
tables on that S3 and the catalog in that Postgres, as a cluster would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-west-2"


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server: its endpoint URL and the bucket made for the test session."""

    endpoint: str
    bucket: str

    def storage(self) -> dict[str, str]:
        """The pipeline's ``output.storage`` for this server."""
        return {"endpoint": self.endpoint, "key": S3_KEY, "secret": S3_SECRET, "region": S3_REGION}

    def filesystem(self):  # noqa: ANN201 - s3fs.S3FileSystem
        import s3fs

        return s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": S3_REGION}, skip_instance_cache=True,
                                 use_listings_cache=False)


@dataclass(frozen=True)
class PostgresServer:
    """A Postgres server in a temporary data directory: its SQLAlchemy URL and pid."""

    url: str
    pid: int
    data_dir: Path

    def new_database(self) -> str:
        """Create an empty database; its SQLAlchemy URL."""
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:12]}"
        con = psycopg2.connect(self.url.replace("postgresql+psycopg2", "postgresql"))
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        con.close()
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres_user() -> list[str]:
    """Postgres refuses to run as root: run its programs as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb + pg_ctl start on a free loopback port, in a private temp dir (the ``postgres`` user
    must reach it when we are root); stopped by its pid and removed on exit."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("Postgres is not installed (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="curate-pg-"))
    data = base / "pgdata"
    data.mkdir(parents=True)
    sock = base / "pgsock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
        base.chmod(0o755)
    run = _as_postgres_user()
    _run([*run, str(bindir / "initdb"), "-D", str(data), "-U", "curate", "--auth=trust", "-E", "UTF8"])
    port = free_port()
    log = base / "pg.log"
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres")
    _run([*run, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
          "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
          "start"])
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        yield PostgresServer(f"postgresql+psycopg2://curate@127.0.0.1:{port}/postgres", pid, data)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # fast shutdown
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on a free loopback port, with one empty bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://127.0.0.1:{port}", "curate-test")
        s3.filesystem().mkdir(s3.bucket)
        yield s3
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def cluster_output(s3: S3Server, postgres: PostgresServer) -> dict:
    """An ``output`` section: tables on the S3 server (a fresh prefix), catalog in a fresh database."""
    prefix = f"s3://{s3.bucket}/out-{uuid.uuid4().hex[:8]}"
    return {"url": prefix, "storage": s3.storage(),
            "catalog": {"type": "sql", "uri": postgres.new_database()}}
