"""Ray executor vs local executor on the same generated pipeline, same machine, same run.

Prints wall seconds for each (Ray's includes starting its local cluster), the ratio, and checks that both
wrote byte-identical shards. Not part of the test run.

    python benchmarks/bench_executors.py --rows 40000 --shard-size 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import yaml

import curate.testing  # registers the synthetic_image and caption_chars stages
from curate.config import load_config
from curate.runner import run_pipeline


def files(output: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted((output / "shards").iterdir())
        if p.suffix in (".tar", ".parquet")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--shard-size", type=int, default=2_000)
    ap.add_argument("--image-size", type=int, default=64, help="side of the synthetic PNGs")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        curate.testing.make_input(tmp / "in.parquet", args.rows, bad_every=23)
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
        times = {}
        for kind in ("local", "ray"):
            cfg = load_config(tmp / "p.yaml", [f"executor.kind={kind}", f"output.path={tmp / kind}"])
            start = time.perf_counter()
            summary = run_pipeline(cfg, show_progress=False)
            times[kind] = time.perf_counter() - start
            assert summary.exit_code == 0, summary.shards_failed
        same = files(tmp / "local") == files(tmp / "ray")

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
    print(f"{'executor':<10}{'wall s':>10}{'rows/s':>12}")
    for kind, t in times.items():
        print(f"{kind:<10}{t:>10.2f}{args.rows / t:>12,.0f}")
    print(f"ray / local wall time: {times['ray'] / times['local']:.2f}x  (ray.init alone: {init:.1f}s)")
    print(f"byte-identical shards: {same}")


if __name__ == "__main__":
    main()
