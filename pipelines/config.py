"""Typed, validated pipeline definitions.

A pipeline is a YAML file: input, output, Ray settings and a list of stages. It is validated before
Ray starts, field by field and then as a whole plan (``pipelines.plan``: every column a stage reads
is made by an earlier stage); an error names the field path and the bad value, and unknown keys
are errors.
``${VAR}`` and ``${VAR:-default}`` in string values are expanded from the environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from operators.base import StrictModel
from operators.registry import STAGE_CONFIGS
from pipelines.cache import CacheConfig, cached_stage_names
from pipelines.plan import plan_errors
from pipelines.pools import share_problems
from pipelines.storage import StorageConfig

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DEFAULTS = {"CURATE_CACHE": str(Path.home() / ".cache" / "curate")}


#: The run's default error budget: stops a night where most rows fail, lets a few bad rows through.
DEFAULT_MAX_QUARANTINE_SHARE = 0.5
#: A rerun may drop at most this share of a committed night's documents (``pipelines.guards``).
DEFAULT_MAX_SHRINK_SHARE = 0.5


class ConfigError(ValueError):
    """A pipeline definition that cannot run; the message names the field path."""


class InputConfig(StrictModel):
    """Parquet shards under an fsspec URL (local path, file://, s3://, gs://, memory://)."""

    url: str = Field(description="Directory or glob of Parquet shards.")
    text_column: str = "text"
    id_column: str = "id"
    max_text_bytes: int = Field(10_000_000, gt=0, description="Longer documents are quarantined.")
    read_batch_rows: int = Field(1024, gt=0, description="Rows per block when reading a shard.")
    read_tasks: int | None = Field(
        None, gt=0, description="Shards read at once (one Ray task each); default: one per 4 CPUs of the "
        "cluster when the run starts, at least 1. Every read task at once needs a worker process, and on a "
        "small machine the ones started too late for a shard wait idle through the run.")
    control_chars: Literal["keep", "strip", "quarantine"] = Field(
        "keep", description="Control characters (U+0000-U+001F but tab/newline/CR, U+007F) in valid "
        "text: keep them (real data), strip them, or quarantine the row; counted in n_control_chars.")
    columns: list[str] = Field(default_factory=list, description="Stage-made columns the shards already "
                               "carry (e.g. an earlier run's lm columns): the plan check counts them as made.")


class OutputConfig(StrictModel):
    """Where tables are committed: Iceberg tables partitioned by ``run_date`` (``pipelines.tables``)."""

    url: str = "./output"
    catalog: dict[str, str | int | bool] = Field(
        default_factory=dict, description="pyiceberg catalog properties (type, uri, warehouse, ...); "
        "empty: a SQLite catalog inside the output (local outputs only).")
    storage: StorageConfig | None = Field(
        None, description="Object store endpoint, region and credentials, for fsspec and the catalog's "
        "FileIO alike (each field defaults to its AWS_* environment variable).")
    write_batch_rows: int = Field(4096, gt=0, description="Rows per staged Parquet file (at most).")
    shared_mount: bool = Field(
        False, description="A local output path that every node of the cluster mounts (NFS, a shared "
        "volume); without it a local output on a multi-node cluster is refused.")
    max_shrink_share: float = Field(
        DEFAULT_MAX_SHRINK_SHARE, ge=0, le=1,
        description="A rerun of a committed date is refused before its commit when it would leave 0 "
        "documents or this share fewer (pipelines.guards); --allow-shrink lets it through.")


class RayConfig(StrictModel):
    """Ray connection. No address: connect to RAY_ADDRESS, else start an embedded local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0, description="Embedded Ray only; default: all cores.")
    object_store_memory: int | None = Field(None, gt=0)
    resource_wait_s: float = Field(
        600, ge=0, description="On a cluster you address: how long to wait for it to scale up to what the "
        "stages reserve (CPUs, GPUs, memory) before the run fails.")


def _stage_union() -> Any:
    union = STAGE_CONFIGS[0]
    for cls in STAGE_CONFIGS[1:]:
        union = union | cls
    return Annotated[union, Field(discriminator="op")]


class PipelineConfig(StrictModel):
    """A whole pipeline definition."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputConfig
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()
    stages: list[_stage_union()] = Field(default_factory=list)  # type: ignore[valid-type]
    max_quarantine_share: float = Field(
        DEFAULT_MAX_QUARANTINE_SHARE, ge=0, le=1,
        description="Error budget: the run fails, committing nothing, when more than this share of its "
        "rows is quarantined.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Reuse stages' results for texts "
                               "seen before (pipelines.cache); default: the lm stages.")
    max_unreadable_files: int = Field(
        0, ge=0, description="Error budget of input files that cannot be read at all (no footer: their "
        "rows cannot be counted); the run fails, committing nothing, above it.")

    @model_validator(mode="after")
    def _output_outside_input(self) -> PipelineConfig:
        problem = output_inside_input(self.input.url, self.output.url)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list) -> list:
        names = [s.stage_name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes} (set 'name')")
        return stages

    @model_validator(mode="after")
    def _cached_stages_exist(self) -> PipelineConfig:
        names = [s.stage_name for s in self.stages]
        unknown = [n for n in self.cache.stages or [] if n not in names]
        if unknown:
            raise ValueError(f"cache.stages: {unknown} are not stage names of this pipeline; stages: {names}")
        return self

    def config_hash(self) -> str:
        """Stable hash of the validated config (what the manifest and runs table record)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_inside_input(input_url: str, output_url: str) -> str | None:
    """Why ``output_url`` may not be used with ``input_url``: equal to, or inside, the input's directory
    (or its glob's fixed root), where the next night would read the output's own files as input."""
    from pipelines.io import _glob_root, url_to_fs

    try:
        (in_fs, in_path), (out_fs, out_path) = url_to_fs(input_url), url_to_fs(output_url)
    except (ValueError, ImportError):
        return None  # the reader reports a bad URL
    if in_fs.protocol != out_fs.protocol or "{date" in input_url:
        return None
    local = "file" in (in_fs.protocol if isinstance(in_fs.protocol, tuple) else (in_fs.protocol,))
    norm = (lambda p: os.path.realpath(p)) if local else (lambda p: p.rstrip("/"))
    root = _glob_root(in_path) if any(ch in in_path for ch in "*?[") else in_path
    if local and os.path.isfile(root):
        return None  # a single file: nothing below it is read
    root, out = norm(root), norm(out_path)
    if out == root or out.startswith(root.rstrip("/") + "/"):
        return (f"output.url {output_url!r} is {'the input directory' if out == root else 'inside input.url'} "
                f"{input_url!r}: the next night would read the output's own files as input; "
                "choose an output outside the input")
    return None


def expand_env(value: Any) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` recursively in strings of a loaded YAML tree."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            found = os.environ.get(name, _DEFAULTS.get(name))
            if found is None and default is None:
                raise ConfigError(f"environment variable ${{{name}}} is not set (used in {value!r})")
            return found if found is not None else default
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field.path>: <message> (got <value>)``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"{source}: {path}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_config(raw: dict, source: str = "<config>") -> PipelineConfig:
    """Validate a loaded YAML mapping, raising ``ConfigError`` with field paths."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate(expand_env(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    return check_plan(cfg, source)


def check_plan(cfg: PipelineConfig, source: str = "<config>") -> PipelineConfig:
    """Raise ``ConfigError`` listing every broken cross-stage reference or actor-pool share
    (``pipelines.pools``); else the bound config."""
    bound, errors = plan_errors(cfg.stages, cfg.input.columns)
    errors += share_problems(cfg.stages, set(cached_stage_names(cfg)))
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" for e in errors))
    return cfg.model_copy(update={"stages": bound})


def read_yaml(path: str | Path) -> Any:
    """A pipeline YAML as loaded (not expanded, not validated); ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_output_config(path: str | Path) -> OutputConfig:
    """Only the validated ``output`` section of a pipeline YAML (a reader needs none of its stages)."""
    raw = read_yaml(path)
    section = raw.get("output", {}) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: output: must be a mapping")
    try:
        return OutputConfig.model_validate(expand_env(section))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{path}: output")) from None


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read, expand and validate a pipeline YAML. ``overrides`` replace top-level sections' keys."""
    raw = read_yaml(path)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {})
        raw[section].update({k: v for k, v in values.items() if v is not None})
    return parse_config(raw, str(path))
