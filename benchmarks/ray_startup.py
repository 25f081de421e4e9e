"""Where Ray's fixed start-up goes in ``curate run --executor ray`` on a local cluster that curate starts.

Each repeat is a fresh process doing what ``curate run PIPELINE --executor ray -q`` does (importing the
CLI included) on a download-only pipeline: ``--rows`` small JPEGs served by a local HTTP server, in shards
of ``--shard-size``. The driver's steps are timed by wrapping the executor's methods; the workers' by
probe actors (subclasses of the executor's, from this module, which the workers import by name), written
to a file as they happen. Prints each step's median over the repeats, from the process's start:

    python imports     the process started (by the parent) -> `curate.cli` imported
    config, input      -> the executor starts (config, checks, reading the input's shards)
    ray.init           the local cluster starting (with --warm: joining the running one)
    plan               the plan on the cluster (asks Ray for its nodes)
    worker start       -> the worker that runs the first shard gets its actor: Ray starts the process, its
                       Python and Ray (and, where preloaded, curate) start
    worker imports     -> curate imported there (about 0 where the worker imported it as it started)
    stage setup        -> the actor is made: the job unpickled and each stage's setup() (a model load; none
                       for download)
    first shard runs   -> the first shard's first step on a Ray worker: the whole start-up, from the process's
                       start
    first shard done   -> the first shard's result (whoever ran it: with --lane, the driver)
    work               -> the last shard's result
    ray.shutdown       the cluster stopping (with --warm: leaving it)
    total              the process, start to exit (wall seconds, as the parent sees it)

The runs set ``executor.work_while_starting: false``, so that every shard waits for Ray's workers; with
``--lane`` every repeat also runs with it on (the default), the driver running the first shards while the
cluster starts (only "first shard done" and "total" then say something). With ``--warm``, every repeat also
runs on a cluster started once before the runs (``ray start``, as a user
keeps one for many runs with ``curate run --address``). With ``--before DIR``, every repeat also runs the
curate package found under DIR (a tree laid out as installed: DIR/curate/, DIR/curate/stages/, ...). The
variants are interleaved, their order turning each repeat, so that load on a shared machine favours none;
the 1-minute load average is printed with each run. Not part of the test run.

    python benchmarks/ray_startup.py --repeats 3
    python benchmarks/ray_startup.py --repeats 3 --warm --before ../curate-before
"""

from __future__ import annotations

import json
import os
import sys
import time

_PROBE_ENV = "CURATE_RAY_STARTUP_PROBE"


def _event(name: str, **extra: object) -> None:
    path = os.environ.get(_PROBE_ENV)
    if path:
        line = json.dumps({"event": name, "t": time.time(), "pid": os.getpid(), **extra})
        with open(path, "a") as f:
            f.write(line + "\n")


# Runs first when a worker unpickles a probe actor (this module, imported by name).
_event("probe_import", curate_loaded="curate.executors.ray" in sys.modules)

_PROBES = ("OverlappingPhaseActor", "PhaseActor", "run_phase_task")


def __getattr__(name: str) -> object:
    """The probe classes, made on first use, so that importing this module imports nothing of curate (the
    worker's import of curate is timed here)."""
    if name not in _PROBES:
        raise AttributeError(name)
    from curate.executors import ray as rx

    _event("curate_imported")

    def probe(base: type) -> type:
        class Probe(base):
            def __init__(self, job):
                _event("actor_init")
                super().__init__(job)
                _event("actor_ready")

            def step(self, row):
                _event("step")
                return super().step(row)

        Probe.__name__ = Probe.__qualname__ = base.__name__.lstrip("_")
        Probe.__module__ = __name__
        return Probe

    def run_phase_task(job, row):
        _event("step")
        return rx._Phase(job).run(row)

    run_phase_task.__qualname__, run_phase_task.__module__ = "run_phase_task", __name__

    made = {
        "OverlappingPhaseActor": probe(rx._OverlappingPhaseActor),
        "PhaseActor": probe(rx._PhaseActor),
        "run_phase_task": run_phase_task,
    }
    globals().update(made)
    return made[name]


def _child(pipeline: str, address: str | None) -> None:
    """One `curate run`, timed (this process is the driver)."""
    # The parent's clock just before it started this process (a process's own start time, as psutil reads it
    # from the boot time, drifts from time.time() on some virtual machines).
    process_start = float(os.environ["CURATE_RAY_STARTUP_T0"])
    import curate.cli

    _event("cli_imported", process_start=process_start)
    import ray_startup as probes  # this file by its module name, as the workers import it

    from curate.executors import ray as rx

    rx._OverlappingPhaseActor = probes.OverlappingPhaseActor
    rx._PhaseActor = probes.PhaseActor
    rx._run_phase_task = probes.run_phase_task

    def timed(method, before: str | None, after: str):
        def wrapper(*args, **kwargs):
            if before:
                _event(before)
            try:
                return method(*args, **kwargs)
            finally:
                _event(after)

        return wrapper

    cls = rx.RayExecutor
    cls.__enter__ = timed(cls.__enter__, "init_begin", "init_end")
    cls.prepare = timed(cls.prepare, None, "plan_end")
    cls.__exit__ = timed(cls.__exit__, "shutdown_begin", "shutdown_end")
    run_phase = cls.run_phase

    def run_phase_timed(self, job, specs, on_result):
        def on(result):
            _event("result")
            on_result(result)

        return run_phase(self, job, specs, on)

    cls.run_phase = run_phase_timed
    sys.argv = ["curate", "run", pipeline, "--executor", "ray", "-q", "--overwrite"]
    if address:
        sys.argv += ["--address", address]
    curate.cli.main()


STEPS = (
    "python imports",
    "config, input",
    "ray.init",
    "plan",
    "worker start",
    "worker imports",
    "stage setup",
    "first shard runs",
    "first shard done",
    "work",
    "ray.shutdown",
    "total",
)


def _breakdown(events: list[dict], wall: float) -> dict[str, float]:
    driver = next(e for e in events if e["event"] == "cli_imported")
    mine = [e for e in events if e["pid"] == driver["pid"]]
    workers = [e for e in events if e["pid"] != driver["pid"]]

    def at(name: str, among: list[dict], last: bool = False, default: float | None = None) -> float:
        times = [e["t"] for e in among if e["event"] == name] or [default]
        return max(times) if last else min(times)

    nan = float("nan")
    first_done = at("result", mine) - driver["process_start"]
    steps = [e for e in workers if e["event"] == "step"]
    if not steps:  # the driver ran every shard (--lane)
        return {**dict.fromkeys(STEPS, nan), "first shard done": first_done, "total": wall}
    first_step = min(steps, key=lambda e: e["t"])
    runner = [e for e in workers if e["pid"] == first_step["pid"]]
    plan_end = at("plan_end", mine)
    imported = at("curate_imported", runner)
    return {
        "python imports": driver["t"] - driver["process_start"],
        "config, input": at("init_begin", mine) - driver["t"],
        "ray.init": at("init_end", mine) - at("init_begin", mine),
        "plan": plan_end - at("init_end", mine),
        "worker start": at("probe_import", runner) - plan_end,
        "worker imports": imported - at("probe_import", runner),
        "stage setup": at("actor_ready", runner, default=imported) - imported,  # tasks: no actor
        "first shard runs": first_step["t"] - driver["process_start"],
        "first shard done": first_done,
        "work": at("result", mine, last=True) - first_step["t"],
        "ray.shutdown": at("shutdown_end", mine) - at("shutdown_begin", mine),
        "total": wall,
    }


def _serve(folder: str):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _make_pipeline(tmp, rows: int, shard_size: int, host_port: str, num_cpus: int, lane: bool = False) -> str:
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from PIL import Image

    images = tmp / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(rows):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        (images / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    urls = [f"http://{host_port}/{i:05d}.jpg" for i in range(rows)]
    pq.write_table(
        pa.table({"URL": urls, "TEXT": [f"image number {i}" for i in range(rows)]}), tmp / "in.parquet"
    )
    doc = {
        "name": "ray-startup",
        "input": {"path": str(tmp / "in.parquet"), "url_col": "URL", "caption_col": "TEXT"},
        "output": {"path": str(tmp / "out"), "report": False},
        "shard_size": shard_size,
        "executor": {"kind": "ray", "num_cpus": num_cpus, "work_while_starting": lane},
        "stages": [
            {"stage": "download", "allow_private": [host_port], "robots_txt": False, "image_size": 32},
        ],
    }
    name = "p-lane.yaml" if lane else "p.yaml"
    (tmp / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(tmp / name)


def main() -> None:
    import argparse
    import contextlib
    import statistics
    import subprocess
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--before", help="also run the curate package under this folder, interleaved")
    ap.add_argument("--events", help="keep each run's raw events (JSON lines) in this folder")
    ap.add_argument(
        "--warm",
        action="store_true",
        help="also run on a cluster started once before the runs (`ray start`), as `curate run --address` does",
    )
    ap.add_argument(
        "--lane",
        action="store_true",
        help="also run with executor.work_while_starting on: the driver runs shards while the cluster starts",
    )
    args = ap.parse_args()

    here = str(Path(__file__).resolve().parent)
    variants: dict[str, str | None] = {"installed": None}
    if args.before:
        variants["before"] = str(Path(args.before).resolve())
    if args.warm:
        variants["warm"] = None
    if args.lane:
        variants["lane"] = None
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        server = _serve(str(tmp / "images"))
        host_port = f"127.0.0.1:{server.server_address[1]}"
        pipeline = _make_pipeline(tmp, args.rows, args.shard_size, host_port, args.num_cpus)
        lane_pipeline = _make_pipeline(tmp, args.rows, args.shard_size, host_port, args.num_cpus, lane=True)
        address = None
        if args.warm:  # a head node of its own (temp dir, ports), stopped by killing its processes
            sys.path.insert(0, str(Path(here).parent / "tests"))
            from raycluster import Cluster, cluster_env

            env = cluster_env()  # its workers import the probes of this module and write their events here
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
            env[_PROBE_ENV] = str(tmp / "events-warm.jsonl")
            cluster = stack.enter_context(
                Cluster(env, worker_node=False, dashboard=False, head_cpus=args.num_cpus)
            )
            address = cluster.address
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for variant in order:
                events_file = tmp / f"events-{variant}-{repeat}.jsonl"
                if variant == "warm":  # the file the running cluster's workers write to
                    events_file = tmp / "events-warm.jsonl"
                    events_file.unlink(missing_ok=True)
                env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
                path = [p for p in (variants[variant], here, env.get("PYTHONPATH")) if p]
                env.update(
                    {_PROBE_ENV: str(events_file), "PYTHONPATH": os.pathsep.join(path)},
                    RAY_USAGE_STATS_ENABLED="0",
                )
                load = os.getloadavg()[0]
                env["CURATE_RAY_STARTUP_T0"] = repr(time.time())
                start = time.perf_counter()
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        lane_pipeline if variant == "lane" else pipeline,
                        address if variant == "warm" else "",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    check=False,
                )
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    sys.exit(
                        f"{variant} run failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
                    )
                events = [json.loads(line) for line in events_file.read_text().splitlines()]
                if args.events:
                    Path(args.events).mkdir(parents=True, exist_ok=True)
                    kept = Path(args.events) / f"events-{variant}-{repeat}.jsonl"
                    kept.write_text(events_file.read_text())
                steps = _breakdown(events, wall)
                runs[variant].append(steps)
                print(
                    f"repeat {repeat + 1} {variant:>9}: load {load:.2f}, first shard runs at "
                    f"{steps['first shard runs']:.2f} s, first done at {steps['first shard done']:.2f} s, "
                    f"total {wall:.2f} s",
                    flush=True,
                )
        server.shutdown()
    print(
        f"\nmedian of {args.repeats} (seconds); {args.rows} rows, {args.shard_size} per shard, {args.num_cpus} CPUs"
    )
    print(f"{'step':<18}" + "".join(f"{v:>11}" for v in variants))
    for step in STEPS:
        print(
            f"{step:<18}" + "".join(f"{statistics.median(r[step] for r in runs[v]):>11.2f}" for v in variants)
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3] or None)
    else:
        main()
