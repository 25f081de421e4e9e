"""The demo's curated-vs-raw comparison on more held-out prompts, from the models already trained.

`curate demo` scores each model on its held-out prompts during training. How wide the interval is depends
mostly on how many prompts there are (``benchmarks/demo_seeds.py``: the seed moves the difference far less
than the prompts do). This script loads the trained pairs of a finished demo output folder (the demo's own,
``train/``, and those ``demo_seeds.py`` wrote, ``seeds/seed-N/train/``), generates images for the first
``--prompts`` held-out prompts with the validation's own settings (the EMA weights, the config's sampler, steps,
guidance and seed), scores them exactly with the world's analyser, and reports the difference and its interval
for nested prefixes of the prompts (128, 256, ...), per seed and over the seeds (two-level bootstrap).

The first prompts' scores must equal those the training's validation wrote (same weights, same noise): the
script checks that and stops if not. Not part of the test run: 512 prompts cost about 3 minutes per model
on one core.

    .venv/bin/python benchmarks/demo_prompts.py demo-output --prompts 512 [--json prompts.json]

Run it from the folder the demo ran in: the trained models name the demo CLIP by a path relative to it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from curate.demo.train_compare import eval_prompts, paired_interval, two_level_interval


def _score(args: tuple[str, int]) -> list[float | None]:
    """Per-prompt adherence of one trained model on the first ``n`` held-out prompts."""
    import torch

    torch.set_num_threads(1)
    from PIL import Image

    from curate.demo.adherence import adherence_of
    from curate.train.generate import load_generator

    output, n = args
    gen, state = load_generator(output)
    v = state["config"]["validation"]
    images = gen.sample(
        eval_prompts(n),
        guidance=v["guidance"],
        rag_guidance=v["rag_guidance"],
        steps=v["sample_steps"],
        sampler=v["sampler"],
        seed=v["seed"],
    )
    return adherence_of([Image.fromarray(x) for x in images], eval_prompts(n))["per_prompt"]


def _pairs(out: Path) -> dict[str, Path]:
    pairs = {"0": out / "train"}
    for folder in sorted((out / "seeds").glob("seed-*")):
        pairs[folder.name.removeprefix("seed-")] = folder / "train"
    return {seed: p for seed, p in pairs.items() if (p / "curated").exists() and (p / "raw").exists()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_output", type=Path, help="a folder `curate demo --output` wrote")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--json", type=Path, help="write the per-prompt scores and intervals here")
    args = ap.parse_args()
    pairs = _pairs(args.demo_output)
    if not pairs:
        sys.exit(
            f"{args.demo_output} has no trained pair (train/curated and train/raw): run `curate demo` first"
        )
    jobs = [(str(p / arm), args.prompts) for p in pairs.values() for arm in ("curated", "raw")]
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        scores = list(pool.map(_score, jobs))
    per_seed: dict[str, dict] = {}
    for i, (seed, p) in enumerate(pairs.items()):
        curated, raw = scores[2 * i], scores[2 * i + 1]
        for arm, got in (("curated", curated), ("raw", raw)):
            line = json.loads((p / arm / "validation.jsonl").read_text().splitlines()[-1])
            trained = line["per_prompt"]["adherence"]
            if got[: len(trained)] != trained:
                sys.exit(f"seed {seed} {arm}: the first {len(trained)} prompts do not score as in validation")
        per_seed[seed] = {"curated": curated, "raw": raw}
    sizes = [n for n in (128, 256, 512, 1024, 2048) if n < args.prompts] + [args.prompts]
    report: dict = {"prompts": args.prompts, "seeds": list(per_seed), "by_prompts": {}}
    print(f"curated - raw prompt adherence (points), 95% intervals; seeds {', '.join(per_seed)}")
    for n in sizes:
        row = {}
        for seed, s in per_seed.items():
            ci = paired_interval(s["curated"][:n], s["raw"][:n])
            row[seed] = {k: ci[k] * 100 if k in ("diff", "low", "high") else ci[k] for k in ci}
        diffs = [np.array(s["curated"][:n], float) - np.array(s["raw"][:n], float) for s in per_seed.values()]
        low, high = two_level_interval(diffs)
        mean = float(np.mean([d.mean() for d in diffs])) * 100
        report["by_prompts"][n] = {"per_seed": row, "mean": mean, "low": low * 100, "high": high * 100}
        seeds = "; ".join(
            f"seed {k} {r['diff']:+.1f} ({r['low']:+.1f} to {r['high']:+.1f})" for k, r in row.items()
        )
        print(f"  {n:5d} prompts: {seeds}; over seeds {mean:+.1f} ({low * 100:+.1f} to {high * 100:+.1f})")
    if args.json:
        report["per_prompt"] = per_seed
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
