"""What every executor shares: the protocol an executor implements, and the callback it reports shards to.
A leaf of the package: the executors import it, and it imports none of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from curate.core.pipeline import PhaseJob, ShardResult
from curate.core.reader import ShardSpec

__all__ = ["Executor", "OnResult"]

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
