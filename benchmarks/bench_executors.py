"""Ray executor vs local executor on the same generated pipeline, same machine, same run.

Each repeat runs the pipeline three ways on the same input: ``local``; ``ray``, as ``curate run --executor
ray`` does it (curate starts a local cluster and stops it, so its time includes Ray's start); and ``ray warm``,
on a cluster already running in the process (a notebook's, a Ray job's driver), where only the per-shard
overhead counts. The order turns each repeat so that drift on a shared machine does not favour one. Prints
every repeat's wall seconds, the medians, the ratios ray/local (goal: at most 1.10) and whether every run
wrote byte-identical shards. Not part of the test run.

    python benchmarks/bench_executors.py --rows 40000 --shard-size 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test stages and data live in tests/support (not installed): this process and the Ray workers it starts
# import them by this path, as tests/conftest.py arranges for the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))

import yaml
from support.data import make_input
from support.stages import register_test_stages

from curate.core.config import load_config
from curate.core.runner import run_pipeline

KINDS = ("local", "ray", "ray warm")
GOAL = 1.10


def files(output: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted((output / "shards").iterdir())
        if p.suffix in (".tar", ".parquet")
    }


def timed_run(pipeline: Path, kind: str, output: Path, num_cpus: int) -> float:
    import ray

    warm = kind == "ray warm"
    if warm:  # started before the clock: the executor uses the running cluster and leaves it running
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    cfg = load_config(pipeline, [f"executor.kind={kind.split()[0]}", f"output.path={output}"])
    start = time.perf_counter()
    summary = run_pipeline(cfg, show_progress=False)
    seconds = time.perf_counter() - start
    if warm:
        ray.shutdown()
    assert summary.exit_code == 0, summary.shards_failed
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--shard-size", type=int, default=2_000)
    ap.add_argument("--image-size", type=int, default=64, help="side of the synthetic PNGs")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    register_test_stages()

    times: dict[str, list[float]] = {k: [] for k in KINDS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_input(tmp / "in.parquet", args.rows, bad_every=23)
        doc = {
            "name": "bench",
            "input": {"path": str(tmp / "in.parquet"), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": str(tmp / "out")},
            "shard_size": args.shard_size,
            "executor": {"num_cpus": args.num_cpus},
            "stages": [
                {"stage": "synthetic_image", "size": args.image_size},
                {"stage": "caption_chars"},
                {"stage": "basic_filter", "min_caption_length": 5, "min_width": args.image_size + 4},
            ],
        }
        (tmp / "p.yaml").write_text(yaml.safe_dump(doc))
        same = True
        for r in range(args.repeats):
            order = KINDS[r % 3 :] + KINDS[: r % 3]
            for kind in order:
                out = tmp / f"{kind.replace(' ', '-')}-{r}"
                times[kind].append(timed_run(tmp / "p.yaml", kind, out, args.num_cpus))
            for kind in KINDS[1:]:
                same = same and files(tmp / f"{kind.replace(' ', '-')}-{r}") == files(tmp / f"local-{r}")

        import ray

        start = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
        init = time.perf_counter() - start
        ray.shutdown()

    shards = -(-args.rows // args.shard_size)
    print(
        f"{args.rows:,} rows in {shards} shards of {args.shard_size:,}; {args.num_cpus} CPUs; "
        f"stages: synthetic_image ({args.image_size}px PNG), caption_chars (actor), basic_filter"
    )
    print(
        "| executor | " + " | ".join(f"run {r + 1} s" for r in range(args.repeats)) + " | median s | rows/s |"
    )
    print("|---" * (args.repeats + 3) + "|")
    median = {k: statistics.median(v) for k, v in times.items()}
    for kind in KINDS:
        runs = " | ".join(f"{t:.2f}" for t in times[kind])
        print(f"| {kind} | {runs} | {median[kind]:.2f} | {args.rows / median[kind]:,.0f} |")
    for kind in KINDS[1:]:
        ratio = median[kind] / median["local"]
        print(
            f"{kind} / local (medians): {ratio:.2f}x  (goal <= {GOAL:.2f}: {'met' if ratio <= GOAL else 'NOT met'})"
        )
    print(f"ray.init alone: {init:.1f}s; byte-identical shards in every run: {same}")
    print(f"load average (1 min) before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
