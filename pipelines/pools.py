"""Which stages share an actor pool (``resources.share``).

Consecutive stages with the same ``resources.share`` label run in one actor pool: each actor builds
their operators and passes every batch through them in order (``pipelines.stage_runner.StageChain``).
Every stage keeps its own rows, quarantine, timing and progress. Why: each Ray worker process costs
~1.3 CPU-s of imports in the run's head, while the model stage's actor loads its model, and wakes
~150 times a second while it waits, which takes the cores from the model stage's threads
(docs/internals.md, "Where the lm stage's time goes"). Light stages next to each other rarely need
a process each.

A pool of shared stages reserves what they need at once: the largest ``num_cpus`` (they run one
after another), the sum of their memory (their operators all stay loaded), and it takes the smallest
``batch_size`` and the largest ``nice``. They must agree on ``concurrency`` and ``num_gpus``, and a
stage whose results are cached (``cache.stages``) runs in its own pool (``share_problems``).
"""

from __future__ import annotations

from collections.abc import Sequence

from operators.base import StageConfig


def pools(stages: Sequence[StageConfig]) -> list[list[StageConfig]]:
    """``stages`` in order, grouped into actor pools: a run of consecutive stages with one
    ``resources.share`` label is one pool, every other stage a pool of its own."""
    groups: list[list[StageConfig]] = []
    for stage in stages:
        label = stage.resources.share
        if label is not None and groups and groups[-1][-1].resources.share == label:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def share_problems(stages: Sequence[StageConfig], cached: set[str]) -> list[str]:
    """What is wrong with the stages' ``resources.share`` labels, one message per problem, naming the
    field path (``stages.<i>.<op>.resources.share``); ``cached``: the stage names whose results are
    cached."""
    problems, first_at = [], {}
    for i, stage in enumerate(stages):
        label = stage.resources.share
        if label is None:
            continue
        path = f"stages.{i}.{stage.op}.resources"
        before = stages[i - 1] if i else None
        joined = before is not None and before.resources.share == label
        if label in first_at and not joined:
            problems.append(f"{path}.share: {label!r} is also the label of stages.{first_at[label]}, which is not "
                            "next to it: only consecutive stages share an actor; use another label")
        first_at.setdefault(label, i)
        if stage.stage_name in cached:
            problems.append(f"{path}.share: stage {stage.stage_name!r} caches its results (cache.stages), so it "
                            "runs in an actor pool of its own; remove share, or the stage from cache.stages")
        if joined:
            for name in ("concurrency", "num_gpus"):
                mine, theirs = getattr(stage.resources, name), getattr(before.resources, name)
                if mine != theirs:
                    problems.append(f"{path}.{name}: {mine!r} differs from stages.{i - 1}'s {theirs!r}, and "
                                    f"both share an actor ({label!r}): give them the same {name}")
    return problems


def pool_name(group: Sequence[StageConfig]) -> str:
    """How messages name a pool: its stage, or its stages joined with ``+``."""
    return "+".join(s.stage_name for s in group)


def pool_resources(group: Sequence[StageConfig]) -> dict:
    """What one actor of the pool reserves and runs with: ``num_cpus``, ``num_gpus``, ``memory``
    (bytes), ``batch_size``, ``nice`` and the pool's ``concurrency`` / ``min_actors``."""
    first = group[0].resources
    return {"num_cpus": max(s.resources.num_cpus for s in group),
            "num_gpus": max(s.resources.num_gpus for s in group),
            "memory": sum(s.memory_bytes() for s in group),
            "batch_size": min(s.resources.batch_size for s in group),
            "nice": max(s.resources.nice for s in group),
            "concurrency": first.concurrency, "min_actors": first.min_actors}
