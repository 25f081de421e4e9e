"""The Slurm scripts of infra/slurm/ under a real Slurm, with Ray's token authentication, and ``curate run
--address`` against a cluster that wants a token.

A one-node Slurm is started for the module, as a site would run it, only smaller: Debian's slurm-wlm and munge
(installed with apt-get when missing), a munged with its own key and socket, slurmctld and slurmd on free ports
with a slurm.conf in a temporary folder (this machine's CPUs and memory, cons_tres, no cgroups), all stopped at
the end, also when a test fails. Both sbatch scripts are submitted unchanged, from the checkout's root, with
the venv as CURATE_VENV and small inputs, as a user would; the job's exit code is the one slurmctld records:

- ``ray-cluster.sbatch`` starts a token-protected Ray cluster and runs a download pipeline over a local HTTP
  server: the shards equal a local run's byte for byte, the token file was only its user's and is gone after
  the job, the token is in no output; a pipeline with an unknown stage ends the job with exit code 2; a
  cluster that does not form ends it with 1 and a message;
- ``train.sbatch`` runs ``curate train`` under torchrun, two processes with gloo on the CPU, on those shards,
  and ends with a checkpoint of both ranks.

Starting slurmd needs root: as another user the Slurm tests are skipped (there is no Slurm to test); as root
a Slurm that cannot be installed or started is a failure. The last test needs no Slurm: ``curate run
--address`` against a cluster that wants a token, without it, exits with 2 and one line that says what to set. The stand-in tests of tests/test_infra.py check what
one node cannot: the commands for several nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import shard_files, write_pipeline
from raycluster import Cluster, cluster_env, free_ports
from support.data import make_input, make_tiny_clip

from curate.core.config import load_config
from curate.core.runner import run_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY_SCRIPT = ROOT / "infra/slurm/ray-cluster.sbatch"
TRAIN_SCRIPT = ROOT / "infra/slurm/train.sbatch"
VENV = Path(sys.executable).parent.parent
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
JOB_TIMEOUT = 420  # a hung job fails the test; a busy machine makes a good one take minutes
_RAY_TEMP_DIRS: list[str] = []  # the jobs' Ray temp dirs, removed with the Slurm


def _install_slurm() -> None:
    """slurm-wlm and munge from the distribution, quietly, when a binary is missing."""
    if all(shutil.which(b) for b in SLURM_BINARIES):
        return
    if shutil.which("apt-get") is None:
        pytest.fail(f"no apt-get to install slurm-wlm and munge (missing: {', '.join(SLURM_BINARIES)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    assert not missing, f"installed slurm-wlm and munge, still missing {missing}"


class Slurm:
    """munged, slurmctld and slurmd for one node (this machine), configured and logging under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def _node(self) -> str:
        """This machine as slurmd sees it (``slurmd -C``): name, CPUs, sockets, cores, memory."""
        line = subprocess.run(
            ["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()[0]
        fields = dict(f.split("=", 1) for f in line.split())
        keep = ("NodeName", "CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        # RealMemory a little under what slurmd measures: a node that reports less than its config is drained.
        memory = int(fields["RealMemory"]) * 9 // 10
        return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + f" RealMemory={memory}"

    def write_conf(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        node = self._node()
        self.node_name = node.split()[0].split("=", 1)[1]
        r = self.root
        self.conf.write_text(
            f"""ClusterName=curatetest
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _daemon(self, name: str, *command: str) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as log:
            self.procs.append(
                subprocess.Popen(
                    command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not in {timeout}s"
                pytest.fail(f"Slurm did not start ({what}: {why}):\n{self.logs()}")
            time.sleep(0.2)

    def start(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        munge = self.munge_socket.parent
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon(
            "munged",
            "munged",
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
            f"--log-file={munge}/munged.log",
        )
        self._wait(self.munge_socket.exists, "munged")
        self.write_conf()
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._daemon("slurmd", "slurmd", "-D", "-f", str(self.conf))
        self._wait(lambda: self._node_state() == "idle", "the node to be idle")

    def _node_state(self) -> str:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip()

    def sbatch(
        self, script: Path, env: dict[str, str], output: Path, *options: str, watch=None
    ) -> tuple[int, str]:
        """Submit ``script`` from the checkout's root with exactly ``env``, and wait for the job, asking
        slurmctld every 0.2 s (``sbatch --wait`` polls at growing intervals and returned up to ~40 s after
        the job ended); ``watch()`` is called while it runs. Returns the job's exit code as slurmctld
        recorded it, and its output."""
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--output={output}", *options, str(script)],
            cwd=ROOT,
            env={**env, "SLURM_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        job_id = submitted.stdout.strip().split(";")[0]
        assert submitted.returncode == 0 and job_id.isdigit(), submitted.stdout + submitted.stderr
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            record = subprocess.run(
                ["scontrol", "show", "job", job_id], env=self.env, capture_output=True, text=True, timeout=30
            ).stdout
            state = re.search(r"\bJobState=(\w+)", record)
            assert state, record
            if state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{script.name} did not end in {JOB_TIMEOUT}s:\n{output.read_text()[-3000:]}")
            if watch is not None:
                watch()
            time.sleep(0.2)
        code = re.search(r"\bExitCode=(\d+):(\d+)", record)
        assert code, record
        text = output.read_text() if output.exists() else ""
        assert code.group(2) == "0", f"the job was killed by signal {code.group(2)}:\n{text[-3000:]}"
        return int(code.group(1)), text

    def stop(self) -> None:
        """Cancel what still runs (a test that failed midway), then stop the daemons."""
        if self.conf.exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", "--full", "--user=root"], env=self.env, timeout=30, check=False)
                deadline = time.monotonic() + 60
                while (
                    time.monotonic() < deadline
                    and subprocess.run(
                        ["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30
                    ).stdout.strip()
                ):
                    time.sleep(0.5)
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}"
            for p in sorted((self.root / "log").glob("*"))
            if p.is_file()
        )


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root (CI runs this module as root)")
    _install_slurm()
    # Short and private: munge's socket lives under it, and munge refuses keys in places others can write.
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    root.chmod(0o700)
    cluster = Slurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        for path in _RAY_TEMP_DIRS:
            shutil.rmtree(path, ignore_errors=True)


def _job_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What a user sets for the job: the venv on the shared file system, where the token goes, and ``ray
    start`` options that keep this Ray apart from any other on the machine (its own temp dir and ports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    ray_temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    _RAY_TEMP_DIRS.append(ray_temp)
    names = [
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    port, *ports = free_ports(len(names) + 1)
    start_args = [f"--temp-dir={ray_temp}", "--include-dashboard=false", f"--object-store-memory={200 << 20}"]
    start_args += [f"--{n}={p}" for n, p in zip(names, ports, strict=True)]
    env.update(
        CURATE_VENV=str(VENV),
        TOKEN_DIR=str(tmp / "tokens"),
        RAY_PORT=str(port),
        RAY_START_ARGS=" ".join(start_args),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_WAIT_S="120",
        RAY_TEMP_DIR=ray_temp,  # not read by the script; for the test
    )
    env.update(extra)
    return env


CPU_JOB = ("--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0")


@pytest.fixture(scope="module")
def curated(slurm, tmp_path_factory, world_server):
    """The sample world downloaded by a Ray cluster of ray-cluster.sbatch, and the same pipeline run locally."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("slurm-ray")
    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    stages = [
        {"stage": "basic_filter", "min_words": 2},
        {"stage": "download", "allow_private": [server.host_port], "image_size": 64, "backoff": 0.05},
    ]
    p = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "out",
        stages,
        shard_size=50,
        input={"url_col": "url", "caption_col": "caption"},
    )
    local = run_pipeline(load_config(p, [f"output.path={tmp / 'local'}"]), show_progress=False)
    assert local.exit_code == 0 and len(local.shards_done) == 4

    env = _job_env(tmp, PIPELINE=str(p), OUTPUT=str(tmp / "slurm"))
    tokens: dict[str, tuple[int, str]] = {}  # the token file while the job runs: its mode and content

    def watch() -> None:
        for f in (tmp / "tokens").glob("*") if (tmp / "tokens").is_dir() else []:
            with contextlib.suppress(OSError):
                if f.name not in tokens and (text := f.read_text()):
                    tokens[f.name] = (stat.S_IMODE(f.stat().st_mode), text)

    rc, output = slurm.sbatch(RAY_SCRIPT, env, tmp / "ray.out", *CPU_JOB, watch=watch)
    return {
        "tmp": tmp,
        "pipeline": p,
        "rc": rc,
        "output": output,
        "tokens": tokens,
        "ray_temp": env["RAY_TEMP_DIR"],
    }


def test_a_ray_cluster_job_runs_the_pipeline_with_a_token_and_writes_what_a_local_run_writes(curated):
    tmp, output = curated["tmp"], curated["output"]
    assert curated["rc"] == 0, output[-4000:]
    assert shard_files(tmp / "slurm") == shard_files(tmp / "local")
    assert len(shard_files(tmp / "slurm")) == 8
    stats = [json.loads(p.read_text()) for p in sorted((tmp / "slurm" / "shards").glob("*_stats.json"))]
    assert len(stats) == 4 and all(s["node"]["ip"] for s in stats)
    # The head advertised the address the job used, the one Ray picks (not what the host name resolves to).
    m = re.search(r"^ray head: \S+ \((\S+):(\d+)\)", output, re.M)
    assert m, output[:2000]
    assert f"--address='{m.group(1)}:{m.group(2)}'" in output  # Ray's own "to add another node" line
    assert {s["node"]["ip"] for s in stats} == {m.group(1)}
    # The token: a file in TOKEN_DIR, named in the output, only the user's, gone with the job.
    token_file = Path(re.search(r"^ray token: (\S+)", output, re.M).group(1))
    assert token_file.parent == tmp / "tokens"
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert not token_file.exists()


def test_the_token_was_private_to_the_user_and_is_in_no_output_or_log(curated, slurm):
    """The token file as the job had it: one, mode 0600, 256 random bits; the token itself appears nowhere
    the job wrote (its output, Ray's logs) nor in what Slurm keeps of the job (script, environment)."""
    ((name, (mode, token)),) = curated["tokens"].items()
    assert mode == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token), "256 random bits, as hex"
    assert name in curated["output"] and token not in curated["output"]
    kept = [p for p in Path(curated["ray_temp"]).rglob("*") if p.is_file() and not p.is_socket()]
    kept += [p for d in ("state", "spool") for p in (slurm.root / d).rglob("*") if p.is_file()]
    assert len(kept) > 10
    assert not [p for p in kept if token.encode() in p.read_bytes()]


def test_a_job_with_an_invalid_pipeline_ends_with_exit_code_2(slurm, curated):
    tmp = curated["tmp"]
    bad = yaml.safe_load(curated["pipeline"].read_text())
    bad["stages"].append({"stage": "no_such_stage"})
    (tmp / "bad.yaml").write_text(yaml.safe_dump(bad))
    env = _job_env(tmp, PIPELINE=str(tmp / "bad.yaml"), OUTPUT=str(tmp / "bad-out"))
    rc, output = slurm.sbatch(RAY_SCRIPT, env, tmp / "bad.out", *CPU_JOB)
    assert rc == 2, output[-4000:]
    assert "no_such_stage" in output and "Traceback" not in output
    assert "ray head:" not in output  # refused before any Ray process started on the allocation
    assert not (tmp / "bad-out" / "shards").exists()


def test_a_cluster_that_does_not_form_fails_the_job_with_a_message(slurm, tmp_path):
    """Nothing answers in the time given (RAY_WAIT_S=0: the head is still starting): the job gives up with the
    count it saw, stops the head's step (asked again if the first signal came while srun was launching it)
    and deletes the token. tests/test_infra.py has a head that exits."""
    pipeline = str(_small_pipeline(tmp_path))  # valid: the job validates it before starting Ray
    env = _job_env(tmp_path, PIPELINE=pipeline, OUTPUT=str(tmp_path / "out"), RAY_WAIT_S="0")
    rc, output = slurm.sbatch(RAY_SCRIPT, env, tmp_path / "no-wait.out", *CPU_JOB)
    assert rc == 1
    assert re.search(r"error: 0 of 1 Ray node\(s\) joined at \S+ in 0s \(waiting for the head\)", output), (
        output
    )
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "tokens").iterdir())


def test_a_train_job_runs_two_processes_with_torchrun_and_checkpoints(slurm, curated, tmp_path):
    assert curated["rc"] == 0
    clip = make_tiny_clip(tmp_path / "clip")
    config = {
        "output": str(tmp_path / "train"),
        "seed": 1,
        "data": {
            "shards": [str(curated["tmp"] / "slurm")],
            "resolution": 16,
            "shuffle_buffer": 16,
            "workers": 0,
        },
        "model": {
            "unet": {
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "attention_head_dim": 8,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "norm_num_groups": 8,
            },
            "text_encoder": {"kind": "open_clip", "model": f"local-dir:{clip}", "max_tokens": 16},
        },
        "optim": {"lr": 1e-3, "batch_size": 4, "warmup_steps": 1},
        "schedule": {"steps": 2, "log_every": 1, "threads": 1},
        "checkpoint": {"every": 2},
        "validation": {"every": None, "prompts": ["a red circle"]},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    (rdzv_port,) = free_ports(1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "CURATE_VENV": str(VENV),
        "TRAIN_CONFIG": str(tmp_path / "train.yaml"),
        "NPROC_PER_NODE": "2",
        "RDZV_PORT": str(rdzv_port),
    }
    rc, output = slurm.sbatch(TRAIN_SCRIPT, env, tmp_path / "train.out", *CPU_JOB)
    assert rc == 0, output[-4000:]
    state = json.loads((tmp_path / "train/checkpoints/step-00000002/state.json").read_text())
    assert state["world"] == 2
    assert state["consumed"] == {"0": {"0": 2}, "1": {"0": 2}}  # both ranks trained, on their own batches


# -- curate run --address against a cluster that wants a token (no Slurm needed) -------------------------


def _small_pipeline(tmp: Path) -> Path:
    make_input(tmp / "in.parquet", 20)
    return write_pipeline(
        tmp / "p.yaml", tmp / "in.parquet", tmp / "out", [{"stage": "basic_filter"}], shard_size=10
    )


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A Ray head started as the Slurm job starts it: ``ray start`` with RAY_AUTH_MODE=token and its token in
    a file of its own (RAY_AUTH_TOKEN_PATH). Its own, not the session's: this module then runs apart from the
    modules on the session's cluster under ``pytest -n``."""
    token = tmp_path_factory.mktemp("token-cluster") / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**cluster_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    with Cluster(env, worker_node=False, dashboard=False) as cluster:
        yield cluster.address, token


def test_curate_run_says_what_to_set_when_the_cluster_wants_a_token(
    token_cluster, tmp_path, cli, monkeypatch
):
    """Joined by address without the cluster's token, the cluster refuses curate; curate says so at once, in
    one line, with exit code 2, before any work. (With the token, the Slurm job above runs on such a cluster.)"""
    address, token = token_cluster
    other = tmp_path / "other-token"
    other.write_text(secrets.token_hex(32))
    p = _small_pipeline(tmp_path)

    def run_fails(expected: str) -> str:
        started = time.monotonic()
        r = cli("run", p, "--address", address, "-q")
        assert r.code == 2, r
        assert time.monotonic() - started < 20, "said at once, not after ray.init's retries"
        (line,) = r.err.strip().splitlines()
        assert line.startswith("error: ") and expected in line, line
        assert token.read_text() not in r.out + r.err
        assert not (tmp_path / "out" / "run.json").exists()
        return line

    # A shell without any Ray token: no RAY_AUTH_* and a home without ~/.ray.
    for key in [k for k in os.environ if k.startswith("RAY_AUTH")] + ["RAY_ADDRESS"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    line = run_fails(f"the Ray cluster at {address} requires its authentication token")
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH" in line
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # the token, but Ray sends it only in token mode
    run_fails("requires token authentication: set RAY_AUTH_MODE=token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))  # another cluster's token
    run_fails(f"refuses the token of RAY_AUTH_TOKEN_PATH={other}")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    run_fails(f"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'}: No such file or directory")
