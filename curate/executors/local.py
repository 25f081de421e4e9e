"""In-process execution, one shard after another: the default for debugging and unit tests.

A phase whose first stages overlap shards (the download stage: :mod:`curate.executors.base`) runs with a
lookahead: while this thread takes shard N through the rest of the phase and writes it, other threads have
already loaded shards N+1 ... N+k-1 (k: :func:`~curate.executors.base.shards_in_flight`) and started their
downloads, whose URLs queue behind shard N's in the stage's one socket pool and take the sockets shard N's
slowest URLs leave idle. Everything after the head, and the writer, runs in this thread, shard after shard, in
order, as without overlap. A shard whose first try fails is tried again here, on its own, as every shard of a
phase without overlap is. At most k shards are held at once (the one being finished and those ahead of it).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from curate.core.config import ExecutorConfig
from curate.core.pipeline import BoundStage, PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.base import OnResult, overlapping_head, shards_in_flight
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
        self.run_from(job, iter(specs), max((spec.rows for spec in specs), default=0), on_result)

    def run_from(
        self, job: PhaseJob, specs: Iterator[ShardSpec], shard_rows: int, on_result: OnResult
    ) -> None:
        """``run_phase`` on the shards ``specs`` yields, taken one at a time as a shard's turn comes (the
        lookahead's included): a source that stops yielding stops the phase here once the shards already
        taken are finished (the Ray executor's driver lane: :mod:`curate.executors.ray`). ``shard_rows``: the
        largest shard's rows, for the lookahead's depth."""
        head = overlapping_head(job.stages)
        depth = shards_in_flight(head, shard_rows)
        if depth > 1 and _set_up(job, head):
            self._run_overlapped(job, head, specs, on_result, depth)
        else:
            for spec in specs:
                self._finish(job, spec, on_result, first=1)

    def _finish(self, job: PhaseJob, spec: ShardSpec, on_result: OnResult, first: int) -> None:
        """Take ``spec`` through the whole phase here, tries ``first`` and on; report its result."""
        tries = 1 + self.config.max_shard_retries
        for attempt in range(first, tries + 1):
            try:
                stats = job.process(spec)
            except Exception:
                error = traceback.format_exc()
                if attempt == tries:
                    on_result(ShardResult(spec.id, error=error, attempts=attempt))
            else:
                on_result(ShardResult(spec.id, stats=stats, attempts=attempt))
                return

    def _run_overlapped(
        self,
        job: PhaseJob,
        head: list[BoundStage],
        specs: Iterator[ShardSpec],
        on_result: OnResult,
        depth: int,
    ) -> None:
        """Shard N's tail and write here while the heads (load and downloads) of the shards after it run in
        threads, ``depth`` shards at once."""
        tail = job.stages[len(head) :]
        ahead = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="curate-shard-head")
        started: deque[tuple[ShardSpec, threading.Event, Future]] = deque()  # in shard order
        try:
            while True:
                while len(started) < depth:  # the lookahead: each shard's URLs queue behind the one before
                    spec = next(specs, None)  # it (set once that one has its table, or failed)
                    if spec is None:
                        break
                    if started:
                        started[-1][1].wait()
                    loaded = threading.Event()
                    started.append((spec, loaded, ahead.submit(_run_head, job, head, spec, loaded)))
                if not started:
                    return
                spec, _, future = started.popleft()
                try:
                    table, timings = future.result()
                    table = job.apply(tail, table, timings)
                    stats = job.sink(spec, table, timings)
                except Exception:
                    if self.config.max_shard_retries == 0:
                        on_result(ShardResult(spec.id, error=traceback.format_exc(), attempts=1))
                    else:
                        self._finish(job, spec, on_result, first=2)
                else:
                    on_result(ShardResult(spec.id, stats=stats, attempts=1))
        finally:
            for _, _, future in started:  # stopped early (Ctrl-C): the heads ahead are not waited for
                future.cancel()
            ahead.shutdown(wait=False, cancel_futures=True)


def _set_up(job: PhaseJob, head: list[BoundStage]) -> bool:
    """Set the head's stages up here, before two threads run them (``setup()`` runs once, in one thread).
    False when one raises: the phase then runs shard after shard, and each shard fails and is retried as
    it would have been."""
    try:
        job.setup(head)
    except Exception:
        return False
    return True


def _run_head(
    job: PhaseJob, head: list[BoundStage], spec: ShardSpec, loaded: threading.Event
) -> tuple[Any, dict[str, Any]]:
    """Load ``spec`` and run the overlapping stages on it (in a lookahead thread). ``loaded`` is set once
    the shard is loaded: the next shard's head starts after it, so this shard's URLs queue first."""
    try:
        table, timings = job.load(spec)
    finally:
        loaded.set()
    return job.apply(head, table, timings), timings
