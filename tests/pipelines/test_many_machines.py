"""Many machines: tables on an S3 server (moto, over HTTP), the catalog in a real Postgres.

Every verb reads and writes through the pipeline's catalog and storage settings: run, a rerun,
two nights in one process (``nightly --since``: the night once committed empty), tables, query,
query --as-of, report, report --trend, maintain and quarantine replay.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_pipeline

from jobs.cli.main import main
from jobs.ops.query import query
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
from pipelines.tables import output_of_config

D1, D2 = "2026-03-01", "2026-03-02"


def _put_shard(fs, url: str, **columns: list) -> None:  # noqa: ANN001 - s3fs
    with fs.open(url, "wb") as f:
        pq.write_table(pa.table(columns), f)


@pytest.fixture
def s3_corpus(s3, cluster_output) -> str:
    """Input shards on the same S3 server: two languages, one empty text (quarantined)."""
    fs = s3.filesystem()
    root = f"{cluster_output['url']}-input"
    _put_shard(fs, f"{root}/a.parquet", id=["p1", "p2", "x1"],
               text=["Hello world", "The cat sat on the mat.", "   "], lang=["eng_Latn"] * 3)
    _put_shard(fs, f"{root}/b.parquet", id=["p1", "p2"],
               text=["Bonjour le monde", "Le chat était assis sur le tapis."], lang=["fra_Latn"] * 2)
    return root


def _pipeline(tmp_path: Path, input_url: str, output: dict) -> Path:
    raw = tiny_pipeline(input_url, output["url"])
    raw["output"] = output
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_every_verb_on_s3_and_postgres(tmp_path, local_ray, s3, s3_corpus, cluster_output, capsys, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)  # only output.storage names the server
    pipeline = _pipeline(tmp_path, s3_corpus, cluster_output)
    cfg = parse_config(yaml.safe_load(pipeline.read_text()))
    reader = ("--pipeline", str(pipeline))

    # run (the report step reads the shared catalog too) and a rerun of the same date
    rc, out, err = _cli(capsys, "run", str(pipeline), "--date", D1)
    assert rc == 0, err
    assert "report: " in out
    first = run_pipeline(cfg, D1)
    assert first.tables["documents"] == 4 and first.tables["quarantine"] == 1

    # two nights in one process: the second must commit its rows, not an empty night
    rc, out, err = _cli(capsys, "nightly", str(pipeline), "--since", D1, "--date", D2)
    assert rc == 0, err
    for date in (D1, D2):
        n = query(output_of_config(cfg), "SELECT count(*) AS n FROM documents", date=date)
        assert n.column("n")[0].as_py() == 4, date

    # tables, query, query --as-of
    rc, out, err = _cli(capsys, "tables", *reader)
    assert rc == 0, err
    assert "documents" in out and D1 in out and D2 in out
    rc, out, err = _cli(capsys, "query", "SELECT count(*) AS n FROM documents", *reader, "--format", "json")
    assert rc == 0 and json.loads(out)["n"] == 8, err
    rc, out, err = _cli(capsys, "query", "SELECT count(*) AS n FROM documents", *reader,
                        "--format", "json", "--as-of", first.run_id)
    assert rc == 0 and json.loads(out)["n"] == 4, err  # D2 was not committed yet

    # the same with --catalog/--storage properties instead of the pipeline
    props = [a for k, v in cluster_output["catalog"].items() for a in ("--catalog", f"{k}={v}")]
    props += [a for k, v in cluster_output["storage"].items() for a in ("--storage", f"{k}={v}")]
    rc, out, err = _cli(capsys, "query", "SELECT count(*) AS n FROM token_premium", "--output",
                        cluster_output["url"], *props, "--format", "json")
    assert rc == 0 and json.loads(out)["n"] > 0, err

    # report, report --trend (written back to the bucket, a local copy printed)
    rc, out, err = _cli(capsys, "report", *reader, "--date", D2)
    assert rc == 0, err
    assert D2 in Path(out.strip()).read_text(encoding="utf-8")
    assert s3.filesystem().exists(f"{cluster_output['url']}/reports/run_date={D2}/report.html")
    rc, out, err = _cli(capsys, "report", "--trend", *reader)
    assert rc == 0 and Path(out.strip()).exists(), err

    # maintain on the object store (nothing is old enough to go)
    rc, out, err = _cli(capsys, "maintain", *reader, "--dry-run")
    assert rc == 0, err
    assert "orphan" in out

    # quarantine replay into an output of its own (another bucket prefix, a catalog of its own)
    into = f"{cluster_output['url']}-replay"
    into_db = cluster_output["catalog"]["uri"].rsplit("/", 1)[0] + "/postgres"
    rc, out, err = _cli(capsys, "quarantine", "replay", str(pipeline), "--date", D1, "--into", into,
                        "--into-catalog", "type=sql", "--into-catalog", f"uri={into_db}")
    assert rc == 0, err
    assert "1 quarantined row(s) in" in out

    # a committed table as an input (eval --input, pawn train --features) through the shared catalog
    from pipelines.tables import read_table

    rows = read_table(f"{cluster_output['url']}/documents/run_date={D2}", ["id"],
                      catalog=cluster_output["catalog"], storage=cluster_output["storage"])
    assert rows.num_rows == 4


def test_unreadable_catalog_is_an_error_not_an_empty_answer(tmp_path, s3, cluster_output, capsys):
    bad = cluster_output["catalog"]["uri"].rsplit("/", 1)[0] + "/no_such_database"
    rc, out, err = _cli(capsys, "tables", "--output", cluster_output["url"], "--catalog", "type=sql",
                        "--catalog", f"uri={bad}")
    assert rc == 2
    assert "cannot be opened" in err and "no_such_database" in err
    rc, out, err = _cli(capsys, "tables", "--output", cluster_output["url"])
    assert rc == 2 and "not local" in err  # an object store output without its catalog


def test_unreachable_endpoint_is_one_line_naming_it(tmp_path, small_corpus, postgres, capsys):
    from tests.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    output = {"url": "s3://nowhere/out", "storage": {"endpoint": endpoint, "key": "k", "secret": "s"},
              "catalog": {"type": "sql", "uri": postgres.new_database()}}
    pipeline = _pipeline(tmp_path, str(small_corpus), output)
    rc, out, err = _cli(capsys, "run", str(pipeline), "--date", D1)
    assert rc == 2
    assert err.count("\n") == 1 and endpoint in err and "cannot be reached" in err


# ------------------------------------------------------------------------------ no shared disk


DRIVER = """
import json, sys
from pipelines.config import parse_config
from pipelines.runner import run_pipeline
result = run_pipeline(parse_config(json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps({"status": result.status, "tables": result.tables}), flush=True)
"""


class PrivateDiskCluster:
    """A head node with no CPUs (only the driver's bookkeeping runs there) and one worker node in its
    own mount namespace: private tmpfs mounts over its own temp dir, over the driver's test files
    (``hidden``: pytest's base temp dir) and over Ray's default session dir. It shares none of those
    with the driver; the project and its venv stay visible (they could be anywhere, /tmp included)."""

    def __init__(self, hidden: Path) -> None:
        from test_node_loss import Cluster

        self.nodes = Cluster()
        self.hidden = hidden

    def start(self) -> None:
        import shlex
        import subprocess
        import tempfile

        from test_node_loss import RAY, MiB, _env

        self.nodes.start_node(head=True, num_cpus=0, memory=200 * MiB)
        temp = tempfile.mkdtemp(prefix="rnw", dir="/tmp")  # empty here; the worker's own tmpfs there
        self.nodes.temp_dirs.append(temp)
        mounts = [temp, str(self.hidden)] + (["/tmp/ray"] if Path("/tmp/ray").is_dir() else [])
        script = " && ".join([*(f"mount -t tmpfs -o size=2g tmpfs {shlex.quote(m)}" for m in mounts),
                              f"exec {RAY} start --address={self.nodes.address} --num-cpus=2 "
                              f"--memory={3072 * MiB} --object-store-memory={200 * MiB} "
                              f"--temp-dir={temp} --disable-usage-stats"])
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=120, env=_env())
        assert done.returncode == 0, done.stderr[-2000:]

    def stop(self) -> None:
        self.nodes.stop()


def _can_unshare() -> bool:
    import subprocess

    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="unshare --mount is not allowed here")
def test_no_shared_disk_two_nodes_commit_what_one_node_commits(tmp_path, tmp_path_factory, local_ray, s3,
                                                               s3_corpus, cluster_output, postgres):
    """The two-node run finalizes on the cluster (Ray aggregations), the one-node run on the driver
    (a small run): their tables are equal too."""
    import subprocess
    import sys

    from test_node_loss import ROOT, _env

    cluster = PrivateDiskCluster(tmp_path_factory.getbasetemp())
    try:
        cluster.start()
        raw = tiny_pipeline(s3_corpus, cluster_output["url"])
        raw["output"] = cluster_output
        raw["ray"] = {"address": cluster.nodes.address, "resource_wait_s": 60}
        raw["stages"][0]["resources"] = {"num_cpus": 1, "batch_size": 2}
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(raw), D1], cwd=ROOT,
                              env={**_env(), "PYTHONPATH": str(ROOT), "CURATE_FINALIZE_LOCAL_ROWS": "0"},
                              capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["tables"]["documents"] == 4
    finally:
        cluster.stop()

    single = dict(cluster_output, url=f"{cluster_output['url']}-single",
                  catalog={"type": "sql", "uri": postgres.new_database()})
    raw = tiny_pipeline(s3_corpus, single["url"])
    raw["output"] = single
    run_pipeline(parse_config(raw), D1)
    sql = "SELECT * FROM {t} ORDER BY ALL"
    for table in ("documents", "quarantine", "token_premium"):
        two = query(output_of_config(parse_config({**raw, "output": cluster_output})), sql.format(t=table))
        one = query(output_of_config(parse_config(raw)), sql.format(t=table))
        assert two.num_rows > 0 and two.equals(one), table


# ----------------------------------------------------------------------------- two hosts, one date


def _host(tmp_path: Path, name: str, argv: list[str], **env: str):  # noqa: ANN202 - Popen
    """``curate`` in a process of its own, as on another host: its own HOME, no shared local state."""
    import os
    import subprocess
    import sys

    from test_node_loss import ROOT

    home = tmp_path / f"home-{name}"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, text=True,
                            env={**clean, "HOME": str(home), "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_hosts_one_date_second_refused_and_maintain_keeps_the_running_night(
        tmp_path, s3, s3_corpus, cluster_output):
    import time

    pipeline = _pipeline(tmp_path, s3_corpus, cluster_output)
    fs = s3.filesystem()
    first = _host(tmp_path, "a", ["run", str(pipeline), "--date", D1],
                  CURATE_COMMIT_HOOK="before:documents:sleep=25")  # holds the date mid-commit
    staged = f"{cluster_output['url']}/_data/documents/run_date={D1}"
    deadline = time.time() + 240
    while not fs.exists(staged) and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[1][-3000:]

    second = _host(tmp_path, "b", ["run", str(pipeline), "--date", D1])
    out, err = second.communicate(timeout=240)
    assert second.returncode == 2, out + err
    assert "is already going: the lock is held by run " in err, err
    assert f"(pid {first.pid} on " in err  # names the holder

    maint = _host(tmp_path, "c", ["maintain", "--pipeline", str(pipeline), "--retain-days", "0",
                                  "--grace-hours", "0"])
    out, err = maint.communicate(timeout=240)
    assert maint.returncode == 0, out + err

    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err[-3000:]
    cfg = parse_config(yaml.safe_load(pipeline.read_text()))
    docs = query(output_of_config(cfg), "SELECT count(*) AS n FROM documents", date=D1)
    assert docs.column("n")[0].as_py() == 4
