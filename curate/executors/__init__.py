"""Executors take a :class:`curate.core.pipeline.PhaseJob` over shards. ``local`` runs in this process, shard after
shard; ``ray`` runs on a Ray cluster. Both call the same job code, so both write the same bytes. The protocol
they implement is in :mod:`curate.executors.base`."""

from __future__ import annotations

from curate.core.config import ExecutorConfig
from curate.executors.base import Executor, OnResult

__all__ = ["Executor", "OnResult", "make_executor"]


def make_executor(config: ExecutorConfig) -> Executor:
    if config.kind == "ray":
        from curate.executors.ray import RayExecutor  # Ray is imported only here

        return RayExecutor(config)
    from curate.executors.local import LocalExecutor

    return LocalExecutor(config)
