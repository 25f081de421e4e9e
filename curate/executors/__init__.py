"""Executors take a :class:`curate.core.pipeline.PhaseJob` over shards. ``local`` runs in this process, shard after
shard; ``ray`` runs on a Ray cluster. Both call the same job code, so both write the same bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from curate.core.config import ExecutorConfig
from curate.core.pipeline import PhaseJob, ShardResult
from curate.core.reader import ShardSpec

OnResult = Callable[[ShardResult], None]


class Executor(Protocol):
    def check(self) -> None:
        """Raise ConfigError for an environment the executor cannot run in, before any work starts."""
        ...

    def __enter__(self) -> Executor: ...
    def __exit__(self, *exc: object) -> None: ...
    def run_phase(self, job: PhaseJob, specs: list[ShardSpec], on_result: OnResult) -> None:
        """Run ``job`` on every shard of ``specs``, retrying failures; report each shard once."""
        ...


def make_executor(config: ExecutorConfig) -> Executor:
    if config.kind == "ray":
        from curate.executors.ray import RayExecutor  # Ray is imported only here

        return RayExecutor(config)
    from curate.executors.local import LocalExecutor

    return LocalExecutor(config)
