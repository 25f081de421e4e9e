"""A private Ray cluster on this machine for tests that kill parts of it (test_multinode, test_chaos).

Each node is a ``ray start --block`` in its own process group, with the cluster's own temp dir and ports, so
it never meets the session's cluster (``ray_cluster``) or any other Ray on the machine; it is stopped by
killing its process groups, never with ``ray stop`` (which stops every Ray of the user). Ray binds a node to
the machine's IP even when told 127.0.0.1.
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

import pytest

__all__ = ["CURATE", "RAY", "Cluster", "cluster_env", "free_ports", "kill_tree", "ray_default_missing"]

RAY = str(Path(sys.executable).with_name("ray"))
# `curate` with the test-only stages (sleep) registered, as a job's entrypoint or a driver subprocess.
CURATE = [
    sys.executable,
    "-c",
    "from support.stages import register_test_stages; register_test_stages(); from curate.cli import main; main()",
]


_GIVEN: set[int] = set()  # ports free_ports handed out in this process


def free_ports(n: int) -> list[int]:
    """``n`` ports free now, none handed out before in this process: a cluster's nodes get theirs from several
    calls, and the kernel may offer a port again once its probe socket is closed (Ray then refuses to start:
    two of its components on one port)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)  # held open until all are chosen, so none is offered twice in this call
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _GIVEN:
                ports.append(port)
                _GIVEN.add(port)
    finally:
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
        for name, port in zip(names, free_ports(len(names)), strict=True)
        for arg in (f"--{name}", str(port))
    ]


def cluster_env() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS: not the session's ~/.ray token, not the dashboard's
    usage report; the cluster stands alone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def ray_default_missing() -> list[str]:
    """The packages of ray[default] (the dashboard, `ray job submit`) that are not installed."""
    import importlib.util

    return [m for m in ("aiohttp", "aiohttp_cors", "opencensus") if importlib.util.find_spec(m) is None]


class Cluster:
    """A head (``head_cpus`` CPUs; the dashboard for job submission unless ``dashboard=False``) and, with
    ``worker_node``, a second node (1 CPU, resource ``worker_node``)."""

    def __init__(
        self, env: dict[str, str], *, worker_node: bool = True, dashboard: bool = True, head_cpus: int = 1
    ):
        # Short: Ray's socket paths live under it and a Unix socket path has a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
        self.env = env
        self.with_worker_node = worker_node
        self.with_dashboard = dashboard
        self.head_cpus = head_cpus
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.address = ""  # the GCS address, HOST:PORT, for ray.init / executor.address
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        args = ["--port", str(self.gcs_port), "--ray-client-server-port", str(self.client_port)]
        if self.with_dashboard:
            args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)]
            args += ["--include-dashboard", "true"]
        else:
            args += ["--include-dashboard", "false"]
        self.head = self._start("head", self.head_cpus, "--head", *args)
        address_file = Path(self.temp_dir) / "ray_current_cluster"  # its own, not /tmp/ray's
        self._wait(
            lambda: address_file.exists() and (not self.with_dashboard or self._dashboard_up()), "the head"
        )
        self.address = address_file.read_text().strip()
        if self.with_worker_node:
            # Ray gives a joining node a fixed 30 s to register with the GCS; a loaded machine (the suite's
            # other worker busy beside it) can miss that, and the node exits. It is started again, twice at most.
            for attempt in range(3):
                self.worker = self._start(
                    "worker", 1, "--address", self.address, "--resources", json.dumps({"worker_node": 1})
                )
                deadline = time.monotonic() + 90
                while len(self.alive_nodes()) != 2 and self.worker.poll() is None:
                    if self.head.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.3)
                if self.worker.poll() is None or attempt == 2:
                    break
                self.procs.remove(self.worker)
            self._wait(lambda: len(self.alive_nodes()) == 2, "the worker node")

    def _start(self, name: str, cpus: int, *args: str) -> subprocess.Popen:
        command = [RAY, "start", "--block", "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1"]
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
        kill_tree(self.worker)

    def ray_processes(self) -> list:
        """The live processes of this cluster whose title Ray set (``ray::IDLE``, ``ray::<task>``, ...):
        its workers, as psutil.Process."""
        import psutil

        found = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                        cmdline = p.cmdline()
                        if cmdline and cmdline[0].startswith("ray::") and p.status() != psutil.STATUS_ZOMBIE:
                            found.append(p)
        return found

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp_dir).glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        """Started; stopped (every process killed) on leaving, also when starting failed midway."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_tree(proc: subprocess.Popen) -> None:
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
