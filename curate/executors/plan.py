"""The plan of a run on a cluster: which device each stage runs on, how Ray operators group the stages, how
many actors each pool gets, and whether it all fits the cluster's memory. Made before any work:
``curate describe`` prints it, ``curate validate`` checks it, and the executors run it.

Devices. A model stage takes its default GPU share (``StageResources.gpus_if_any``) where the cluster has
GPUs, and runs on CPUs where it has none; an explicit ``resources.gpus`` wins (``0`` keeps it on CPUs).

Operators. Consecutive stages without a model run together as one task operator (Ray fuses them: download and
the cheap filters stay on CPU workers, next to each other). Each stage with a model (or GPUs) is an actor pool,
so its ``setup()`` loads the weights once per actor. A phase whose stages all run on CPUs with no pool size of
their own (``single_operator``) is one operator instead: each task, or each actor when a stage has a model,
reads a shard, runs every stage and writes it. No shard then crosses a process between operators (each
crossing serialises the whole shard, images included), and no read or write task waits for a CPU that actor
pools hold: on a 2-CPU node, the split plan runs one shard at a time (measured in benchmarks/RESULTS.md).

Memory. Every worker's need is estimated without loading weights (:meth:`curate.core.stage.Stage.memory`,
:mod:`curate.models.footprint`), or given as ``resources.memory``. Actors are placed by it (Ray's ``memory``
resource), and pools are sized so that every actor of a phase fits at once:

- a GPU stage's share is at least its GPU memory over the GPU's (a default share is raised to fit; an
  explicit one that packs more actors on a GPU than its memory holds is an error). The GPU stages of a phase
  run at the same time, so they split the GPUs between them in proportion to their shares;
- a single-operator phase runs as many workers per node as its CPUs and memory hold, each holding every
  stage's model;
- CPU actor pools scale from 1 up to what the CPUs left after the read and write tasks, and the memory left
  after the GPU pools, hold.

A plan that cannot fit (one worker needs more memory than any node has, or a phase's GPU stages need more
GPUs at once than there are) is a :class:`~curate.base.ConfigError`, naming the stage and the numbers: the CLI
exits with 2 before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from curate.base import ConfigError, MemoryNeed, fmt_bytes

__all__ = [
    "Cluster",
    "Node",
    "Operator",
    "PhasePlan",
    "Plan",
    "StagePlan",
    "combined",
    "groups",
    "local_plan",
    "make_plan",
    "plan_phase",
    "single_operator",
]

# Share of a node's memory Ray leaves to tasks and actors: the rest is its object store (Ray's default is
# 30% of the memory available when the node starts). Used only when the memory is given as the node's RAM.
RAY_TASK_SHARE = 0.7


@dataclass(frozen=True)
class Node:
    """One machine: CPUs, GPUs, memory that workers may hold (bytes; None where unknown) and each GPU's."""

    cpus: float
    gpus: float = 0.0
    memory: int | None = None
    gpu_memory: int | None = None


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    source: str = ""  # where the figures come from, for the plan's header

    @classmethod
    def uniform(
        cls,
        nodes: int,
        cpus: float,
        gpus: float = 0.0,
        memory: int | None = None,
        gpu_memory: int | None = None,
        source: str = "",
    ) -> Cluster:
        return cls(tuple(Node(cpus, gpus, memory, gpu_memory) for _ in range(max(1, nodes))), source)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def memory(self) -> int | None:
        return None if any(n.memory is None for n in self.nodes) else sum(n.memory or 0 for n in self.nodes)

    @property
    def node_memory(self) -> int | None:
        """The most memory one node offers: the largest worker that can be placed at all."""
        known = [n.memory for n in self.nodes if n.memory is not None]
        return max(known) if known else None

    @property
    def gpu_memory(self) -> int | None:
        known = [n.gpu_memory for n in self.nodes if n.gpus > 0 and n.gpu_memory]
        return min(known) if known else None

    def describe(self) -> str:
        n = len(self.nodes)
        node = self.nodes[0]
        uniform = all(x == node for x in self.nodes)
        if uniform:
            what = f"{_n(node.cpus, 'CPU')}, {_n(node.gpus, 'GPU')}"
            what += f", {fmt_bytes(node.memory)} for workers" if node.memory else ""
            what += f", {fmt_bytes(node.gpu_memory)} per GPU" if node.gpus and node.gpu_memory else ""
            head = f"{n} node{'s' if n > 1 else ''} of {what}" if n > 1 else what
        else:
            head = f"{n} nodes, {_n(self.cpus, 'CPU')}, {_n(self.gpus, 'GPU')}" + (
                f", {fmt_bytes(self.memory)} for workers" if self.memory else ""
            )
        return head + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "gpus": self.gpus,
            "memory": self.memory,
            "gpu_memory": self.gpu_memory,
            "nodes": [vars(n) for n in self.nodes],
            "source": self.source,
        }


def _n(count: float, noun: str) -> str:
    return f"{count:g} {noun}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Operator:
    kind: str  # "read", "tasks", "actors", "write"
    stages: tuple[str, ...]
    num_cpus: float
    num_gpus: float | None = None
    concurrency: int | tuple[int, int] | None = None
    reads_writes: bool = False  # the whole phase: reads the shard, runs the stages, writes it
    memory: int | None = None  # host bytes each worker reserves (Ray's memory resource)

    def describe(self) -> str:
        what = ", ".join(self.stages) if self.stages else self.kind
        if self.reads_writes:
            what = ", ".join(("read", *self.stages, "write"))
        mem = f", {fmt_bytes(self.memory)}" if self.memory else ""
        if self.kind == "actors":
            c = self.concurrency
            size = f"{c[0]}-{c[1]} actors" if isinstance(c, tuple) else f"{c} actor{'s' if c != 1 else ''}"
            gpu = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
            return f"actor pool [{what}]: {size}, each {self.num_cpus:g} CPU{gpu}{mem}"
        label = {"read": "read shard", "write": "write shard"}.get(self.kind, "tasks")
        at_once = f", {self.concurrency} at once" if self.concurrency else ""
        return f"{label} [{what}]: {self.num_cpus:g} CPU per task{at_once}{mem}"

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for Ray: ``num_cpus``, ``num_gpus`` and ``memory`` where set."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            out["num_gpus"] = self.num_gpus
        if self.memory:
            out["memory"] = self.memory
        return out

    def to_dict(self) -> dict[str, Any]:
        c = self.concurrency
        out = {
            "kind": self.kind,
            "stages": list(self.stages),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "concurrency": list(c) if isinstance(c, tuple) else c,
            "memory": self.memory,
        }
        if self.reads_writes:
            out["reads_writes"] = True
        return out


@dataclass(frozen=True)
class StagePlan:
    """One stage on the cluster: device, GPU share, workers, and memory per worker and in all."""

    name: str
    stage: str
    device: str  # "cuda" or "cpu"; "-" for a stage without a model
    gpus: float
    workers: int | tuple[int, int] | None  # actors (a size, or Ray's autoscaling range); None: tasks
    need: MemoryNeed | None
    shared_with: tuple[str, ...] = ()  # the other stages of the same worker (a single-operator phase)

    @property
    def most_workers(self) -> int:
        w = self.workers
        return w[1] if isinstance(w, tuple) else (w or 0)

    def to_dict(self) -> dict[str, Any]:
        w = self.workers
        need = self.need
        return {
            "name": self.name,
            "stage": self.stage,
            "device": self.device,
            "gpus": self.gpus,
            "workers": list(w) if isinstance(w, tuple) else w,
            "memory_per_worker": need.host if need else None,
            "gpu_memory_per_worker": need.gpu if need else None,
            "memory_total": need.host * self.most_workers if need and self.workers else None,
            "gpu_memory_total": need.gpu * self.most_workers if need and self.workers else None,
            "estimate": list(need.parts) if need else [],
            "shared_with": list(self.shared_with),
        }


@dataclass
class PhasePlan:
    operators: list[Operator]
    stages: list[StagePlan]

    @property
    def single(self) -> bool:
        return len(self.operators) == 1 and self.operators[0].reads_writes


@dataclass
class Plan:
    cluster: Cluster
    phases: list[PhasePlan]
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StagePlan:
        return next(s for p in self.phases for s in p.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster.to_dict(),
            "phases": [
                {"operators": [o.to_dict() for o in p.operators], "stages": [s.to_dict() for s in p.stages]}
                for p in self.phases
            ],
            "notes": self.notes,
        }


# --- grouping ----------------------------------------------------------------------------------------


def groups(stages: list[Any]) -> list[list[Any]]:
    """Consecutive task stages together; each actor stage alone (``stages`` carry resources resolved for the
    cluster, see :func:`make_plan`)."""
    out: list[list[Any]] = []
    for bound in stages:
        if bound.resources.needs_actor or not out or out[-1][-1].resources.needs_actor:
            out.append([bound])
        else:
            out[-1].append(bound)
    return out


def single_operator(stages: list[Any]) -> bool:
    """Whether a phase runs as one operator: no stage asks for GPUs or for its own actor pool size."""
    return all(b.resources.gpus == 0 and b.resources.concurrency is None for b in stages)


def combined(needs: list[MemoryNeed]) -> MemoryNeed:
    """One worker holding several stages' models: every model at once, the process itself counted once, and
    one stage's transient peak at a time (the stages load one after another and run one batch at a time)."""
    from curate.models.footprint import PROCESS_BASE

    if not needs:
        return MemoryNeed(0)
    transient = max(n.transient for n in needs)
    gpu_transient = max(n.gpu_transient for n in needs)
    resident = needs[0].resident + sum(max(0, n.resident - PROCESS_BASE) for n in needs[1:])
    gpu = sum(n.gpu_resident for n in needs) + gpu_transient
    parts = tuple(p for n in needs for p in n.parts)
    if len(needs) > 1 and transient:
        parts += (f"one stage's loading or batch peak at a time: {fmt_bytes(transient)}",)
    return MemoryNeed(resident + transient, gpu, parts, transient, gpu_transient)


def estimate(bound: Any, device: str, notes: list[str]) -> MemoryNeed | None:
    """The stage's memory on ``device``; where it cannot be estimated (no config to size the model from),
    None, and a note saying so."""
    try:
        return bound.memory(device)
    except Exception as e:  # any failure to size a model leaves it unchecked, and says so
        notes.append(f"{bound.name}: memory not estimated ({e}); give it resources.memory")
        return None


# --- the plan ----------------------------------------------------------------------------------------


@dataclass
class _Bound:
    """A stage with its resources as they are on this cluster (the default GPU share applied)."""

    name: str
    stage: Any
    resources: Any
    need: MemoryNeed | None
    explicit_gpus: bool


def _resolve(bound: Any, cluster: Cluster, notes: list[str]) -> _Bound:
    res = bound.resources
    if res.gpus > 0 and cluster.gpus <= 0:
        raise ConfigError(
            [
                (
                    f"stages.{bound.name}.resources.gpus",
                    f"asks for {res.gpus:g} GPU per actor, but the cluster has no GPUs: set it to 0 (or remove "
                    "it) to run on CPUs, or join a cluster with GPUs",
                )
            ]
        )
    on = res.on(cluster.gpus)
    device = "cuda" if on.gpus > 0 else "cpu"
    need = estimate(bound, device, notes)
    return _Bound(bound.name, bound.stage, on, need, explicit_gpus=res.gpus > 0)


def make_plan(phases: list[list[Any]], cluster: Cluster) -> Plan:
    """The plan of every phase (lists of :class:`~curate.core.pipeline.BoundStage`) on ``cluster``."""
    result = Plan(cluster, [])
    for index, stages in enumerate(phases):
        result.phases.append(plan_phase(stages, cluster, index, result.notes))
    if cluster.gpus <= 0 and any(s.need for p in result.phases for s in p.stages):
        result.notes.append("no GPUs: every model stage runs on CPUs (in fp32 where its precision is auto)")
    for stages in phases[1:]:
        fit = getattr(stages[0].stage, "fit_gpus", lambda: 0.0)()
        if fit > 0 and cluster.gpus > 0:
            result.notes.append(
                f"{stages[0].name}: its fit runs as a Ray task on a node with a GPU ({fit:g} GPU)"
            )
    return result


def plan_phase(
    stages: list[Any], cluster: Cluster, index: int = 0, notes: list[str] | None = None
) -> PhasePlan:
    """One phase's operators and stage plans; raises :class:`ConfigError` where it cannot fit."""
    notes = notes if notes is not None else []
    resolved = [_resolve(b, cluster, notes) for b in stages]
    if single_operator(resolved):
        return _single(resolved, cluster, index)
    return _split(resolved, cluster, index, notes)


def _too_big(where: str, need: int, cluster: Cluster, what: str) -> ConfigError:
    return ConfigError(
        [
            (
                where,
                f"{what} needs {fmt_bytes(need)} of memory, more than any node of the cluster offers "
                f"({fmt_bytes(cluster.node_memory or 0)}): give it a machine with more memory, run it on a GPU, "
                "or lower its batch_size",
            )
        ]
    )


def _single(stages: list[_Bound], cluster: Cluster, index: int) -> PhasePlan:
    names = tuple(b.name for b in stages)
    cpus = max((b.resources.cpus for b in stages), default=1.0)
    actors = any(b.resources.needs_actor for b in stages)
    need = combined([b.need for b in stages if b.need]) if any(b.need for b in stages) else None
    by_cpu = [int(n.cpus // max(cpus, 1e-3)) for n in cluster.nodes]
    if need and cluster.node_memory is not None:
        if need.host > cluster.node_memory:
            models = ", ".join(b.name for b in stages if b.need)
            raise _too_big(
                f"phase {index} ({', '.join(names)})",
                need.host,
                cluster,
                f"one worker of this phase holds every model of it ({models}) and",
            )
        by_mem = [int((n.memory or 0) // need.host) for n in cluster.nodes]
        slots = sum(min(c, m) for c, m in zip(by_cpu, by_mem, strict=True))
    else:
        slots = sum(by_cpu)
    slots = max(1, slots)
    kind = "actors" if actors else "tasks"
    op = Operator(kind, names, cpus, None, slots, reads_writes=True, memory=need.host if need else None)
    plans = [
        StagePlan(
            b.name,
            b.stage.name,
            "cpu" if b.need else "-",
            0.0,
            slots if actors else None,
            b.need,
            tuple(n for n in names if n != b.name),
        )
        for b in stages
    ]
    return PhasePlan([op], plans)


def _nice_share(share: float) -> float:
    """``share`` rounded up to 1/k, so that k actors fill a GPU exactly."""
    if share >= 1:
        return float(math.ceil(share))
    return 1.0 / math.floor(1.0 / share + 1e-9)


def _gpu_pools(pools: list[_Bound], cluster: Cluster, index: int) -> dict[str, tuple[float, int]]:
    """``{stage: (share, actors)}`` for the phase's GPU stages: each share fits the GPU's memory, and the
    pools split the GPUs between them, since they all run at once."""
    gpu_mem = cluster.gpu_memory
    shares: dict[str, float] = {}
    floors: dict[str, float] = {}
    for b in pools:
        share = b.resources.gpus
        need = b.need.gpu if b.need else 0
        floor = need / gpu_mem if gpu_mem and need else 0.0
        where = f"stages.{b.name}.resources.gpus"
        if floor > 1:
            raise ConfigError(
                [
                    (
                        where,
                        f"one actor needs {fmt_bytes(need)} of GPU memory; the cluster's GPUs have "
                        f"{fmt_bytes(gpu_mem or 0)}: lower the stage's batch_size or use larger GPUs",
                    )
                ]
            )
        if share < floor - 1e-9:
            if b.explicit_gpus:
                per_gpu = math.floor(1 / share + 1e-9)
                raise ConfigError(
                    [
                        (
                            where,
                            f"{share:g} GPU per actor puts {per_gpu} actors on a GPU, {per_gpu} x "
                            f"{fmt_bytes(need)} = {fmt_bytes(per_gpu * need)}, more than its "
                            f"{fmt_bytes(gpu_mem or 0)}: ask for at least {_nice_share(floor):g}",
                        )
                    ]
                )
            share = _nice_share(floor)
        shares[b.name], floors[b.name] = share, _nice_share(floor) if floor else 0.0
    total = cluster.gpus
    if sum(shares.values()) > total + 1e-9:
        # Default shares give way (down to what their memory needs); explicit ones stay.
        movable = [b.name for b in pools if not b.explicit_gpus]
        fixed = sum(shares[n] for n in shares if n not in movable)
        room = total - fixed
        want = sum(shares[n] for n in movable)
        for n in movable:
            shares[n] = max(floors[n], _nice_share(shares[n] * room / want)) if room > 0 else shares[n]
    if sum(shares.values()) > total + 1e-9:
        detail = ", ".join(f"{n} {s:g}" for n, s in shares.items())
        raise ConfigError(
            [
                (
                    f"phase {index}",
                    f"its GPU stages run at the same time and need {sum(shares.values()):g} GPUs at once "
                    f"({detail}); the cluster has {total:g}: lower their resources.gpus, or set gpus: 0 on some",
                )
            ]
        )
    weight = sum(shares.values())
    out = {}
    for b in pools:
        share = shares[b.name]
        if b.resources.concurrency is not None:
            c = b.resources.concurrency
            out[b.name] = (share, tuple(c) if isinstance(c, list | tuple) else c)
        else:
            budget = total * share / weight
            out[b.name] = (share, max(1, math.floor(budget / share + 1e-9)))
    return out


def _split(stages: list[_Bound], cluster: Cluster, index: int, notes: list[str]) -> PhasePlan:
    stage_groups = groups(stages)
    gpu_pools = [g[0] for g in stage_groups if g[0].resources.needs_actor and g[0].resources.gpus > 0]
    cpu_pools = [g[0] for g in stage_groups if g[0].resources.needs_actor and g[0].resources.gpus == 0]
    gpu_sizes = _gpu_pools(gpu_pools, cluster, index)
    node_mem = cluster.node_memory
    for b in gpu_pools + cpu_pools:
        if b.need and node_mem is not None and b.need.host > node_mem:
            raise _too_big(f"stages.{b.name}", b.need.host, cluster, "one actor")
    # CPUs: one for the read and write tasks; GPU actors' CPUs next; CPU pools share the rest.
    free_cpus = cluster.cpus - 1
    gpu_cpus = sum(_most(gpu_sizes[b.name][1]) * b.resources.cpus for b in gpu_pools)
    if gpu_cpus > free_cpus and gpu_pools:
        notes.append(
            f"phase {index}: the GPU actors want {gpu_cpus:g} CPUs and {free_cpus:g} are free besides the "
            "read and write tasks; Ray starts them as CPUs free up"
        )
    cpu_left = max(free_cpus - gpu_cpus, 0.5)
    memory = cluster.memory
    mem_left = None
    if memory is not None:
        mem_left = memory - sum(
            _most(gpu_sizes[b.name][1]) * (b.need.host if b.need else 0) for b in gpu_pools
        )
    ops = [Operator("read", (), 1.0)]
    plans: list[StagePlan] = []
    for group in stage_groups:
        head = group[0]
        names = tuple(b.name for b in group)
        if not head.resources.needs_actor:
            ops.append(Operator("tasks", names, max(b.resources.cpus for b in group)))
            plans += [StagePlan(b.name, b.stage.name, "-", 0.0, None, b.need) for b in group]
            continue
        host = head.need.host if head.need else None
        if head.resources.gpus > 0:
            share, size = gpu_sizes[head.name]
            ops.append(Operator("actors", names, head.resources.cpus, share, size, memory=host))
            plans.append(StagePlan(head.name, head.stage.name, "cuda", share, size, head.need))
            continue
        cpus = min(head.resources.cpus, cpu_left / max(len(cpu_pools), 1))
        if head.resources.concurrency is not None:
            c = head.resources.concurrency
            size: int | tuple[int, int] = tuple(c) if isinstance(c, list | tuple) else c
        else:
            most = max(1, int(cpu_left // max(head.resources.cpus, 1e-3)))
            if host and mem_left is not None:
                by_mem = int(mem_left / max(len(cpu_pools), 1) // host)
                if by_mem < 1:
                    raise ConfigError(
                        [
                            (
                                f"stages.{head.name}",
                                f"one actor needs {fmt_bytes(host)}; after the GPU stages' actors the cluster "
                                f"has {fmt_bytes(max(mem_left, 0))} for {len(cpu_pools)} CPU model stage(s): "
                                "give the cluster more memory, or fewer GPU actors (resources.concurrency)",
                            )
                        ]
                    )
                most = min(most, by_mem)
            size = (1, most)
        ops.append(Operator("actors", names, cpus, None, size, memory=host))
        plans.append(StagePlan(head.name, head.stage.name, "cpu" if head.need else "-", 0.0, size, head.need))
    ops.append(Operator("write", (), 1.0))
    return PhasePlan(ops, plans)


def _most(size: int | tuple[int, int]) -> int:
    return size[1] if isinstance(size, tuple) else size


def local_plan(phases: list[list[Any]], cluster: Cluster) -> Plan:
    """The plan of the local executor: one process runs every stage, and a stage's model stays loaded
    until the run ends, so the process holds all of them at once (on the GPU, when there is one)."""
    device = "cuda" if cluster.gpus > 0 else "cpu"
    result = Plan(cluster, [])
    needs: list[tuple[str, MemoryNeed]] = []
    for stages in phases:
        plans = []
        for bound in stages:
            need = (
                bound.memory(device) if bound.resources.gpus_if_any > 0 or bound.resources.gpus > 0 else None
            )
            need = need or bound.memory("cpu")
            on = device if need and need.gpu else ("cpu" if need else "-")
            plans.append(StagePlan(bound.name, bound.stage.name, on, 0.0, 1 if need else None, need))
            if need:
                needs.append((bound.name, need))
        names = tuple(b.name for b in stages)
        result.phases.append(PhasePlan([Operator("tasks", names, cluster.cpus, None, 1, True)], plans))
    total = combined([n for _, n in needs])
    models = ", ".join(name for name, _ in needs)
    if needs and cluster.memory is not None and total.host > cluster.memory:
        raise ConfigError(
            [
                (
                    "executor.kind: local",
                    f"the local executor holds every model in one process ({models}): about "
                    f"{fmt_bytes(total.host)}, and this machine has {fmt_bytes(cluster.memory)} available: "
                    "free memory, lower the model stages' batch_size, or run them on a Ray cluster",
                )
            ]
        )
    if needs and total.gpu and cluster.gpu_memory and total.gpu > cluster.gpu_memory:
        raise ConfigError(
            [
                (
                    "executor.kind: local",
                    f"the local executor puts every model on the one GPU ({models}): about "
                    f"{fmt_bytes(total.gpu)}, and the GPU has {fmt_bytes(cluster.gpu_memory)}: use the Ray "
                    "executor, which gives each stage its own actors",
                )
            ]
        )
    if needs:
        result.notes.append(
            f"one process holds every model: about {total.describe()} "
            + ("(on the GPU)" if device == "cuda" else "(no GPU: on CPUs, in fp32 where precision is auto)")
        )
    return result
