"""A two-node Ray cluster on this machine (a head and a second node, each started with ``ray start``), a
``curate run`` submitted to it with ``ray job submit``: both nodes write shards and the output equals a local
run's, also when the second node is killed midway.

The cluster has its own temp dir and ports, so it never meets the session's cluster (``ray_cluster``) or any
other Ray on the machine; it is stopped by killing its process groups, never with ``ray stop`` (which stops
every Ray of the user). Ray binds a node to the machine's IP even when told 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import shard_files, write_pipeline

from curate.config import load_config
from curate.runner import run_pipeline

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# `curate` with the test-only stages (sleep) registered, as the job's entrypoint.
CURATE = [sys.executable, "-c", "import curate.testing; from curate.cli import main; main()"]
SHARDS = 10


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    """Ports a node would otherwise take from fixed defaults (and clash with another node on the machine)."""
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    return [
        arg
        for name, port in zip(names, _free_ports(len(names)), strict=True)
        for arg in (f"--{name}", str(port))
    ]


class Cluster:
    """A head (1 CPU, the dashboard for job submission) and a worker node (1 CPU, resource ``worker_node``),
    each a ``ray start --block`` in its own process group."""

    def __init__(self, env: dict[str, str]):
        # Short: Ray's socket paths live under it and a Unix socket path has a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
        self.env = env
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        self.head = self._start(
            "head",
            "--head",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(self.client_port),
            "--include-dashboard",
            "true",
        )
        address_file = Path(self.temp_dir) / "ray_current_cluster"  # its own, not /tmp/ray's
        self._wait(lambda: address_file.exists() and self._dashboard_up(), "the head")
        self.worker = self._start(
            "worker",
            "--address",
            address_file.read_text().strip(),
            "--resources",
            json.dumps({"worker_node": 1}),
        )
        self._wait(lambda: len(self.alive_nodes()) == 2, "the worker node")

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        command = [RAY, "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1"]
        command += ["--temp-dir", self.temp_dir, "--object-store-memory", str(80 << 20)]
        command += ["--disable-usage-stats", *args, *_node_ports()]
        with open(Path(self.temp_dir) / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def _wait(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"a ray node exited while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not come up in {timeout}s:\n{self.logs()}")
            time.sleep(0.3)

    def _dashboard_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).close()
        except OSError:
            return False
        return True

    def alive_nodes(self) -> list[dict]:
        nodes = self._get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """Node id -> 'head' or 'worker'."""
        return {n["node_id"]: "head" if n["is_head_node"] else "worker" for n in self.alive_nodes()}

    def job(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, "job", *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )

    def submit(self, *entrypoint: str) -> str:
        r = self.job("submit", "--address", self.dashboard, "--no-wait", "--", *entrypoint)
        assert r.returncode == 0, r.stdout + r.stderr
        return next(line.split("'")[1] for line in r.stdout.splitlines() if "submitted successfully" in line)

    def _get(self, path: str):
        with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=10) as r:
            return json.load(r)

    def wait_job(self, job_id: str, timeout: float = 150) -> tuple[str, str]:
        """Poll the job (as ``ray job status`` does, without a process a poll) until it ends; its final status
        and its logs."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._get(f"/api/jobs/{job_id}")["status"]
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state, self.job("logs", "--address", self.dashboard, job_id).stdout
            if time.monotonic() > deadline:
                self.job("stop", "--address", self.dashboard, job_id)
                logs = self.job("logs", "--address", self.dashboard, job_id).stdout
                pytest.fail(f"job {job_id} still {state} after {timeout}s:\n{logs[-3000:]}")
            time.sleep(1)

    def kill_worker(self) -> None:
        _kill_tree(self.worker)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp_dir).glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _kill_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its process group and every process under it (a job's driver runs in a session of
    its own, under the head's job agent)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    import importlib.util

    missing = [m for m in ("aiohttp", "aiohttp_cors", "opencensus") if importlib.util.find_spec(m) is None]
    if missing:  # a failure, not a skip: CI must run this test
        pytest.fail(f"the dashboard and `ray job submit` need ray[default] (missing: {', '.join(missing)})")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Not the session's ~/.ray token, not the dashboard's usage report: the cluster stands alone.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    c = Cluster(env)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, world_server):
    """The sample world downloaded in SHARDS shards of 20 rows; each shard sleeps, so a kill lands midway."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("multinode")
    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    stages = [
        {"stage": "basic_filter", "min_words": 2},
        {"stage": "download", "allow_private": [server.host_port], "image_size": 64, "backoff": 0.05},
        {"stage": "sleep", "seconds": 0.5},
    ]
    p = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "out",
        stages,
        shard_size=200 // SHARDS,
        input={"url_col": "url", "caption_col": "caption"},
    )
    local = run_pipeline(load_config(p, [f"output.path={tmp / 'local'}"]), show_progress=False)
    assert local.exit_code == 0 and len(local.shards_done) == SHARDS
    return tmp, p


def _submit_run(cluster: Cluster, p: Path, output: Path) -> str:
    # As README's "Running on a Ray cluster": the job's driver joins the cluster through RAY_ADDRESS, which
    # Ray sets for it.
    return cluster.submit(*CURATE, "run", str(p), "-q", "--executor", "ray", "--set", f"output.path={output}")


def _nodes_of_shards(output: Path) -> dict[str, str]:
    return {
        p.name.split("_")[0]: json.loads(p.read_text())["node"]["id"]
        for p in sorted((output / "shards").glob("*_stats.json"))
    }


def test_a_job_on_two_nodes_uses_both_and_writes_what_a_local_run_writes(cluster, pipeline, ray_cluster):
    tmp, p = pipeline
    assert "RAY_ADDRESS" not in os.environ
    nodes = cluster.node_ids()
    assert sorted(nodes.values()) == ["head", "worker"]

    state, logs = cluster.wait_job(_submit_run(cluster, p, tmp / "two"))
    assert state == "SUCCEEDED", logs[-3000:]

    made_by = _nodes_of_shards(tmp / "two")
    assert len(made_by) == SHARDS
    assert {nodes[n] for n in made_by.values()} == {"head", "worker"}, made_by
    assert shard_files(tmp / "two") == shard_files(tmp / "local")
    assert len(shard_files(tmp / "local")) == 2 * SHARDS
    assert not list((tmp / "two").rglob("*.tmp-*"))
    # The session's own cluster (in this process) is untouched by this one.
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1


def test_a_job_survives_losing_a_node_midway(cluster, pipeline, ray_cluster):
    tmp, p = pipeline
    nodes = cluster.node_ids()
    assert sorted(nodes.values()) == ["head", "worker"], "the worker node is gone before the test"
    out = tmp / "killed"
    job_id = _submit_run(cluster, p, out)

    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*_stats.json")):
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    cluster.kill_worker()
    done_at_kill = len(list((out / "shards").glob("*_stats.json")))

    state, logs = cluster.wait_job(job_id)
    assert state == "SUCCEEDED", logs[-3000:]
    assert done_at_kill < SHARDS, "the kill should land midway"
    made_by = _nodes_of_shards(out)
    assert len(made_by) == SHARDS
    head = next(n for n, role in nodes.items() if role == "head")
    assert sum(n == head for n in made_by.values()) >= SHARDS - done_at_kill  # the rest made on the head
    assert shard_files(out) == shard_files(tmp / "local")
    assert not list(out.rglob("*.tmp-*"))
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1
