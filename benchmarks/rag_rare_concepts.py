"""Does retrieval help with rare concepts? The sample world with one concept made rare, trained with and without
retrieval for the same steps, scored exactly on held-out prompts that name the rare concept and on common ones.

1. A world (``build_world(rare=...)``) where scenes naming the rare colour or shape are kept with probability
   ``--rare-share`` (a few rows out of ``--rows``) and redrawn otherwise; served offline, downloaded and scored
   with the demo CLIP (the shipped one), and indexed (``curate index build``).
2. The same tiny UNet as ``curate demo`` (pipelines/train_demo.yaml's model, pixel space) trained for
   ``--steps`` on it, once per arm: ``none`` (no retrieval), ``images_and_captions`` (each training image's
   neighbours from the index, their images and captions as cross-attention tokens: Re-Imagen / RealRAG) and,
   with ``--arms``, ``embedding`` (their CLIP image embeddings: kNN-Diffusion / RDM). Same seed, same batches.
3. Held-out prompts: fresh scenes of the world (another seed) that name the rare concept, and as many that name
   none; each arm generates one image per prompt (the retrieval arms with the prompt's neighbours from the
   index, searched by its CLIP text embedding) and the world's analyser scores them exactly: adherence (the
   mean of background, colours and shapes), and ``rare found`` (the share of rare prompts whose image shows
   every rare word they name: the colour as the background or a blob, the shape as a blob). The differences
   to ``none`` come with a paired bootstrap interval over the prompts.

    .venv/bin/python benchmarks/rag_rare_concepts.py [--steps 300] [--rows 1500] [--rare purple] [--json r.json]

Tiny sizes check that it runs: ``--rows 300 --steps 5 --prompts 4 --sample-steps 2``. The arms train side by
side, one process and one thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

EVAL_SEED = 7_777  # as curate demo's held-out prompts: the world's rows use seeds (world seed, 1, row)


def build_corpus(out: Path, rows: int, rare: tuple[str, ...], share: float) -> dict[str, Any]:
    """World -> curate run (download + demo CLIP scores) -> index. Returns paths and the rare rows' count."""
    import pyarrow.parquet as pq

    from curate.core.config import load_config
    from curate.core.runner import run_pipeline
    from curate.demo.server import WorldServer
    from curate.demo.tiny_clip import unpack
    from curate.demo.world import build_world
    from curate.index import build_index

    clip = out / "models" / "demo-clip"
    if not clip.exists():
        unpack(clip)
    world = build_world(rows, seed=0, photos=False, rare=rare, rare_share=share)
    with WorldServer() as server:
        world.serve(server)
        pq.write_table(world.input_table(server.url), out / "input.parquet")
        doc = {
            "name": "rag-rare",
            "input": {"path": str(out / "input.parquet"), "url_col": "url", "caption_col": "caption"},
            "output": {"path": str(out / "run"), "report": False},
            "shard_size": 500,
            "stages": [
                {
                    "stage": "download",
                    "concurrency": 16,
                    "total_timeout": 10,
                    "image_size": 64,
                    "resize_mode": "center_crop",
                    "allow_private": [server.host_port],
                },
                {"stage": "clip_score", "model": f"local-dir:{clip}", "batch_size": 128},
            ],
        }
        (out / "pipeline.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        run_pipeline(load_config(out / "pipeline.yaml", []), overwrite=True, show_progress=False)
    build_index([str(out / "run")], out / "index")
    from curate.index import Retriever

    captions = [c or "" for c in Retriever(out / "index").meta["caption"].to_pylist()]
    words = set(rare)
    rare_rows = sum(bool(words & set(c.replace(",", " ").split())) for c in captions)
    return {
        "run": out / "run",
        "index": out / "index",
        "clip": clip,
        "rows": len(captions),
        "rare_rows": rare_rows,
    }


def held_out_prompts(n: int, rare: tuple[str, ...], seen: set[str]) -> tuple[list[str], list[str]]:
    """``n`` fresh scenes' captions naming a rare word, and ``n`` naming none; none of them a training caption."""
    from curate.demo.world import _random_scene, names_any

    rare_prompts: list[str] = []
    common: list[str] = []
    i = 0
    while len(rare_prompts) < n or len(common) < n:
        scene = _random_scene(np.random.default_rng([EVAL_SEED, i]))
        i += 1
        caption = scene.caption
        if caption in seen or caption in rare_prompts or caption in common:
            continue
        target = rare_prompts if names_any(scene, rare) else common
        if len(target) < n:
            target.append(caption)
    return rare_prompts, common


def train_config(corpus: dict[str, Any], out: Path, arm: str, args) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"rag-{arm}",
        "output": str(out / "train" / arm),
        "seed": 0,
        "data": {
            "shards": [str(corpus["run"])],
            "caption": "txt",
            "resolution": args.resolution,
            "shuffle_buffer": 500,
            "workers": 0,
        },
        "model": {
            "unet": {"preset": "tiny"},
            "text_encoder": {"kind": "open_clip", "model": f"local-dir:{corpus['clip']}", "max_tokens": 32},
        },
        "optim": {"lr": 2e-3, "warmup_steps": min(50, args.steps // 4), "batch_size": 32, "ema_decay": 0.995},
        "schedule": {"steps": args.steps, "log_every": 25, "threads": 1},
        "checkpoint": {"every": args.steps},
        "validation": {"every": None, "prompts": [], "clip_score": False},
    }
    if arm != "none":
        raw["model"]["retrieval"] = {"index": str(corpus["index"]), "k": args.k, "condition": arm}
    return raw


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from curate.train.config import parse_train_config
    from curate.train.trainer import train

    lines: list[str] = []
    summary = train(parse_train_config(raw), say=lines.append, progress=False)
    return {"output": raw["output"], "seconds": summary["seconds"], "log": lines}


def rare_found(image: np.ndarray, prompt: str, rare: tuple[str, ...]) -> float:
    """1 when the image shows every rare word the prompt names (colour: background or a blob; shape: a blob)."""
    from curate.demo.adherence import analyse, parse_prompt
    from curate.demo.world import COLOURS

    parsed = parse_prompt(prompt)
    a = analyse(image)
    ok = True
    for word in rare:
        if word in COLOURS:
            named = word == parsed.background or word in parsed.colours
            if named and not (a.background == word or any(b.colour == word for b in a.blobs)):
                ok = False
        elif any(shape == word for _, shape in parsed.objects) and not any(b.shape == word for b in a.blobs):
            ok = False
    return float(ok)


def evaluate(output: str, arm: str, index: Path, prompts: dict[str, list[str]], rare, args) -> dict[str, Any]:
    import torch

    from curate.demo.adherence import adherence_of
    from curate.train.generate import load_generator
    from curate.train.retrieval import generation_neighbours

    torch.set_num_threads(args.threads)
    gen, _ = load_generator(output)
    result: dict[str, Any] = {}
    for name, ps in prompts.items():
        nb = generation_neighbours(gen, index, ps) if arm != "none" else None
        images = gen.sample(
            ps,
            neighbours=nb,
            guidance=args.guidance,
            rag_guidance=args.rag_guidance,
            steps=args.sample_steps,
            seed=0,
        )
        scores = adherence_of(images, ps)
        found = (
            [rare_found(img, p, rare) for img, p in zip(images, ps, strict=True)] if name == "rare" else None
        )
        result[name] = {
            **{k: scores[k] for k in ("adherence", "background", "colours", "shapes")},
            "per_prompt": scores["per_prompt"],
            **({"rare_found": float(np.mean(found)), "per_prompt_found": found} if found else {}),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--rare", nargs="+", default=["purple"], help="colours or shapes made rare")
    p.add_argument("--rare-share", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["none", "images_and_captions"])
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts of each kind (rare, common)")
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rag-guidance", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for generation")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rare = tuple(args.rare)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        corpus = build_corpus(out, args.rows, rare, args.rare_share)
        print(
            f"corpus: {corpus['rows']} indexed rows, {corpus['rare_rows']} name {'/'.join(rare)}", flush=True
        )
        from curate.index import Retriever

        seen = {c or "" for c in Retriever(corpus["index"]).meta["caption"].to_pylist()}
        rare_prompts, common = held_out_prompts(args.prompts, rare, seen)
        configs = [train_config(corpus, out, arm, args) for arm in args.arms]
        with mp.get_context("spawn").Pool(len(configs)) as pool:
            trained = pool.map(_train, configs)
        prompts = {"rare": rare_prompts, "common": common}
        results = {
            arm: {**t, **evaluate(t["output"], arm, corpus["index"], prompts, rare, args)}
            for arm, t in zip(args.arms, trained, strict=True)
        }
        from curate.demo.train_compare import paired_interval

        base = args.arms[0]
        print(f"\n{'arm':<22}{'train s':>8}  {'rare adh':>9}{'rare found':>11}  {'common adh':>10}")
        for arm, r in results.items():
            print(
                f"{arm:<22}{r['seconds']:>8.0f}  {r['rare']['adherence']:>9.3f}{r['rare']['rare_found']:>11.3f}"
                f"  {r['common']['adherence']:>10.3f}"
            )
            if arm != base:
                for kind in ("rare", "common"):
                    iv = paired_interval(r[kind]["per_prompt"], results[base][kind]["per_prompt"])
                    r[kind]["vs_" + base] = iv
                    print(f"  {kind} adherence - {base}: {iv}")
        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "corpus_rows": corpus["rows"],
            "rare_rows": corpus["rare_rows"],
            "prompts": prompts,
            "results": {arm: {k: v for k, v in r.items() if k != "log"} for arm, r in results.items()},
            "seconds": time.perf_counter() - started,
        }
        print(f"total {report['seconds']:.0f}s")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
