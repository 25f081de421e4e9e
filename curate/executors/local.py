"""In-process execution, one shard after another: the default for debugging and unit tests."""

from __future__ import annotations

import importlib.util
import os
import traceback
from typing import Any

from curate.core.config import ExecutorConfig
from curate.core.pipeline import PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.base import OnResult
from curate.executors.plan import Cluster, Node, Plan, local_plan

__all__ = ["LocalExecutor", "this_machine"]


def this_machine(look_for_gpus: bool = True) -> Cluster:
    """This machine as a one-node cluster: its CPUs, the memory a process can use now, and the GPUs torch
    sees (torch is imported only when ``look_for_gpus`` and it is installed)."""
    from curate.models.footprint import machine_memory

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus, gpu_memory = 0, None
    if look_for_gpus and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
    return Cluster((Node(cpus, gpus, machine_memory(), gpu_memory),), "this machine")


class LocalExecutor:
    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.plan: Plan | None = None

    def check(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def prepare(self, phases: list[list[Any]]) -> Plan:
        models = any(b.stage.memory("cpu", b.upstream) for stages in phases for b in stages)
        self.plan = local_plan(phases, this_machine(look_for_gpus=models))
        return self.plan

    def fit(self, bound: Any, shards: Any) -> None:
        bound.stage.fit(shards)

    def run_phase(self, job: PhaseJob, specs: list[ShardSpec], on_result: OnResult) -> None:
        tries = 1 + self.config.max_shard_retries
        for spec in specs:
            for attempt in range(1, tries + 1):
                try:
                    stats = job.process(spec)
                except Exception:
                    error = traceback.format_exc()
                    if attempt == tries:
                        on_result(ShardResult(spec.id, error=error, attempts=attempt))
                else:
                    on_result(ShardResult(spec.id, stats=stats, attempts=attempt))
                    break
