"""What every executor shares: the protocol an executor implements, the callback it reports shards to, and
which stages of a phase may run on the next shard while the current one finishes (the *overlapping head*).
A leaf of the package: the executors import it, and it imports none of them.

Overlapping shards. A stage whose work is mostly waiting (the download stage: its shard waits for its slowest
URL while its sockets idle) declares ``overlaps_shards = True``: its ``__call__`` may then run on several shards
of one worker at once, in threads, and it bounds its own concurrency per worker (the download stage: one pool
of ``concurrency`` sockets that every shard of the worker shares, first come first served). The leading run of
such stages of a phase is its head (:func:`overlapping_head`). Each executor lets a worker hold
:func:`shards_in_flight` shards in its head at once (a stage says how many for shards of a given size with
``shards_in_flight(rows)``: the download stage's config, or its rule for small shards): the current shard
and the next ones, whose URLs queue behind the current shard's in order (locally: each once the one before it
is loaded; in a Ray actor the first ones start together), so they take the sockets its slowest URLs leave
idle, and never more than the worker's budget is open. With one shard ahead, a shard whose tail is longer
than the next shard's whole download (hosts that answer after seconds) still left sockets idle; with more in
flight the tail of one shard overlaps several.
The rest of the phase (the tail: model stages, filters) and the writer run on one shard at a time per worker,
in shard order locally, as they did without overlap, so a model stage never runs on two shards at once in one
process. A shard's bytes do not depend on it: each row's result is its own, whenever it comes. A shard is
written whole or not at all, so a killed run resumes as before. Each shard in flight holds its rows (the
download stage: their images) in memory until it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from curate.core.pipeline import BoundStage, PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.plan import Plan

__all__ = ["Executor", "OnResult", "overlapping_head", "shards_in_flight"]

OnResult = Callable[[ShardResult], None]


def overlapping_head(stages: Sequence[BoundStage]) -> list[BoundStage]:
    """The leading stages of a phase that may run on the next shard while the current one finishes: those
    whose class sets ``overlaps_shards`` (the download stage), up to the first that does not."""
    head: list[BoundStage] = []
    for bound in stages:
        if not getattr(bound.stage, "overlaps_shards", False):
            break
        head.append(bound)
    return head


def shards_in_flight(head: Sequence[BoundStage], shard_rows: int) -> int:
    """How many shards of ``shard_rows`` rows one worker holds in its overlapping ``head`` at once: the fewest
    any of its stages allows (its ``shards_in_flight(shard_rows)``; 2, a lookahead of one, where it has
    none); 1 without a head."""
    if not head:
        return 1
    return max(1, min(_in_flight(b.stage, shard_rows) for b in head))


def _in_flight(stage: object, shard_rows: int) -> int:
    ask = getattr(stage, "shards_in_flight", None)
    return 2 if ask is None else int(ask(shard_rows))


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
