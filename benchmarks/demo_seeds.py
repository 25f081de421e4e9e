"""The demo's curated-vs-raw comparison over several training seeds: how much of the difference is the seed.

`curate demo` trains each model once (seed 0) and gives a paired-bootstrap interval over its held-out prompts;
that interval says nothing about the training's own randomness. This script takes a finished demo output
folder (its curated run, raw run and demo CLIP) and trains the same pair again for each seed given, with the
same held-out prompts, then reports per seed the adherence difference and its prompt interval, and over the
seeds their mean, spread and an interval that resamples seeds and prompts together (a two-level bootstrap).
Not part of the test run: each seed costs one demo training pair (about 6 minutes on 2 cores).

    .venv/bin/python benchmarks/demo_seeds.py demo-output --seeds 1 2 [--prompts 128] [--json seeds.json]

Seed 0 is the training config's own seed: the demo's pair (``train/comparison.json``) is read, not trained again,
when it has as many prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from curate.demo.train_compare import EVAL_PROMPTS, train_pair, two_level_interval


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "demo_output", type=Path, help="a folder `curate demo --output` wrote (run/, raw/, models/)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--prompts",
        type=int,
        default=EVAL_PROMPTS,
        help=f"held-out prompts per model (the demo's: {EVAL_PROMPTS})",
    )
    ap.add_argument("--json", type=Path, help="write every seed's report here")
    args = ap.parse_args()
    out = args.demo_output
    if not (out / "run").exists() or not (out / "raw").exists():
        sys.exit(f"{out} has no run/ and raw/: run `curate demo --output {out}` first")
    console = Console(stderr=True)
    work = out / "seeds"
    reports, diffs = {}, []
    demo = out / "train" / "comparison.json"  # the demo's own pair: the training config's seed, 0
    reuse = demo.exists() and json.loads(demo.read_text())["prompts"] == args.prompts
    if 0 not in args.seeds and reuse:
        args.seeds = [0, *args.seeds]
    for seed in args.seeds:
        if seed == 0 and reuse:
            report = json.loads(demo.read_text())
        else:
            report = train_pair(
                work / f"seed-{seed}",
                out / "run",
                out / "raw",
                console,
                overrides=[f"seed={seed}"],
                prompts=args.prompts,
            )
        a = np.array(report["curated"]["per_prompt"]["adherence"], float)
        b = np.array(report["raw"]["per_prompt"]["adherence"], float)
        ci = report["adherence_interval"]
        diffs.append(a - b)
        reports[seed] = {
            "interval": ci,
            "seconds": report["seconds"],
            "curated": report["curated"]["metrics"],
            "raw": report["raw"]["metrics"],
        }
        print(
            f"seed {seed}: curated - raw {ci['diff'] * 100:+.1f} points, 95% prompt interval "
            f"{ci['low'] * 100:+.1f} to {ci['high'] * 100:+.1f} ({report['seconds']:.0f}s)",
            flush=True,
        )
    per_seed = np.array([d.mean() for d in diffs]) * 100
    low, high = two_level_interval(diffs)
    print(
        f"over {len(diffs)} seeds: mean {per_seed.mean():+.1f} points, per-seed range {per_seed.min():+.1f} to "
        f"{per_seed.max():+.1f}, sd {per_seed.std(ddof=1) if len(diffs) > 1 else 0:.1f}; 95% interval over "
        f"seeds and prompts {low * 100:+.1f} to {high * 100:+.1f}"
    )
    if args.json:
        summary = {
            "seeds": reports,
            "mean": per_seed.mean(),
            "low": low * 100,
            "high": high * 100,
            "prompts": args.prompts,
        }
        args.json.write_text(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
