"""How a phase's stages map onto Ray Data operators, and how big each actor pool is on a given cluster.

Consecutive stages without a model run together as one task operator (Ray fuses them: download and the
cheap filters stay on CPU workers, next to each other). Each stage with a model (or GPUs) is an actor pool, so
its ``setup()`` loads the weights once per actor. ``curate describe`` prints this plan, and the Ray executor
runs it, from the same functions.

Actor pool size, per stage: ``resources.concurrency`` when given (a size, or ``[min, max]`` for Ray's
autoscaling pool); else, for a GPU stage, as many actors as the cluster's GPUs hold at ``resources.gpus``
each (``gpus: 0.25`` puts four actors on one GPU: several small models share a device); else from 1 up to
the CPUs left after one for the read and write tasks. The CPU stages' pools of a phase share those CPUs.

A phase whose stages all run on CPUs with no pool size of their own (``single_operator``) is one operator
instead: each task, or each actor when a stage has a model, reads a shard, runs every stage and writes it,
and as many run at once as the CPUs hold. No shard then crosses a process between operators (each crossing
serialises the whole shard, images included), and no read or write task waits for a CPU that actor pools
hold: on a 2-CPU node, the split plan runs one shard at a time (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.base import ConfigError

__all__ = ["Operator", "actor_sizing", "groups", "plan", "single_operator", "single_sizing"]


def groups(stages: list[Any]) -> list[list[Any]]:
    """Consecutive task stages together; each actor stage alone."""
    out: list[list[Any]] = []
    for bound in stages:
        if bound.resources.needs_actor or not out or out[-1][-1].resources.needs_actor:
            out.append([bound])
        else:
            out[-1].append(bound)
    return out


def actor_pools(stage_groups: list[list[Any]]) -> int:
    """The CPU-only actor pools of a phase (they share the CPUs that the read and write tasks leave)."""
    return sum(1 for g in stage_groups if g[0].resources.needs_actor and g[0].resources.gpus == 0)


def single_operator(stages: list[Any]) -> bool:
    """Whether a phase runs as one operator: no stage asks for GPUs or for its own actor pool size."""
    return all(b.resources.gpus == 0 and b.resources.concurrency is None for b in stages)


def single_sizing(stages: list[Any], total_cpus: float) -> dict[str, Any]:
    """``{"actors": bool, "num_cpus": c, "concurrency": n}`` for a phase run as one operator: each task or
    actor holds the most CPUs any of its stages asks for, and ``n`` of them (as many as the CPUs hold) run
    at once."""
    cpus = max((b.resources.cpus for b in stages), default=1.0)
    actors = any(b.resources.needs_actor for b in stages)
    return {"actors": actors, "num_cpus": cpus, "concurrency": max(1, int(total_cpus // max(cpus, 1e-3)))}


def actor_sizing(
    res: Any, total_cpus: float, total_gpus: float, pools: int = 1, name: str = ""
) -> dict[str, Any]:
    """``{"concurrency": n or (min, max), "num_cpus": c, "num_gpus": g or None}`` for one actor pool."""
    if res.gpus > 0 and total_gpus <= 0:
        raise ConfigError(
            [
                (
                    f"stages.{name}.resources.gpus" if name else "resources.gpus",
                    f"asks for {res.gpus:g} GPU per actor, but the Ray cluster has no GPUs: "
                    "set it to 0 (or remove it) to run on CPUs, or join a cluster with GPUs",
                )
            ]
        )
    if res.concurrency is not None:
        concurrency = tuple(res.concurrency) if isinstance(res.concurrency, list | tuple) else res.concurrency
    elif res.gpus > 0:
        concurrency = max(1, int(total_gpus // res.gpus))
    else:
        # Leave a CPU for the read and write tasks: actors holding every CPU starve them and hang.
        concurrency = (1, max(1, int((total_cpus - 1) // max(res.cpus, 1e-3))))
    cpus = min(res.cpus, max(total_cpus - 1, 0.5) / max(pools, 1))
    return {"concurrency": concurrency, "num_cpus": cpus, "num_gpus": res.gpus or None}


@dataclass(frozen=True)
class Operator:
    kind: str  # "read", "tasks", "actors", "write"
    stages: tuple[str, ...]
    num_cpus: float
    num_gpus: float | None = None
    concurrency: int | tuple[int, int] | None = None
    reads_writes: bool = False  # the whole phase: reads the shard, runs the stages, writes it

    def describe(self) -> str:
        what = ", ".join(self.stages) if self.stages else self.kind
        if self.reads_writes:
            what = ", ".join(("read", *self.stages, "write"))
        if self.kind == "actors":
            c = self.concurrency
            size = f"{c[0]}-{c[1]} actors" if isinstance(c, tuple) else f"{c} actor{'s' if c != 1 else ''}"
            gpu = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
            return f"actor pool [{what}]: {size}, each {self.num_cpus:g} CPU{gpu}"
        label = {"read": "read shard", "write": "write shard"}.get(self.kind, "tasks")
        at_once = f", {self.concurrency} at once" if self.concurrency else ""
        return f"{label} [{what}]: {self.num_cpus:g} CPU per task{at_once}"

    def to_dict(self) -> dict[str, Any]:
        c = self.concurrency
        out = {
            "kind": self.kind,
            "stages": list(self.stages),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "concurrency": list(c) if isinstance(c, tuple) else c,
        }
        if self.reads_writes:
            out["reads_writes"] = True
        return out


def plan(stages: list[Any], total_cpus: float, total_gpus: float) -> list[Operator]:
    """The operators of one phase on a cluster of ``total_cpus`` CPUs and ``total_gpus`` GPUs."""
    if single_operator(stages):
        s = single_sizing(stages, total_cpus)
        names = tuple(b.name for b in stages)
        kind = "actors" if s["actors"] else "tasks"
        return [Operator(kind, names, s["num_cpus"], None, s["concurrency"], reads_writes=True)]
    gs = groups(stages)
    pools = actor_pools(gs)
    ops = [Operator("read", (), 1.0)]
    for group in gs:
        names = tuple(b.name for b in group)
        if group[0].resources.needs_actor:
            s = actor_sizing(group[0].resources, total_cpus, total_gpus, pools, group[0].name)
            ops.append(Operator("actors", names, s["num_cpus"], s["num_gpus"], s["concurrency"]))
        else:
            ops.append(Operator("tasks", names, max(b.resources.cpus for b in group)))
    ops.append(Operator("write", (), 1.0))
    return ops
