"""Will every stage's actors fit the Ray cluster at once? Checked before the plan runs.

Ray Data keeps every actor pool alive for the whole run, so the cluster must hold, at once,

    CPU     read + writer + Σ_pools num_cpus × min pool size
    GPU     Σ_pools num_gpus × min pool size
    memory  Σ_pools memory × min pool size      (``resources.memory`` or the stage's measured need)

A pool is one stage, or consecutive stages sharing one (``resources.share``; its actors reserve the
largest num_cpus and num_gpus of its stages and the sum of their memory: ``pipelines.pools``).

A pool that does not fit waits forever ("pending: 1 GPU") while the nightly lock is held. On an
embedded Ray nothing will add resources, so a shortfall is a ``ConfigError`` before anything runs;
on a cluster you address it may scale up: warn, wait up to ``ray.resource_wait_s``, then fail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pipelines.config import ConfigError, PipelineConfig
from pipelines.pools import pool_name, pool_resources, pools

log = logging.getLogger("curate.run")

#: CPUs reserved by the read tasks and by the writer actor; stages get the rest of the cluster.
READ_CPUS = 0.25
WRITER_CPUS = 0.25
GiB = float(1 << 30)


class ResourceError(ConfigError):
    """The stages reserve more than the cluster has (and it did not grow in time)."""


def reserved(cfg: PipelineConfig) -> dict[str, tuple[float, list[str]]]:
    """Resource -> (amount the plan reserves at once, one ``stages[i] name: a × n`` part per pool)."""
    out: dict[str, tuple[float, list[str]]] = {}
    for key in ("CPU", "GPU", "memory"):
        total = READ_CPUS + WRITER_CPUS if key == "CPU" else 0.0
        parts, i = [], 0
        for group in pools(cfg.stages):
            r = pool_resources(group)
            each, size = float(r[{"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}[key]]), r["min_actors"]
            if each:
                total += each * size
                shown = f"{each / GiB:.2g} GiB" if key == "memory" else f"{each:g}"
                where = f"stages[{i}]" if len(group) == 1 else f"stages[{i}..{i + len(group) - 1}]"
                parts.append(f"{where} {pool_name(group)}: {shown} × {size}")
            i += len(group)
        out[key] = (total, parts)
    return out


def shortfalls(
    cfg: PipelineConfig, cluster: dict[str, float], keys: tuple[str, ...] = ("CPU", "GPU", "memory")
) -> list[str]:
    """One message per resource in ``keys`` the plan reserves beyond ``cluster`` (``ray.cluster_resources()``)."""
    messages = []
    for key, (needed, parts) in reserved(cfg).items():
        if key not in keys:
            continue
        have = cluster.get(key, 0.0)
        if needed <= have + 1e-9:
            continue
        if key == "CPU":
            messages.append(
                f"the stages reserve {needed:g} CPUs (read + writer {READ_CPUS + WRITER_CPUS:g}; "
                f"{'; '.join(parts)}) but the Ray cluster has {have:g}: every stage's actors run at "
                f"once, so lower stages[*].resources.num_cpus or concurrency, or raise ray.num_cpus"
            )
        elif key == "GPU":
            messages.append(
                f"the stages reserve {needed:g} GPUs ({'; '.join(parts)}) but the Ray cluster has "
                f"{have:g}: set stages[*].resources.num_gpus to 0 to run on CPU, or use a GPU node"
            )
        else:
            messages.append(
                f"the stages reserve {needed / GiB:.2f} GiB of memory ({'; '.join(parts)}) but the Ray "
                f"cluster has {have / GiB:.2f} GiB: lower stages[*].resources.memory or concurrency"
            )
    return messages


def check_resources(
    cfg: PipelineConfig, cluster: Callable[[], dict[str, float]], addressed: bool, poll_s: float = 5.0
) -> None:
    """Embedded Ray: raise ``ResourceError`` on any shortfall. Addressed cluster: warn with the
    deadline, poll ``cluster()`` until it fits, and raise once ``ray.resource_wait_s`` has passed."""
    missing = shortfalls(cfg, cluster())
    if not missing:
        return
    if not addressed:
        raise ResourceError("\n".join(missing))
    wait = cfg.ray.resource_wait_s
    deadline = time.monotonic() + wait
    log.warning(
        "%s\nwaiting up to %gs (ray.resource_wait_s) for the cluster to scale up; then the run fails",
        "\n".join(missing),
        wait,
    )
    while time.monotonic() < deadline:
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
        missing = shortfalls(cfg, cluster())
        if not missing:
            log.info("the cluster now fits every stage; starting")
            return
    raise ResourceError(
        "\n".join(missing) + f"\n(the cluster did not scale up within ray.resource_wait_s = {wait:g}s)"
    )
