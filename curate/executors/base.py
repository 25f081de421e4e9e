"""What every executor shares: the protocol an executor implements, and the callback it reports shards to.
A leaf of the package: the executors import it, and it imports none of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from curate.core.pipeline import PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.plan import Plan

__all__ = ["Executor", "OnResult"]

OnResult = Callable[[ShardResult], None]


class Executor(Protocol):
    def check(self) -> None:
        """Raise ConfigError for an environment the executor cannot run in, before any work starts."""
        ...

    def __enter__(self) -> Executor: ...
    def __exit__(self, *exc: object) -> None: ...
    def prepare(self, phases: list[list[Any]]) -> Plan:
        """Inside the ``with``: the plan of the pipeline's phases on the machines this executor runs on
        (:mod:`curate.executors.plan`), kept for ``run_phase``. Raises ConfigError where it cannot fit."""
        ...

    def fit(self, bound: Any, shards: Any) -> None:
        """Fit the global stage ``bound`` on ``shards`` (:class:`~curate.core.pipeline.PhaseShards`): in this
        process, or where the plan puts it (a GPU node, for a fit that uses GPUs)."""
        ...

    def run_phase(self, job: PhaseJob, specs: list[ShardSpec], on_result: OnResult) -> None:
        """Run ``job`` on every shard of ``specs``, retrying failures; report each shard once."""
        ...
