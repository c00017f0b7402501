"""One storage setting for fsspec and pyiceberg; a local output refused on a multi-node cluster."""

from __future__ import annotations

import fsspec
import pytest
from conftest import tiny_pipeline

from pipelines.config import ConfigError, parse_config
from pipelines.runner import check_output_reachable
from pipelines.storage import StorageConfig, apply_storage
from pipelines.tables import open_output, output_of_config


def test_storage_fields_reach_fsspec_and_pyiceberg_alike(monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {})  # this process's fsspec settings, restored after
    monkeypatch.setenv("AWS_REGION", "eu-north-1")  # a field left out comes from its variable
    storage = StorageConfig(endpoint="http://127.0.0.1:9000", key="k", secret="s")
    assert storage.fsspec_options() == {"use_listings_cache": False, "key": "k", "secret": "s",
                                        "endpoint_url": "http://127.0.0.1:9000",
                                        "client_kwargs": {"region_name": "eu-north-1"}}
    assert storage.iceberg_properties() == {"s3.endpoint": "http://127.0.0.1:9000", "s3.region": "eu-north-1",
                                            "s3.access-key-id": "k", "s3.secret-access-key": "s"}
    env = apply_storage(storage)
    assert fsspec.config.conf["s3"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert '"endpoint_url": "http://127.0.0.1:9000"' in env["FSSPEC_S3"]  # what a Ray worker reads


def test_the_catalog_gets_the_storage_properties(tmp_path):
    output = open_output(str(tmp_path / "out"), {"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db"},
                         {"endpoint": "http://127.0.0.1:9000", "key": "k", "secret": "s"})
    catalog = output.catalog(create=True)
    assert catalog.properties["s3.endpoint"] == "http://127.0.0.1:9000"
    assert catalog.properties["s3.access-key-id"] == "k"


def test_a_local_output_on_a_multi_node_cluster_is_refused_unless_every_node_mounts_it(tmp_path):
    raw = tiny_pipeline(str(tmp_path / "in"), str(tmp_path / "out"))
    cfg = parse_config(raw)
    check_output_reachable(cfg, output_of_config(cfg), nodes=1)  # one node: its own disk is fine
    with pytest.raises(ConfigError, match="the Ray cluster has 3 nodes.*output.shared_mount: true"):
        check_output_reachable(cfg, output_of_config(cfg), nodes=3)
    raw["output"]["shared_mount"] = True
    shared = parse_config(raw)
    check_output_reachable(shared, output_of_config(shared), nodes=3)
    s3 = parse_config({**raw, "output": {"url": "s3://bucket/out"}})
    check_output_reachable(s3, output_of_config(s3), nodes=3)
