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

``ray.init()`` with no address starts a local cluster (quietly, no dashboard unless asked; its workers import
curate as they start, so that a folder named ``curate`` in the working directory is never what they import:
``WORKER_PRELOAD``). It starts in a thread of its own (``_ClusterStart``): the plan is made from the node Ray
is asked to start, and while the cluster comes up the driver runs the first shards of a phase without a model
itself, with the local executor's code, until the phase's first Ray worker is ready (``_DriverLane``;
``executor.work_while_starting``);
``executor.address`` or ``RAY_ADDRESS`` joins an existing one, after a quick check that it answers and, when
it wants Ray's authentication token, that this process will send the right one (``check_token``: otherwise exit
2 saying what to set, rather than ray.init's retries). A cluster that is already initialised in this process
(a test session's, a notebook's) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.base import ClusterAccessError, ConfigError
from curate.core.config import ExecutorConfig
from curate.core.pipeline import BoundStage, PhaseJob, ShardResult
from curate.core.reader import ShardSpec
from curate.executors.base import OnResult, overlapping_head, shards_in_flight
from curate.executors.local import LocalExecutor
from curate.executors.plan import Cluster, Node, Plan, make_plan, plan_phase

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


class _OverlappingPhaseActor(_PhaseActor):
    """Actor of a phase whose head overlaps shards (:mod:`curate.executors.base`), run with
    ``max_concurrency`` = the head's ``shards_in_flight``: that many shards at once, each in a thread of its
    own. Their heads (load, downloads) run side by side and share the actor's one socket pool, the earlier
    shard's URLs first; the tail and the write take one shard at a time (a lock), so a model stage never runs
    on two shards at once."""

    def __init__(self, job: PhaseJob):
        super().__init__(job)
        self.head = overlapping_head(job.stages)
        self.tail = job.stages[len(self.head) :]
        self.one_at_a_time = threading.Lock()

    def step(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = _spec(row)
        table, timings = self.job.load(spec)
        table = self.job.apply(self.head, table, timings)
        with self.one_at_a_time:
            table = self.job.apply(self.tail, table, timings)
            stats = _stamped(self.job).sink(spec, table, timings)
        return {"data": b"", "timings": json.dumps(stats)}


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


class _Fd2Held:
    """What is written to file descriptor 2 (C++ code too) goes to a temporary file until ``end()``, replayed
    there when asked; Python's ``sys.stderr`` meanwhile writes to the real one, so the driver's own output
    (the progress of the shards it runs while the cluster starts) is not held back. Writes to descriptor 2
    that do not go through ``sys.stderr`` while it is held are dropped unless the start fails."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._capture = tempfile.TemporaryFile()  # noqa: SIM115 (closed in end())
        os.dup2(self._capture.fileno(), 2)
        self._python = sys.stderr
        # Stays open until close(): another thread may still hold it after end().
        self._real = open(os.dup(self._saved), "w", buffering=1, errors="replace")  # noqa: SIM115
        sys.stderr = self._real

    def end(self, replay: bool) -> None:
        with contextlib.suppress(Exception):
            self._real.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        sys.stderr = self._python
        if replay:
            self._capture.seek(0)
            sys.stderr.write(self._capture.read().decode(errors="replace"))
        self._capture.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._real.close()


@contextlib.contextmanager
def _stderr_kept_on_error() -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ code too) during the block; replay it if the block
    raises."""
    held = _Fd2Held()
    try:
        yield
    except BaseException:
        held.end(replay=True)
        raise
    else:
        held.end(replay=False)
    finally:
        held.close()


class _ClusterStart:
    """``ray.init`` of a local cluster in a thread of its own, so that the driver can work while Ray starts
    its processes (about 6 s on 2 cores: benchmarks/RESULTS.md). The thread lives until the cluster is
    shut down (``release``): Ray asks the kernel to end its processes when the thread that started them
    ends (PR_SET_PDEATHSIG is per thread)."""

    def __init__(self, kwargs: dict[str, Any]):
        self._done = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._fd2 = _Fd2Held()  # ray.init announces the log level it read, on fd 2
        self._thread = threading.Thread(
            target=self._start, args=(kwargs,), name="curate-ray-start", daemon=True
        )
        self._thread.start()

    def _start(self, kwargs: dict[str, Any]) -> None:
        import ray

        try:
            ray.init(**kwargs)
        except BaseException as e:  # raised in the driver's thread by wait()
            self._error = e
        finally:
            self._fd2.end(replay=self._error is not None)
            self._done.set()
        self._release.wait()

    def wait(self) -> None:
        """Until the cluster is up; ray.init's error, if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        """After ``ray.shutdown()`` (or a failed start): let the thread end."""
        self._release.set()
        self._thread.join(timeout=10)
        self._fd2.close()


def _resolved_local_node(kwargs: dict[str, Any]) -> Node | None:
    """The node that ``ray.init(**kwargs)`` will start, as Ray resolves it (CPUs, GPUs, the ``memory``
    resource), with ``kwargs`` made to ask for exactly that; None where Ray's resolver cannot be asked here
    (the start then happens before the plan, as for a cluster that curate joins)."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec(kwargs.get("num_cpus"), kwargs.get("num_gpus")).resolve(is_head=True)
        cpus, gpus, memory = int(spec.num_cpus), int(spec.num_gpus), int(spec.memory)
        store = int(spec.object_store_memory)
    except Exception:  # Ray moved it
        return None
    kwargs.update(num_cpus=cpus, num_gpus=gpus, _memory=memory, object_store_memory=store)
    return Node(float(cpus), float(gpus), memory, None)


class _Shards:
    """A phase's shards not yet taken, in order; taken one at a time by the Ray dispatcher and, while the
    cluster starts, by the driver's lane (:class:`_DriverLane`), from two threads."""

    def __init__(self, specs: list[ShardSpec]):
        self._left = deque(specs)
        self._lock = threading.Lock()
        self.rows = max((s.rows for s in specs), default=0)

    def __len__(self) -> int:
        return len(self._left)

    def take(self) -> ShardSpec | None:
        with self._lock:
            return self._left.popleft() if self._left else None

    def until(self, stop: threading.Event) -> Iterator[ShardSpec]:
        while not stop.is_set() and (spec := self.take()) is not None:
            yield spec


class _DriverLane:
    """The driver runs a phase's shards itself (as the local executor does: the same stages, the same
    lookahead, the same writer, so the same bytes) while the cluster it started comes up, taking shards from
    the front until told to stop: once the first Ray worker of the phase is ready. The shards it has begun
    it finishes; their stats name the driver as their node."""

    def __init__(self, config: ExecutorConfig, job: PhaseJob, shards: _Shards, on_result: OnResult):
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # A copy: the lane sets its stages up here (a download stage's socket pool and locks), and the job the
        # Ray workers are sent must stay as it was, picklable and not set up.
        job = copy.deepcopy(job)
        job = dataclasses.replace(job, writer=_DriverStampedWriter(job.writer))
        self._thread = threading.Thread(
            target=self._run, args=(config, job, shards, on_result), name="curate-driver-lane", daemon=True
        )
        self._thread.start()

    def _run(self, config: ExecutorConfig, job: PhaseJob, shards: _Shards, on_result: OnResult) -> None:
        try:
            LocalExecutor(config).run_from(job, shards.until(self._stop), shards.rows, on_result)
        except BaseException as e:  # raised in the driver's thread by join()
            self._error = e

    def stop(self) -> None:
        """Take no more shards; finish those begun."""
        self._stop.set()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _DriverStampedWriter(_NodeStampedWriter):
    """The job's writer in the driver's lane: the shard's stats name the driver (``node``: its IP, and
    ``driver: true``), which is on a node of the cluster it started."""

    def write(self, shard_id: str, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
        node = {"id": None, "ip": _this_ip(), "driver": True}
        return self.writer.write(shard_id, table, {**stats, "node": node})


def _this_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


def _locked(on_result: OnResult) -> OnResult:
    """``on_result`` called from one thread at a time (the lane's and the dispatcher's)."""
    lock = threading.Lock()

    def report(result: ShardResult) -> None:
        with lock:
            on_result(result)

    return report


# Storage credentials, and where the models are (a driver's CURATE_MODEL_DIR must reach workers of a
# cluster that was started before it was set).
_STORAGE_ENV = (
    "AWS_",
    "FSSPEC_",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GCS_",
    "AZURE_STORAGE_",
    "CURATE_MODEL_DIR",
    "CURATE_OFFLINE",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
)


def storage_env() -> dict[str, str]:
    """The driver's object-storage settings (endpoint, region, credentials) that the workers need to read
    and write s3:// or gs:// paths as the driver does. Forwarded as the job's runtime environment, so they
    show in Ray's task specs (the dashboard): on a shared cluster prefer node-level credentials (an IAM
    role, the pod's environment) and ``CURATE_FORWARD_STORAGE_ENV=0``."""
    if os.environ.get("CURATE_FORWARD_STORAGE_ENV", "1") == "0":
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(_STORAGE_ENV)}


# Ray's token authentication (https://docs.ray.io/en/latest/ray-security/token-auth.html): a cluster started
# with RAY_AUTH_MODE=token (or `ray start` finding a token) refuses every process that does not send its token.
# ray.init would retry such a connection for about 20 s and then say only "Failed to connect"; the check below
# asks the GCS once, without and with this process's token, and says what to set.
_WHAT_TO_SET = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the file that holds the cluster's token "
    "(or RAY_AUTH_TOKEN to the token)"
)


def _ray_token() -> tuple[str, str] | None:
    """The token Ray would send from this process, and where it comes from, in Ray's documented order:
    RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token. None when there is none. A
    RAY_AUTH_TOKEN_PATH that cannot be read is an error here (Ray aborts the process on it)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ClusterAccessError(
                f"RAY_AUTH_TOKEN_PATH={path}: {e.strerror or e}; {_WHAT_TO_SET}"
            ) from None
        if not token:
            raise ClusterAccessError(f"RAY_AUTH_TOKEN_PATH={path} is empty; {_WHAT_TO_SET}")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: no home directory
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None


def _gcs_accepts(address: str, token: str | None) -> bool | None:
    """Whether the GCS at HOST:PORT answers a request that carries ``token`` (None: no token): False when it
    refuses it as unauthenticated, None when it cannot tell (then ray.init says what is wrong)."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return None
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return False if e.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return True


def check_token(address: str) -> None:
    """Raise ClusterAccessError (exit 2, one line) when the cluster at HOST:PORT wants a token that this
    process will not send: none found, another cluster's, or RAY_AUTH_MODE not ``token`` (Ray sends the token
    only then). Returns at once for a cluster without authentication."""
    found = _ray_token()
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "token" and found is None:
        raise ClusterAccessError(
            f"RAY_AUTH_MODE=token, but no Ray authentication token is set: {_WHAT_TO_SET}"
        )
    if _gcs_accepts(address, None) is not False:
        return
    if found is None:
        raise ClusterAccessError(
            f"the Ray cluster at {address} requires its authentication token: {_WHAT_TO_SET}"
        )
    token, source = found
    if _gcs_accepts(address, token) is False:
        raise ClusterAccessError(
            f"the Ray cluster at {address} refuses the token of {source}: {_WHAT_TO_SET}"
        )
    if mode != "token":
        raise ClusterAccessError(
            f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
            f"(the token of {source} is this cluster's)"
        )


# What the workers of a local cluster that curate starts import as they start, before any task (Ray's
# `preload_python_modules`). Ray puts the driver's working directory (and its script's folder) first on a
# worker's sys.path when the worker takes its first task of the job; a folder named `curate` there (an output
# folder, a checkout) would then be the `curate` the worker imports: an empty one shadows an editable install,
# one with an __init__.py any install. Imported at the worker's start, `curate` is the installed package, and
# its modules come from it (its __path__, not sys.path). Only the package itself (a few ms): preloading the
# executor's modules too (pyarrow, the stages) made the first shard start later on 2 CPUs, every prestarted
# worker importing them at once (benchmarks/ray_startup.py). A cluster that curate joins keeps its settings.
WORKER_PRELOAD = ("curate",)


def _starts_a_cluster() -> bool:
    """Whether ray.init() without an address starts a local cluster, rather than joining the one that `ray
    start` left on this machine (its system config is that cluster's)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # Ray moved it: go without the preload
        return False


class RayExecutor:
    def __init__(self, config: ExecutorConfig):
        self.config = config
        self._started = False
        self._starting: _ClusterStart | None = None  # a local cluster starting in the background
        self._local_node: Node | None = None  # its node, known before it is up
        self.plan: Plan | None = None

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
        if "://" not in address:  # the GCS itself; a Ray Client server (ray://) speaks another protocol
            check_token(address)

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
            starts = False
            if address is None:
                kwargs.update(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus)
                starts = _starts_a_cluster()
                if starts:
                    kwargs["_system_config"] = {"preload_python_modules": list(WORKER_PRELOAD)}
            if storage_env():
                kwargs["runtime_env"] = {"env_vars": storage_env()}
            if starts and self.config.work_while_starting:
                self._local_node = _resolved_local_node(kwargs)
            if self._local_node is not None:
                self._starting = _ClusterStart({"address": None, **kwargs})
            else:
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
        if self._starting is not None:
            with contextlib.suppress(BaseException):  # a start that failed has already said why
                self._starting.wait()
        if self._started:
            ray.shutdown()
        if self._starting is not None:
            self._starting.release()

    def _connected(self) -> None:
        """Until the cluster this executor starts in the background is up (at once otherwise)."""
        if self._starting is not None:
            self._starting.wait()

    def _lane_for(self, job: PhaseJob, specs: list[ShardSpec]) -> bool:
        """Whether the driver runs shards of this phase itself while its workers start: only on a cluster
        that this executor started (so the driver's machine is its node), for a phase of one operator
        without a model (a model would be loaded twice, and the plan gives the driver none)."""
        if self._starting is None or len(specs) < 2:
            return False
        op = self._phase_plan(job).operators
        return len(op) == 1 and op[0].kind == "tasks"

    def run_phase(self, job: PhaseJob, specs: list[ShardSpec], on_result: OnResult) -> None:
        """Every shard of ``specs`` through the phase on the cluster, failed ones again in a new round, up to
        ``max_shard_retries``. On a cluster that this executor starts, the driver runs the first shards
        itself (:class:`_DriverLane`, with its own retries) until the phase's first Ray worker is ready."""
        shards, lane = _Shards(specs), None
        if self._lane_for(job, specs):
            on_result = _locked(on_result)
            lane = _DriverLane(self.config, job, shards, on_result)
        try:
            self._connected()
            self._rounds(job, shards, lane, on_result, {s.id: s for s in specs})
        except BaseException:  # Ctrl-C, a cluster that failed to start: the lane's shards are not waited for
            if lane is not None:
                lane.stop()
            raise
        if lane is not None:
            lane.stop()
            lane.join()  # the shards it took are reported (and retried) by it

    def _rounds(
        self,
        job: PhaseJob,
        shards: _Shards,
        lane: _DriverLane | None,
        on_result: OnResult,
        by_id: dict[str, ShardSpec],
    ) -> None:
        """Round 1 on ``shards`` (beside the driver's ``lane``, if any), then the shards that failed on Ray
        again, each in a round of its own."""
        tries = 1 + self.config.max_shard_retries
        for attempt in range(1, tries + 1):
            if not shards:
                return
            failed: list[ShardResult] = []
            for result in self._run_once(job, shards, lane if attempt == 1 else None):
                result.attempts = attempt
                if result.ok:
                    on_result(result)
                else:
                    failed.append(result)
            if attempt == tries:
                for result in failed:
                    on_result(result)
            shards = _Shards([by_id[r.shard] for r in failed])

    def prepare(self, phases: list[list[Any]]) -> Plan:
        """The plan on the Ray cluster as it is now: its nodes' CPUs, GPUs and memory (Ray's ``memory``
        resource: what tasks and actors may hold), and the GPUs' memory, asked of one GPU. A local cluster
        that is still starting is planned from the node Ray was asked to start (without GPUs: else the plan
        waits for the cluster, to ask a GPU its memory)."""
        if self._local_node is not None and self._local_node.gpus == 0:
            cluster = Cluster((self._local_node,), "the Ray cluster")
        else:
            self._connected()
            cluster = ray_cluster()
        self.plan = make_plan(phases, cluster)
        return self.plan

    def fit(self, bound: BoundStage, shards: Any) -> None:
        """A fit that uses GPUs runs as a Ray task holding them, where the cluster has GPUs (the driver's
        machine may have none); any other fit runs here, in the driver."""
        self._connected()
        options = fit_options(bound, self.plan.cluster if self.plan else ray_cluster())
        if options is None:
            bound.stage.fit(shards)
        else:
            self.fit_remote(bound, shards, options)

    @staticmethod
    def fit_remote(bound: BoundStage, shards: Any, options: dict[str, Any]) -> None:
        """``bound.stage.fit(shards)`` as a Ray task with ``options``; it reads and writes the run's output
        folder, which every node sees (a shared file system or object storage, as for every multi-node run)."""
        import ray

        options = {**options, "max_retries": 0}
        if storage_env():
            options["runtime_env"] = {"env_vars": storage_env()}
        ray.get(ray.remote(_fit_task).options(**options).remote(bound.stage, shards))

    def _run_once(self, job: PhaseJob, shards: _Shards, lane: _DriverLane | None) -> Iterator[ShardResult]:
        phase = self._phase_plan(job)
        if phase.single:
            yield from self._run_whole(job, shards, phase.operators[0], lane)
        else:
            yield from self._run_split(job, [_item(s) for s in iter(shards.take, None)], phase.operators)

    def _phase_plan(self, job: PhaseJob) -> Any:
        if self.plan is not None:
            return self.plan.phases[job.index]
        return plan_phase(job.stages, ray_cluster(), job.index)  # run_phase without prepare()

    def _run_whole(
        self, job: PhaseJob, shards: _Shards, op: Any, lane: _DriverLane | None = None
    ) -> Iterator[ShardResult]:
        """The phase as one operator, on Ray core: ``slots`` tasks (or actors, when a stage has a model) at a
        time, each reading, processing and writing a whole shard. Not Ray Data: its actor pools took about
        4 s more to start per run on a 2-CPU node (benchmarks/RESULTS.md), and nothing here needs its
        blocks, as only the shard's stats come back.

        A phase whose head overlaps shards (the download stage) runs as threaded actors instead of tasks,
        each given ``shards_in_flight`` shards at a time (the download stage's setting): the next shards'
        downloads take the sockets the current shard's slowest URLs leave idle, and an actor keeps its
        sockets, robots.txt and DNS caches from shard to shard.

        With the driver's ``lane`` running, shards are taken only once a worker is ready (or the lane has
        taken them all), and the lane then stops taking them."""
        import ray

        slots = min(op.concurrency, len(shards))
        if slots == 0:  # the driver's lane took them all
            return
        options: dict[str, Any] = {**op.ray_options(), "scheduling_strategy": "SPREAD"}
        if storage_env():  # also reaches a cluster that was running before this driver
            options["runtime_env"] = {"env_vars": storage_env()}
        depth = shards_in_flight(overlapping_head(job.stages), shards.rows)
        overlapping = depth > 1 and len(shards) > 1
        actors = op.kind == "actors" or overlapping
        if overlapping:
            actor = ray.remote(_OverlappingPhaseActor).options(**options, max_concurrency=depth)
            workers: list[Any] = [actor.remote(job) for _ in range(slots)]

            def submit(worker: Any, row: dict[str, Any]) -> Any:
                return worker.run.remote(row)
        elif actors:
            actor = ray.remote(_PhaseActor).options(**options)
            workers = [actor.remote(job) for _ in range(slots)]

            def submit(worker: Any, row: dict[str, Any]) -> Any:
                return worker.run.remote(row)
        else:
            task = ray.remote(_run_phase_task).options(**options)
            job_ref = ray.put(job)
            workers = list(range(slots))

            def submit(worker: Any, row: dict[str, Any]) -> Any:
                return task.remote(job_ref, row)

        # Each worker once, then (overlapping) each again, up to its depth: the first shards spread over them.
        idle = [w for _ in range(depth if overlapping else 1) for w in reversed(workers)]
        running: dict[Any, tuple[Any, dict[str, Any]]] = {}
        try:
            if lane is not None:
                _first_ready(workers if actors else [], shards, lane)
            while True:
                while idle and (spec := shards.take()) is not None:
                    worker, row = idle.pop(), _item(spec)
                    running[submit(worker, row)] = (worker, row)
                if not running:  # done, or every actor died: the rest fail this round
                    if (spec := shards.take()) is None:
                        return
                    yield _result({**_item(spec), "error": "no Ray actor left to run the shard"})
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
            if actors:
                _release(workers)

    def _run_split(self, job: PhaseJob, items: list[dict[str, Any]], ops: list[Any]) -> Iterator[ShardResult]:
        """Read, stage groups and write as Ray Data operators; the shard travels between them as IPC bytes."""
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        common: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": None, "zero_copy_batch": True}
        if storage_env():  # also reaches a cluster that was running before this driver
            common["runtime_env"] = {"env_vars": storage_env()}
        ds = ds.map_batches(_Load(job), num_cpus=1, **common)
        by_name = {b.name: b for b in job.stages}
        for op in ops[1:-1]:  # between the read and the write
            group = [by_name[name] for name in op.stages]
            if op.kind == "actors":
                ds = ds.map_batches(
                    _ApplyActor,
                    fn_constructor_args=(job, group),
                    concurrency=op.concurrency,
                    **op.ray_options(),
                    **common,
                )
            else:
                ds = ds.map_batches(_Apply(job, group), **op.ray_options(), **common)
        ds = ds.map_batches(_Sink(job), num_cpus=1, **common)
        yield from self._results(ds)

    @staticmethod
    def _results(ds: Any) -> Iterator[ShardResult]:
        for row in ds.iter_rows():
            yield _result(row)


def _release(workers: list[Any], timeout: float = 60.0) -> None:
    """End a phase's actors and wait until they are gone, so the next phase's actors get their CPUs and
    memory. Each exits on its own between tasks (``__ray_terminate__``); one that does not in ``timeout``
    seconds (stuck in a stage) is killed."""
    import ray

    ending = [w.__ray_terminate__.remote() for w in workers]
    with contextlib.suppress(Exception):  # an actor that already died answers with an error: it is gone
        ray.wait(ending, num_returns=len(ending), timeout=timeout)
    for worker in workers:
        with contextlib.suppress(Exception):
            ray.kill(worker)


def fit_options(bound: BoundStage, cluster: Cluster) -> dict[str, Any] | None:
    """Ray options for a global stage's fit that uses GPUs on a cluster that has them; None: in the driver."""
    gpus = bound.stage.fit_gpus() if hasattr(bound.stage, "fit_gpus") else 0.0
    if gpus <= 0 or cluster.gpus <= 0:
        return None
    return {"num_gpus": min(gpus, max(n.gpus for n in cluster.nodes)), "num_cpus": 1}


def _fit_task(stage: Any, shards: Any) -> None:
    stage.fit(shards)


def ray_cluster() -> Cluster:
    """The Ray cluster this process is connected to, node by node. The GPUs' memory is asked of one GPU
    by a small task (Ray does not report it); where that fails it stays unknown, and the plan says so."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive", n.get("alive", False)):
            continue
        r = n.get("Resources", {})
        if r.get("CPU", 0) <= 0 and r.get("GPU", 0) <= 0:
            continue
        nodes.append(Node(r.get("CPU", 0.0), r.get("GPU", 0.0), int(r.get("memory", 0)) or None, None))
    if not nodes:
        total = ray.cluster_resources()
        nodes = [Node(total.get("CPU", 1.0), total.get("GPU", 0.0), int(total.get("memory", 0)) or None)]
    if any(n.gpus > 0 for n in nodes):
        gpu_memory = _gpu_memory()
        nodes = [dataclasses.replace(n, gpu_memory=gpu_memory if n.gpus > 0 else None) for n in nodes]
    return Cluster(tuple(nodes), "the Ray cluster")


def _gpu_memory() -> int | None:
    import ray

    def total_memory() -> int:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)

    try:
        ref = ray.remote(num_gpus=1, num_cpus=0)(total_memory).remote()
        return ray.get(ref, timeout=120)
    except Exception:  # no torch there, or no GPU free for a minute: the plan goes without it
        return None


def _item(spec: ShardSpec) -> dict[str, Any]:
    """The row of a shard that has not run yet."""
    return {"shard": json.dumps(spec.to_dict()), "data": b"", "timings": "{}", "error": None}


def _first_ready(actors: list[Any], shards: _Shards, lane: _DriverLane) -> None:
    """Wait until one of the phase's ``actors`` is ready (its process started, the job set up) while the
    driver's ``lane`` runs shards, then stop the lane. Also returns once the lane has taken every shard (the
    actors then get none); tasks (no actors) need no wait."""
    import ray

    ready = [a.__ray_ready__.remote() for a in actors]
    try:
        while ready and len(shards):
            done, ready = ray.wait(ready, num_returns=1, timeout=0.2)
            if done:
                return
    finally:
        lane.stop()


def _result(row: dict[str, Any]) -> ShardResult:
    shard = json.loads(row["shard"])["id"]
    if row["error"] is not None:
        return ShardResult(shard, error=row["error"])
    return ShardResult(shard, stats=json.loads(row["timings"]))


def _run_phase_task(job: PhaseJob, row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the whole phase on one shard (no stage with a model, so nothing to keep set up)."""
    return _Phase(job).run(row)
