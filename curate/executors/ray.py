"""Execution on Ray: one row per shard.

A row carries the shard's id and spec, its table as Arrow IPC bytes, the stage timings and an error.
A phase of CPU stages is one operator (``plan.single_operator``): a task, or an actor when a stage has a
model, reads a shard, runs every stage and writes it, so the shard never leaves that worker, and as many
shards run at once as the CPUs hold. It runs on Ray core; only the shard's stats come back. Otherwise (a
GPU stage, or a pool size in the config) the phase is a Ray Data dataset: consecutive stages without a
model run as Ray tasks (Ray fuses them), each stage with a model (or GPUs) as an actor pool. Either way a
model stage's ``setup()`` runs once per actor. An exception in a stage is caught per shard and travels as
the row's error, so one bad shard never aborts the phase; failed shards are retried in a new round, then
reported. Each shard's stats file names the Ray node that wrote it (``node``).

``ray.init()`` with no address starts a local cluster (quietly, no dashboard unless asked);
``executor.address`` or ``RAY_ADDRESS`` joins an existing one. A cluster that is already initialised in
this process (a test session's, a notebook's) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from curate.base import ConfigError
from curate.core.config import ExecutorConfig
from curate.core.pipeline import BoundStage, PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.base import OnResult
from curate.executors.plan import actor_pools, actor_sizing, groups, single_operator, single_sizing

_ROW_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("data", pa.large_binary()),
        ("timings", pa.string()),
        ("error", pa.string()),
    ]
)


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class _ShardStep:
    """One step over the shards of a batch (a batch is normally one shard). A step's exception becomes the
    shard's error, and a shard that already has an error passes through untouched."""

    def __init__(self, job: PhaseJob):
        self.job = job

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.run(row) for row in batch.to_pylist()], schema=_ROW_SCHEMA)

    def run(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"] is not None:
            return row
        try:
            return {**row, **self.step(row)}
        except Exception:
            return {**row, "data": b"", "error": traceback.format_exc()}


def _spec(row: dict[str, Any]) -> ShardSpec:
    return ShardSpec.from_dict(json.loads(row["shard"]))


class _Load(_ShardStep):
    """Task: read the shard (from the input or the previous phase) into the row."""

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        table, timings = self.job.load(_spec(row))
        return {"data": _to_ipc(table), "timings": json.dumps(timings)}


class _Apply(_ShardStep):
    """Task: run a group of stages without models on the shard."""

    def __init__(self, job: PhaseJob, stages: list[BoundStage]):
        super().__init__(job)
        self.stages = stages

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        timings = json.loads(row["timings"])
        table = self.job.apply(self.stages, _from_ipc(row["data"]), timings)
        return {"data": _to_ipc(table), "timings": json.dumps(timings)}


class _ApplyActor(_Apply):
    """Actor: like ``_Apply``, but each stage's ``setup()`` (loading a model) runs once, when the actor starts."""

    def __init__(self, job: PhaseJob, stages: list[BoundStage]):
        super().__init__(job, stages)
        job.setup(stages)


class _Phase(_ShardStep):
    """Task: the whole phase on one shard (read, every stage, write); the table stays in this process."""

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = _spec(row)
        table, timings = self.job.load(spec)
        table = self.job.apply(self.job.stages, table, timings)
        stats = _stamped(self.job).sink(spec, table, timings)
        return {"data": b"", "timings": json.dumps(stats)}


class _PhaseActor(_Phase):
    """Actor: like ``_Phase``; each stage's ``setup()`` (loading a model) runs once, when the actor starts."""

    def __init__(self, job: PhaseJob):
        super().__init__(job)
        job.setup(job.stages)


class _NodeStampedWriter:
    """The job's writer, adding to each shard's stats the Ray node that wrote it (``node``: id and IP)."""

    def __init__(self, writer: Any):
        self.writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["writer"], name)

    def write(self, shard_id: str, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
        import ray

        node = {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
        return self.writer.write(shard_id, table, {**stats, "node": node})


class _Sink(_ShardStep):
    """Task: write the shard; the row that comes back is small (its stats, no data)."""

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        stats = _stamped(self.job).sink(_spec(row), _from_ipc(row["data"]), json.loads(row["timings"]))
        return {"data": b"", "timings": json.dumps(stats)}


def _stamped(job: PhaseJob) -> PhaseJob:
    """The job with a writer that names this worker's node; made on the worker, by the task that writes."""
    return dataclasses.replace(job, writer=_NodeStampedWriter(job.writer))


@contextlib.contextmanager
def _stderr_kept_on_error() -> Iterator[None]:
    """Capture what is written to file descriptor 2 (C++ code too); replay it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_STORAGE_ENV = ("AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_", "AZURE_STORAGE_")


def storage_env() -> dict[str, str]:
    """The driver's object-storage settings (endpoint, region, credentials) that the workers need to read
    and write s3:// or gs:// paths as the driver does. Forwarded as the job's runtime environment, so they
    show in Ray's task specs (the dashboard): on a shared cluster prefer node-level credentials (an IAM
    role, the pod's environment) and ``CURATE_FORWARD_STORAGE_ENV=0``."""
    if os.environ.get("CURATE_FORWARD_STORAGE_ENV", "1") == "0":
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(_STORAGE_ENV)}


class RayExecutor:
    def __init__(self, config: ExecutorConfig):
        self.config = config
        self._started = False

    def check(self) -> None:
        """Fail fast on a cluster address nothing listens on: ray.init would wait for minutes."""
        address = self.config.address or os.environ.get("RAY_ADDRESS")
        if not address or address in ("auto", "local"):
            return
        hostport = address.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        where = "executor.address" if self.config.address else "RAY_ADDRESS"
        if not host or not port.isdigit():
            raise ConfigError([(where, f"{address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")])
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise ConfigError(
                [
                    (
                        where,
                        f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start "
                        "--head`, fix the address, or leave it out to start a local cluster",
                    )
                ]
            ) from None

    def __enter__(self) -> RayExecutor:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray's C++ side logs warnings that are not the user's business (e.g. ray#53727 for every actor
        # pool) straight to stderr; a user who sets the level keeps it.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        import ray

        if not ray.is_initialized():
            address = self.config.address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {
                "log_to_driver": False,
                "logging_level": logging.ERROR,
                "include_dashboard": self.config.dashboard,
            }
            if address is None:
                kwargs.update(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus)
            if storage_env():
                kwargs["runtime_env"] = {"env_vars": storage_env()}
            with _stderr_kept_on_error():  # ray.init announces the log level it read, on fd 2
                ray.init(address=address, **kwargs)
            self._started = True
        from ray.data import DataContext

        ctx = DataContext.get_current()
        # Restored on exit: a notebook or library caller keeps its own settings.
        self._saved = (
            ctx.enable_progress_bars,
            ctx.print_on_execution_start,
            ctx.execution_options.resource_limits,
        )
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        if self.config.object_store_memory:
            ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
                object_store_memory=self.config.object_store_memory
            )
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.resource_limits = (
            self._saved
        )
        if self._started:
            ray.shutdown()

    def run_phase(self, job: PhaseJob, specs: list[ShardSpec], on_result: OnResult) -> None:
        pending = list(specs)
        by_id = {s.id: s for s in specs}
        tries = 1 + self.config.max_shard_retries
        for attempt in range(1, tries + 1):
            if not pending:
                return
            failed: list[ShardResult] = []
            for result in self._run_once(job, pending):
                result.attempts = attempt
                if result.ok:
                    on_result(result)
                else:
                    failed.append(result)
            if attempt == tries:
                for result in failed:
                    on_result(result)
            pending = [by_id[r.shard] for r in failed]

    def _actor_sizing(self, bound: BoundStage, pools: int = 1) -> dict[str, Any]:
        """Actor pool size and per-actor resources on this cluster (``curate.executors.plan``)."""
        import ray

        total = ray.cluster_resources()
        return actor_sizing(bound.resources, total.get("CPU", 1), total.get("GPU", 0), pools, bound.name)

    def _run_once(self, job: PhaseJob, specs: list[ShardSpec]) -> Iterator[ShardResult]:
        items = [
            {"shard": json.dumps(s.to_dict()), "data": b"", "timings": "{}", "error": None} for s in specs
        ]
        if single_operator(job.stages):
            yield from self._run_whole(job, items)
        else:
            yield from self._run_split(job, items)

    def _run_whole(self, job: PhaseJob, items: list[dict[str, Any]]) -> Iterator[ShardResult]:
        """The phase as one operator, on Ray core: ``slots`` tasks (or actors, when a stage has a model) at a
        time, each reading, processing and writing a whole shard. Not Ray Data: its actor pools took about
        4 s more to start per run on a 2-CPU node (benchmarks/RESULTS.md), and nothing here needs its
        blocks, as only the shard's stats come back."""
        import ray

        total = ray.cluster_resources().get("CPU", 1)
        sizing = single_sizing(job.stages, total)
        slots = min(sizing["concurrency"], len(items))
        options: dict[str, Any] = {"num_cpus": sizing["num_cpus"], "scheduling_strategy": "SPREAD"}
        if storage_env():  # also reaches a cluster that was running before this driver
            options["runtime_env"] = {"env_vars": storage_env()}
        if sizing["actors"]:
            actor = ray.remote(_PhaseActor).options(**options)
            workers: list[Any] = [actor.remote(job) for _ in range(slots)]

            def submit(worker: Any, row: dict[str, Any]) -> Any:
                return worker.run.remote(row)
        else:
            task = ray.remote(_run_phase_task).options(**options)
            job_ref = ray.put(job)
            workers = list(range(slots))

            def submit(worker: Any, row: dict[str, Any]) -> Any:
                return task.remote(job_ref, row)

        todo, idle, running = list(reversed(items)), list(workers), {}
        try:
            while todo or running:
                while todo and idle:
                    worker, row = idle.pop(), todo.pop()
                    running[submit(worker, row)] = (worker, row)
                if not running:  # every actor died: the rest fail this round
                    row = todo.pop()
                    yield _result({**row, "error": "no Ray actor left to run the shard"})
                    continue
                [ref], _ = ray.wait(list(running), num_returns=1)
                worker, row = running.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayActorError:  # the worker died (memory, a crash): not reused
                    row = {**row, "error": traceback.format_exc()}
                except ray.exceptions.RayError:
                    row = {**row, "error": traceback.format_exc()}
                    idle.append(worker)
                else:
                    idle.append(worker)
                yield _result(row)
        finally:
            if sizing["actors"]:
                for worker in workers:
                    ray.kill(worker)

    def _run_split(self, job: PhaseJob, items: list[dict[str, Any]]) -> Iterator[ShardResult]:
        """Read, stage groups and write as Ray Data operators; the shard travels between them as IPC bytes."""
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        common: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": None, "zero_copy_batch": True}
        if storage_env():  # also reaches a cluster that was running before this driver
            common["runtime_env"] = {"env_vars": storage_env()}
        ds = ds.map_batches(_Load(job), num_cpus=1, **common)
        stage_groups = groups(job.stages)
        pools = actor_pools(stage_groups)
        for group in stage_groups:
            if group[0].resources.needs_actor:
                sizing = self._actor_sizing(group[0], pools)
                ds = ds.map_batches(_ApplyActor, fn_constructor_args=(job, group), **sizing, **common)
            else:
                ds = ds.map_batches(
                    _Apply(job, group), num_cpus=max(b.resources.cpus for b in group), **common
                )
        ds = ds.map_batches(_Sink(job), num_cpus=1, **common)
        yield from self._results(ds)

    @staticmethod
    def _results(ds: Any) -> Iterator[ShardResult]:
        for row in ds.iter_rows():
            yield _result(row)


def _result(row: dict[str, Any]) -> ShardResult:
    shard = json.loads(row["shard"])["id"]
    if row["error"] is not None:
        return ShardResult(shard, error=row["error"])
    return ShardResult(shard, stats=json.loads(row["timings"]))


def _run_phase_task(job: PhaseJob, row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the whole phase on one shard (no stage with a model, so nothing to keep set up)."""
    return _Phase(job).run(row)
