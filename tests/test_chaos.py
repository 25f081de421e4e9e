"""Crash consistency under the Ray executor: SIGKILL a worker process, or the driver, at seeded random points
of a multi-shard run on a private Ray cluster, rerun to completion where needed, and check that the output is
exactly a clean run's: every input row once, no uid twice, shards byte-identical, no temporary file left,
stats that add up, the run recorded as finished.

The driver is ``curate run`` in a subprocess joining the cluster (``--address``); the kills never touch the
session's cluster (``ray_cluster``). A worker is frozen (SIGSTOP) before it is killed, so a kill is counted
only when the frozen process was still running a shard (its Ray title ``ray::_run_phase_task``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import shard_files, sidecars, write_pipeline
from raycluster import CURATE, Cluster, cluster_env
from support.data import make_input

from curate.core.config import load_config
from curate.core.output import collect_output
from curate.core.runner import run_pipeline

pytestmark = pytest.mark.slow

# `make test` runs one seed of each kind of kill; `make chaos` (CURATE_CHAOS_ALL=1) runs every seed below.
EVERY_SEED = os.environ.get("CURATE_CHAOS_ALL") == "1"


def seeds(first, *more):
    """The parameters of a kill test: the first always, the others with CURATE_CHAOS_ALL=1."""
    return [first, *more] if EVERY_SEED else [first]


ROWS, SHARD_SIZE = 200, 20
SHARDS = ROWS // SHARD_SIZE
TASK = "ray::_run_phase_task"  # the title Ray gives a worker while it runs a shard (curate.executors.ray)
STAGES = [
    {"stage": "synthetic_image", "size": 16},
    {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
    {"stage": "sleep", "seconds": 0.4},  # a window to kill in: ~0.5 s a shard, two at a time
]


@pytest.fixture(scope="module")
def cluster():
    """One node, 2 CPUs, no dashboard: its own temp dir, ports and process groups."""
    with Cluster(cluster_env(), worker_node=False, dashboard=False, head_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 10-shard pipeline whose rows end ok and kept, ok and dropped (caption, width), or not ok (a null or
    ftp URL, a repeated row); and a clean run of it (local executor: Ray's bytes are the same)."""
    tmp = tmp_path_factory.mktemp("chaos")
    make_input(tmp / "in.parquet", ROWS, bad_every=7)
    p = write_pipeline(tmp / "p.yaml", tmp / "in.parquet", tmp / "out", STAGES, shard_size=SHARD_SIZE)
    clean = run_pipeline(load_config(p, [f"output.path={tmp / 'clean'}"]), show_progress=False)
    assert clean.exit_code == 0 and len(clean.shards_done) == SHARDS
    c = clean.counts
    assert c["ok"] < ROWS and c["kept"] < c["ok"], "the pipeline must fail and drop rows"
    return p, tmp / "clean"


class Driver:
    """``curate run`` against the cluster, in a subprocess; its output goes to a log file."""

    def __init__(self, cluster: Cluster, pipeline: Path, out: Path):
        self.out = out
        self.log = out.with_name(f"{out.name}-driver.log")
        command = [*CURATE, "run", str(pipeline), "-q", "--executor", "ray", "--address", cluster.address]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [*command, "--set", f"output.path={out}"],
                env=cluster.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"curate run did not end in {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
def drivers():
    """Start drivers through this; any still running at the end of the test is killed."""
    started: list[Driver] = []

    def start(cluster: Cluster, pipeline: Path, out: Path) -> Driver:
        started.append(Driver(cluster, pipeline, out))
        return started[-1]

    yield start
    for d in started:
        if d.running():
            d.kill()


def _title(p: psutil.Process) -> str:
    try:
        cmdline = p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""
    return cmdline[0] if cmdline else ""


def _tasks(cluster: Cluster) -> list[psutil.Process]:
    """The cluster's workers that are running a shard now."""
    return sorted((p for p in cluster.ray_processes() if _title(p) == TASK), key=lambda p: p.pid)


def _finished(out: Path) -> set[str]:
    return (
        {p.name.split("_")[0] for p in (out / "shards").glob("*_stats.json")}
        if (out / "shards").exists()
        else set()
    )


def _wait_for(what: str, ready, driver: Driver, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not driver.running():
            pytest.fail(f"curate run ended (rc {driver.proc.returncode}) before {what}:\n{driver.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {timeout}s:\n{driver.tail()}")
        time.sleep(0.01)


def _freeze_a_task(cluster: Cluster, rng: random.Random) -> psutil.Process | None:
    """SIGSTOP a worker that runs a shard and return it, still frozen; None when there is none, or it
    finished its shard before it froze."""
    tasks = _tasks(cluster)
    if not tasks:
        return None
    p = rng.choice(tasks)
    try:
        p.suspend()
    except psutil.NoSuchProcess:
        return None
    if _title(p) == TASK:
        return p
    p.resume()
    return None


def _kill(p: psutil.Process) -> None:
    p.kill()
    p.wait(timeout=10)  # the raylet reaps it


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(cluster: Cluster, workers: list[psutil.Process], timeout: float = 30) -> float:
    """Wait until none of ``workers`` lives and no worker of the cluster runs a shard; how long it took."""
    start = time.monotonic()
    while any(_alive(p) for p in workers) or _tasks(cluster):
        assert time.monotonic() - start < timeout, "workers of a killed driver still run shards"
        time.sleep(0.05)
    return time.monotonic() - start


def _rerun_to_completion(cluster: Cluster, pipeline: Path, out: Path, start, tries: int = 2) -> int:
    """``curate run`` again until it exits 0; how many reruns it took."""
    for n in range(1, tries + 1):
        d = start(cluster, pipeline, out)
        if d.wait() == 0:
            return n
    pytest.fail(f"curate run still fails after {tries} reruns:\n{d.tail()}")


def _tar_uids(path: Path) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
        return [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]


def check_output(out: Path, clean: Path, cli) -> None:
    """The output of a run that was killed and rerun is the clean run's, and is complete."""
    side, clean_side = sidecars(out), sidecars(clean)
    assert sorted(side["input_index"].to_pylist()) == list(range(ROWS)), "an input row lost or twice"
    assert sorted(side["uid"].to_pylist()) == sorted(clean_side["uid"].to_pylist())
    # A repeated input row keeps its original's uid (status duplicate_row); every other uid is there once.
    first = [
        u
        for u, s in zip(side["uid"].to_pylist(), side["status"].to_pylist(), strict=True)
        if s != "duplicate_row"
    ]
    assert len(first) == len(set(first)) == ROWS - side["status"].to_pylist().count("duplicate_row") > 0, (
        "a uid twice"
    )

    assert shard_files(out) == shard_files(clean)
    assert len(shard_files(out)) == 2 * SHARDS
    dropped = {p.name: p.read_bytes() for p in sorted((out / "dropped").iterdir())}
    assert dropped == {p.name: p.read_bytes() for p in sorted((clean / "dropped").iterdir())}
    samples = [u for t in sorted((out / "shards").glob("*.tar")) for u in _tar_uids(t)]
    assert len(samples) == len(set(samples)), "a sample in two shards"

    leftovers = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if "tmp" in n]
    assert not leftovers, f"temporary files left: {leftovers}"
    assert not list((out / "shards").glob("*_failed.json"))
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (clean / "shards").iterdir()
    )

    counts = collect_output(str(out)).counts
    assert counts == collect_output(str(clean)).counts
    assert counts["rows"] == sum(counts["status"].values()) == ROWS  # ok + failures = input rows
    assert counts["ok"] - sum(counts["drop_reason"].values()) == counts["kept"] == len(samples)
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
    assert sum(s["rows"] for s in stats) == ROWS and sum(s["written"]["samples"] for s in stats) == len(
        samples
    )

    r = cli("status", out, "--json")
    assert r.code in (0, None), r
    status = json.loads(r.out)
    assert status["status"] == "finished", status
    assert status["shards"] == {"total": SHARDS, "done": SHARDS, "failed": 0, "pending": 0}
    assert status["counts"] == counts
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["counts"] == counts and run["shards_done"] == SHARDS


@pytest.mark.parametrize("seed", seeds(1, 2, 3))
def test_workers_killed_at_random_points(cluster, pipeline, tmp_path, drivers, cli, seed):
    """Two workers SIGKILLed while they run a shard: Ray retries the shard (or a rerun would)."""
    p, clean = pipeline
    rng = random.Random(seed)
    out = tmp_path / "out"
    # Kill points by progress, not by the clock (a fast machine finishes before a fixed time): once k shards
    # are finished, a random fraction of a shard's time later.
    plan = sorted((rng.randint(0, SHARDS - 4), rng.uniform(0.0, 0.4)) for _ in range(2))
    d = drivers(cluster, p, out)
    _wait_for("shard started", lambda: _tasks(cluster), d)
    t0 = time.monotonic()
    landed = []
    for k, delay in plan:
        _wait_for(f"{k} shards finished", lambda k=k: len(_finished(out)) >= k, d)
        time.sleep(delay)
        victim = None
        while victim is None and d.running():
            victim = _freeze_a_task(cluster, rng)
            if victim is None:
                time.sleep(0.01)
        if victim is not None:
            done = len(_finished(out))
            _kill(victim)
            landed.append({"at": round(time.monotonic() - t0, 2), "pid": victim.pid, "shards_done": done})
    rc = d.wait()
    reruns = 0 if rc == 0 else _rerun_to_completion(cluster, p, out, drivers)
    what = (
        f"seed {seed}: kills planned after {[(k, round(t, 2)) for k, t in plan]} (shards finished, s), "
        f"landed {landed}; exit {rc}, reruns {reruns}"
    )
    assert landed, f"no kill hit a worker running a shard ({what})"
    assert all(k["shards_done"] < SHARDS for k in landed), what
    # Ray saw a task's worker die (the raylet tells the driver, which logs it).
    assert "worker died" in d.log.read_text().lower(), what
    check_output(out, clean, cli)
    print(what)  # after check_output: its `curate status` call reads what was printed before


def _partial(out: Path) -> dict[str, list[str]]:
    """The shards with files (final or temporary) but no ``_stats.json``: being written now."""
    names = [f"{folder}/{n}" for folder in ("shards", "dropped") for n in _listdir(out / folder)]
    finished = {n.split("/")[1].split("_")[0] for n in names if n.endswith("_stats.json")}
    found: dict[str, list[str]] = {}
    for name in names:
        shard = name.split("/")[1].split(".")[0].split("_")[0]
        if shard not in finished:
            found.setdefault(shard, []).append(name)
    return found


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _freeze_tasks(workers: list[psutil.Process]) -> list[psutil.Process]:
    """SIGSTOP ``workers`` at once (a few microseconds: no process listing in between); the ones that were
    running a shard stay frozen and are returned, the others go on."""
    stopped = []
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()
            stopped.append(p)
    frozen = [p for p in stopped if _title(p) == TASK]
    for p in stopped:
        if p not in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
    return frozen


@pytest.mark.parametrize("seed", [7])
def test_a_worker_killed_while_it_writes_a_shard(cluster, pipeline, tmp_path, drivers, cli, seed):
    """The kill lands between a shard's first file and its ``_stats.json``: a half-written shard (and maybe a
    temporary file) that must not count as finished, and is redone. The window is milliseconds: a run that
    ends without a kill in it is tried again (three runs at most)."""
    p, clean = pipeline
    rng = random.Random(seed)
    for attempt in range(1, 4):
        out = tmp_path / f"out{attempt}"
        after = rng.randint(0, SHARDS // 2)  # how many shards finish first
        d = drivers(cluster, p, out)
        _wait_for(f"{after} shards finished", lambda out=out, after=after: len(_finished(out)) >= after, d)
        landed, tries, workers, listed = None, 0, [], 0.0
        while landed is None and d.running():
            if time.monotonic() - listed > 0.2:  # listing the cluster's processes is slow: not in the window
                workers = [w for w in cluster.ray_processes() if "Agent" not in _title(w)]
                listed = time.monotonic()
            partial = _partial(out)  # polled without a pause
            if not partial:
                continue
            tries += 1
            frozen = _freeze_tasks(workers)
            time.sleep(
                0.05
            )  # a writer that is not frozen (a worker started since the listing) ends its shard
            still = {k: v for k, v in _partial(out).items() if k in partial}
            if frozen and still:  # so a frozen worker was writing it
                for v in frozen:
                    _kill(v)
                landed = {"files": still, "workers": len(frozen)}
            else:
                for v in frozen:
                    v.resume()
        rc = d.wait()
        if landed:
            break
    reruns = 0 if rc == 0 else _rerun_to_completion(cluster, p, out, drivers)
    what = (
        f"seed {seed}: run {attempt}, after {after} shards, {tries} tries, killed mid-write: {landed}; "
        f"exit {rc}, reruns {reruns}"
    )
    assert landed, f"no kill landed while a shard was being written ({what})"
    check_output(out, clean, cli)
    print(what)


@pytest.mark.parametrize(
    ("seed", "when"), [(4, "starting"), (5, "before any shard finished"), (6, "after some shards finished")]
)
def test_driver_killed_at_a_random_point_then_rerun(cluster, pipeline, tmp_path, drivers, cli, seed, when):
    """SIGKILL ``curate run`` itself; Ray ends its job's workers, and a rerun resumes to the clean output,
    keeping the shards that were finished."""
    p, clean = pipeline
    rng = random.Random(seed)
    out = tmp_path / "out"
    d = drivers(cluster, p, out)
    if when == "starting":  # importing, joining the cluster, planning, writing run.json
        time.sleep(rng.uniform(0.2, 2.0))
    elif when == "before any shard finished":
        _wait_for("shard started", lambda: _tasks(cluster), d)
        time.sleep(rng.uniform(0.0, 0.2))
    else:
        k = rng.randint(1, SHARDS - 4)
        _wait_for(f"{k} shards finished", lambda: len(_finished(out)) >= k, d)
        time.sleep(rng.uniform(0.0, 0.3))
    assert d.running(), f"the run ended before the kill:\n{d.tail()}"
    running = _tasks(cluster)
    done_at_kill = len(_finished(out))
    d.kill()
    settle = _gone(cluster, running)  # nothing of the dead run writes after this
    kept = (
        {f.name: f.stat().st_mtime_ns for f in (out / "shards").glob("*_stats.json")}
        if (out / "shards").exists()
        else {}
    )
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None
    assert run is None or run["status"] == "running"
    if run is not None:  # run.json was never finished, but `curate status` tells the run is not going on
        r = cli("status", out, "--json")
        assert r.code == 0 and json.loads(r.out)["status"] == "interrupted", r
    what = (
        f"seed {seed}: driver killed {when}: {done_at_kill} shards done, {len(running)} running, "
        f"run.json {'absent' if run is None else run['status']}; its workers gone after {settle:.2f} s, "
        f"{len(kept)} shards finished by then"
    )

    if when != "starting":
        assert running, f"no shard was running when the driver was killed ({what})"
    if when == "before any shard finished":
        assert done_at_kill == 0, what
    if when == "after some shards finished":
        assert 0 < done_at_kill < SHARDS, what
    assert _rerun_to_completion(cluster, p, out, drivers) == 1, what
    for name, mtime in kept.items():  # finished shards are skipped, not redone
        assert (out / "shards" / name).stat().st_mtime_ns == mtime, what
    check_output(out, clean, cli)
    print(what)


def test_a_driver_killed_while_writing_its_first_run_json_leaves_a_rerunnable_output(pipeline, tmp_path, cli):
    """Killed inside the first ``write_json_atomic(run.json)``, a run leaves only ``run.json.tmp-*``: the rerun
    must take the folder as its own (not refuse it as a non-empty foreign folder) and remove the temp file."""
    p, clean = pipeline
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json.tmp-4242-0123abcd").write_text('{"name": "te')
    r = cli("run", p, "-q", "--set", f"output.path={out}", "--set", "stages.sleep.seconds=0")
    assert r.code == 0, r
    assert not list(out.rglob("*.tmp-*"))
    assert shard_files(out) == shard_files(clean)
    # A folder with anything else in it is still refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = cli("run", p, "-q", "--set", f"output.path={other}")
    assert r.code == 2 and "not empty and holds no run.json" in r.err


# --- a pipeline with a global stage: two phases, intermediate shards under work/, a fit in between -------

GLOBAL_STAGES = [
    {"stage": "synthetic_image", "size": 16},
    {"stage": "planted", "columns": ["sha256"]},  # every 6th row repeats an earlier row's hash
    {"stage": "sleep", "seconds": 0.25},
    {"stage": "dedup", "perceptual": False, "semantic": False, "keep": ["width desc"]},
    {"stage": "basic_filter", "min_caption_length": 3},
    {"stage": "sleep", "name": "sleep_after", "seconds": 0.25},
]


@pytest.fixture(scope="module")
def global_pipeline(tmp_path_factory):
    """Phase 0 (image, hashes) writes work/phase0/<shard>.arrow; dedup fits on all of them, then phase 1
    applies it and writes the shards. Its clean run is a local one."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("chaos-global")
    table = pq.read_table(make_input(tmp / "plain.parquet", ROWS, bad_every=7))
    hashes = [hashlib.sha256(str(i - i % 6 if i % 6 == 5 else i).encode()).hexdigest() for i in range(ROWS)]
    pq.write_table(table.append_column("sha256", pa.array(hashes)), tmp / "in.parquet")
    p = write_pipeline(tmp / "p.yaml", tmp / "in.parquet", tmp / "out", GLOBAL_STAGES, shard_size=SHARD_SIZE)
    clean = run_pipeline(load_config(p, [f"output.path={tmp / 'clean'}"]), show_progress=False)
    assert clean.exit_code == 0 and clean.counts["drop_reason"].get("duplicate:exact", 0) > 0
    return p, tmp / "clean"


def _phase0(out: Path) -> int:
    return len(_listdir(out / "work" / "phase0"))


@pytest.mark.parametrize(
    ("seed", "when"),
    [*seeds((9, "driver in phase 1"), (8, "driver in phase 0")), (10, "worker in phase 1")],
)
def test_kills_around_a_global_stage(cluster, global_pipeline, tmp_path, drivers, cli, seed, when):
    """The driver killed while phase 0 writes its intermediate shards, or after the fit while phase 1
    writes the final ones; or a worker killed in phase 1. The rerun (or Ray's retry) ends at the clean
    output, and the intermediate shards are gone."""
    p, clean = global_pipeline
    rng = random.Random(seed)
    out = tmp_path / "out"
    d = drivers(cluster, p, out)
    k = rng.randint(1, SHARDS - 5)  # five shards to go: the run is still going when the kill comes
    if when == "driver in phase 0":
        _wait_for(f"{k} intermediate shards", lambda: _phase0(out) >= k, d)
    else:
        _wait_for(f"{k} final shards", lambda: len(_finished(out)) >= k, d)
    time.sleep(rng.uniform(0.0, 0.3))
    assert d.running(), f"the run ended before the kill:\n{d.tail()}"
    what = (
        f"seed {seed}: {when}: {_phase0(out)} intermediate and {len(_finished(out))} final shards at the kill"
    )
    if when.startswith("driver"):
        running = _tasks(cluster)
        d.kill()
        _gone(cluster, running)
        assert json.loads(cli("status", out, "--json").out)["status"] == "interrupted"
        assert _rerun_to_completion(cluster, p, out, drivers) == 1, what
    else:
        victim = None
        while victim is None and d.running():
            victim = _freeze_a_task(cluster, rng)
        assert victim is not None, f"no worker ran a shard ({what})"
        _kill(victim)
        if d.wait() != 0:
            _rerun_to_completion(cluster, p, out, drivers)
    check_output(out, clean, cli)
    assert not (out / "work").exists(), "intermediate shards left behind"
    print(what)
