"""Does retrieval help with rare concepts? The sample world with one concept made rare, trained with and without
retrieval for the same steps, scored exactly on held-out prompts that name the rare concept and on common ones.
The comparison itself is curate.demo.rag_compare's (what ``curate demo --rag`` prints); this script runs it
for one or more training seeds over one corpus and, with several seeds, reports their mean.

    .venv/bin/python benchmarks/rag_rare_concepts.py [--steps 300] [--rows 1500] [--rare purple] \
        [--seeds 0 1 2] [--json r.json]

Tiny sizes check that it runs: ``--rows 300 --steps 5 --prompts 4 --sample-steps 2``. The arms train side by
side, one process and one thread each; the seeds one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from curate.demo.rag_compare import KINDS, RagSettings, build_corpus, compare_arms, table_lines


def main(argv: list[str] | None = None) -> int:
    d = RagSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--rows", type=int, default=d.rows)
    p.add_argument("--rare", nargs="+", default=list(d.rare), help="colours or shapes made rare")
    p.add_argument("--rare-share", type=float, default=d.rare_share)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--arms", nargs="+", default=list(d.arms), help="the first is the baseline")
    p.add_argument(
        "--prompts", type=int, default=d.prompts, help="held-out prompts of each kind (rare, common)"
    )
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--rag-guidance", type=float, default=d.rag_guidance)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads for generation")
    p.add_argument("--seeds", type=int, nargs="+", default=[d.seed], help="training (and sampling) seeds")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    settings = [
        RagSettings(
            rows=args.rows,
            rare=tuple(args.rare),
            rare_share=args.rare_share,
            steps=args.steps,
            resolution=args.resolution,
            k=args.k,
            arms=tuple(args.arms),
            prompts=args.prompts,
            sample_steps=args.sample_steps,
            guidance=args.guidance,
            rag_guidance=args.rag_guidance,
            threads=args.threads,
            seed=seed,
        )
        for seed in args.seeds
    ]

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        started = time.perf_counter()
        corpus = build_corpus(out, settings[0])
        print(
            f"corpus: {corpus['rows']} indexed rows, {corpus['rare_rows']} name {'/'.join(args.rare)}",
            flush=True,
        )
        reports = []
        for s in settings:
            report = compare_arms(corpus, out / f"seed-{s.seed}", s, say=lambda line: print(line, flush=True))
            report["corpus_rows"], report["rare_rows"] = corpus["rows"], corpus["rare_rows"]
            reports.append(report)
            print("\n".join(table_lines(report)), flush=True)
            summary = _over_seeds(reports) if len(reports) > 1 else {}
            total = time.perf_counter() - started
            if args.json:  # after every seed, so that a long run's finished seeds are kept
                doc = {"seeds": reports, "over_seeds": summary.get("numbers", {}), "seconds": total}
                args.json.write_text(json.dumps(doc, indent=2))
        for line in summary.get("lines", []):
            print(line)
        print(f"total {total:.0f}s")
    return 0


def _over_seeds(reports: list[dict]) -> dict:
    """Per arm and kind of prompt, the mean over seeds, and for the later arms the mean difference with an
    interval that resamples seeds and prompts together (curate.demo.train_compare.two_level_interval)."""
    from curate.demo.train_compare import two_level_interval

    arms = reports[0]["settings"]["arms"]
    base = arms[0]
    numbers: dict = {}
    lines = [f"over {len(reports)} seeds ({', '.join(str(r['settings']['seed']) for r in reports)}): mean"]
    for kind in KINDS:
        for key in ("adherence", *(("rare_found",) if kind == "rare" else ())):
            means = {a: float(np.mean([r["results"][a][kind][key] for r in reports])) for a in arms}
            numbers[f"{kind}_{key}"] = means
            lines.append(f"  {kind} {key:<11}" + "".join(f"  {a} {v:.3f}" for a, v in means.items()))
        for a in arms[1:]:
            diffs = [
                np.array(r["results"][a][kind]["per_prompt"], float)
                - np.array(r["results"][base][kind]["per_prompt"], float)
                for r in reports
            ]
            mean = float(np.mean([x.mean() for x in diffs]))
            low, high = two_level_interval(diffs)
            numbers[f"{kind}_{a}_minus_{base}"] = {"diff": mean, "low": low, "high": high}
            lines.append(
                f"  {kind} adherence, {a} - {base}: {mean:+.3f}, 95% interval {low:+.3f} to {high:+.3f} "
                "(seeds and prompts resampled)"
            )
    return {"numbers": numbers, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
