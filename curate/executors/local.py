"""In-process execution, one shard after another: the default for debugging and unit tests."""

from __future__ import annotations

import traceback

from curate.core.config import ExecutorConfig
from curate.core.pipeline import PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.base import OnResult


class LocalExecutor:
    def __init__(self, config: ExecutorConfig):
        self.config = config

    def check(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

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
