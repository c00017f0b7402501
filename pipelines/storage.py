"""One storage setting for an object store, used by fsspec and by pyiceberg alike.

``output.storage`` (endpoint, region, credentials) is the only place a pipeline names them; each
field left out falls back to the usual environment variable (``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``).

* curate's own I/O (preflight, staging, finalizers, reports, queries, input shards on the same store)
  goes through fsspec, configured with fsspec's own mechanism: ``fsspec.config.conf[protocol]`` in
  this process, and the ``FSSPEC_<PROTOCOL>`` environment variable that fsspec reads at import in
  every Ray worker (``worker_env``).
* pyiceberg's FileIO gets the same values as catalog properties (``s3.endpoint`` ...).
"""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlparse

import fsspec
from pydantic import Field

from operators.base import StrictModel

#: fsspec protocols this setting applies to (s3fs registers all three).
S3_PROTOCOLS = ("s3", "s3a")


class StorageError(RuntimeError):
    """The object store cannot be reached or used."""


class StorageConfig(StrictModel):
    """Endpoint, region and credentials of the object store holding the output (and input)."""

    endpoint: str | None = Field(None, description="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS).")
    region: str | None = Field(None, description="Region (default: $AWS_REGION / $AWS_DEFAULT_REGION).")
    key: str | None = Field(None, description="Access key id (default: $AWS_ACCESS_KEY_ID).")
    secret: str | None = Field(None, description="Secret access key (default: $AWS_SECRET_ACCESS_KEY).")
    token: str | None = Field(None, description="Session token (default: $AWS_SESSION_TOKEN).")
    anon: bool = Field(False, description="Anonymous access (public buckets).")

    def resolved(self) -> StorageConfig:
        """Every field left out taken from its environment variable."""
        env = os.environ.get
        return self.model_copy(update={
            "endpoint": self.endpoint or env("AWS_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3"),
            "region": self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
            "key": self.key or env("AWS_ACCESS_KEY_ID"),
            "secret": self.secret or env("AWS_SECRET_ACCESS_KEY"),
            "token": self.token or env("AWS_SESSION_TOKEN"),
        })

    def fsspec_options(self) -> dict:
        """s3fs keyword arguments. Listings are never cached: a long-lived process (``nightly
        --since``) must see what other processes wrote since."""
        s = self.resolved()
        options: dict = {"use_listings_cache": False}
        if s.anon:
            options["anon"] = True
        for name, value in (("key", s.key), ("secret", s.secret), ("token", s.token),
                            ("endpoint_url", s.endpoint)):
            if value:
                options[name] = value
        if s.region:
            options["client_kwargs"] = {"region_name": s.region}
        return options

    def iceberg_properties(self) -> dict[str, str]:
        """The same settings as pyiceberg FileIO properties."""
        s = self.resolved()
        props = {"s3.endpoint": s.endpoint, "s3.region": s.region, "s3.access-key-id": s.key,
                 "s3.secret-access-key": s.secret, "s3.session-token": s.token}
        props = {k: v for k, v in props.items() if v}
        if s.anon:
            props["s3.anonymous"] = "true"
        return props


def apply_storage(storage: StorageConfig | None) -> dict[str, str]:
    """Configure fsspec in this process for ``storage``; the environment that does the same in a
    Ray worker (``{"FSSPEC_S3": json}``; empty for no storage setting)."""
    if storage is None:
        return {}
    options = storage.fsspec_options()
    env = {}
    for protocol in S3_PROTOCOLS:
        fsspec.config.conf.setdefault(protocol, {}).update(options)
        env[f"FSSPEC_{protocol.upper()}"] = json.dumps(options)
    return env


def check_endpoint(storage: StorageConfig | None, url: str) -> None:
    """Raise ``StorageError`` naming the endpoint when an S3 output's endpoint does not answer."""
    if storage is None or urlparse(url).scheme not in S3_PROTOCOLS:
        return
    endpoint = storage.resolved().endpoint
    if not endpoint:
        return
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as err:
        raise StorageError(f"storage endpoint {endpoint} (for {url}) cannot be reached: {err}") from None
