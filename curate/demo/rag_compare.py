"""Does retrieval help with rare concepts? ``curate demo --rag`` and benchmarks/rag_rare_concepts.py.

The sample world with one concept made rare, trained with and without retrieval for the same steps, scored
exactly on held-out prompts that name the rare concept and on common ones:

1. A world (``build_world(rare=...)``) where scenes naming the rare colour or shape are kept with probability
   ``rare_share`` (a few rows out of ``rows``) and redrawn otherwise; served offline, downloaded and scored
   with the demo CLIP, and indexed (``curate index build``).
2. The same tiny UNet as ``curate demo`` (pipelines/train_demo.yaml's model, pixel space) trained for ``steps``
   on it, once per arm: ``none`` (no retrieval), ``images_and_captions`` (each training image's neighbours from
   the index, their images and captions as cross-attention tokens: Re-Imagen / RealRAG) and, when asked,
   ``embedding`` (their CLIP image embeddings: kNN-Diffusion / RDM). Same seed, same batches; the arms train
   side by side, one process and one thread each.
3. Held-out prompts: fresh scenes of the world (another seed) that name the rare concept, and as many that name
   none (none a training caption); each arm generates one image per prompt (the retrieval arms with the
   prompt's neighbours from the index, searched by its CLIP text embedding) and the world's analyser scores
   them exactly: adherence (the mean of background, colours and shapes) and ``rare found`` (the share of rare
   prompts whose image shows every rare word they name: the colour as the background or a blob, the shape as a
   blob). Each retrieval arm's difference to the first arm comes with a paired bootstrap interval over the
   prompts (:func:`curate.demo.train_compare.paired_interval`).

:func:`compare_rag` does it all into a folder and returns the report; :func:`table_lines` prints it with the
settings that made it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEMO_RAG",
    "KINDS",
    "RagSettings",
    "build_corpus",
    "compare_arms",
    "compare_rag",
    "held_out_prompts",
    "rare_found",
    "table_lines",
]

EVAL_SEED = 7_777  # as curate demo's held-out prompts: the world's rows use seeds (world seed, 1, row)
KINDS = ("rare", "common")  # the two kinds of held-out prompts
REPORT_FILE = "rag_compare.json"
# The address the world's uids are computed from, whatever port its server got (curate demo's, DEMO_UID_BASE):
# the trainer's shuffle and augmentation are seeded by uid, so port-dependent uids made every run differ.
UID_BASE = "http://world.curate.demo"


@dataclass(frozen=True)
class RagSettings:
    """What one comparison is made with (printed with its table)."""

    rows: int = 1500  # rows of the world before download
    rare: tuple[str, ...] = ("purple",)  # colours or shapes made rare
    rare_share: float = 0.02  # the chance a scene naming one of them is kept
    steps: int = 300  # training steps of every arm
    resolution: int = 32
    k: int = 2  # neighbours per training image and per prompt
    arms: tuple[str, ...] = ("none", "images_and_captions")  # the first is the baseline
    prompts: int = 32  # held-out prompts of each kind (rare, common)
    sample_steps: int = 15  # DDIM steps
    guidance: float = 7.5
    rag_guidance: float = 1.0
    threads: int = 2  # torch threads for generation
    seed: int = 0  # training and sampling seed (the world's is fixed: 0)

    def describe(self) -> str:
        return (
            f"{'/'.join(self.rare)} rare (share {self.rare_share:g}) in a world of {self.rows} rows; "
            f"{self.steps} training steps per arm, seed {self.seed}; {self.prompts} rare + {self.prompts} common "
            f"held-out prompts, k {self.k}, DDIM {self.sample_steps} steps, guidance {self.guidance:g}, "
            f"retrieval guidance {self.rag_guidance:g}"
        )


DEMO_RAG = RagSettings()  # what `curate demo --rag` runs: the settings of the measurement in RESULTS.md


def build_corpus(out: Path, settings: RagSettings, clip: Path | None = None) -> dict[str, Any]:
    """World -> curate run (download + CLIP scores) -> index, under ``out``. ``clip``: a CLIP folder (default:
    the demo CLIP the package ships, unpacked into ``out/models/demo-clip``). Returns paths and counts."""
    import pyarrow.parquet as pq
    import yaml

    from curate.core.config import load_config
    from curate.core.runner import run_pipeline
    from curate.demo.server import WorldServer
    from curate.demo.world import build_world
    from curate.index import Retriever, build_index

    out.mkdir(parents=True, exist_ok=True)
    if clip is None:
        from curate.demo.tiny_clip import unpack

        clip = out / "models" / "demo-clip"
        if not clip.exists():
            unpack(clip)
    world = build_world(
        settings.rows, seed=0, photos=False, rare=settings.rare, rare_share=settings.rare_share
    )
    with WorldServer() as server:
        world.serve(server)
        pq.write_table(world.input_table(server.url, uid_base=UID_BASE), out / "input.parquet")
        doc = {
            "name": "rag-rare",
            "input": {
                "path": str(out / "input.parquet"),
                "url_col": "url",
                "caption_col": "caption",
                "uid_col": "uid",
            },
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
    captions = [c or "" for c in Retriever(out / "index").meta["caption"].to_pylist()]
    words = set(settings.rare)
    rare_rows = sum(bool(words & set(c.replace(",", " ").split())) for c in captions)
    return {
        "run": out / "run",
        "index": out / "index",
        "clip": Path(clip),
        "rows": len(captions),
        "rare_rows": rare_rows,
        "captions": captions,
    }


def held_out_prompts(n: int, rare: tuple[str, ...], seen: set[str]) -> dict[str, list[str]]:
    """``n`` fresh scenes' captions naming a rare word, and ``n`` naming none; none of them a training caption."""
    from curate.demo.world import _random_scene, names_any

    prompts: dict[str, list[str]] = {kind: [] for kind in KINDS}
    i = 0
    while min(len(ps) for ps in prompts.values()) < n:
        scene = _random_scene(np.random.default_rng([EVAL_SEED, i]))
        i += 1
        caption = scene.caption
        if caption in seen or any(caption in ps for ps in prompts.values()):
            continue
        target = prompts["rare" if names_any(scene, rare) else "common"]
        if len(target) < n:
            target.append(caption)
    return prompts


def _train_config(corpus: dict[str, Any], out: Path, arm: str, s: RagSettings) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"rag-{arm}",
        "output": str(out / "train" / arm),
        "seed": s.seed,
        "data": {
            "shards": [str(corpus["run"])],
            "caption": "txt",
            "resolution": s.resolution,
            "shuffle_buffer": 500,
            "workers": 0,
        },
        "model": {
            "unet": {"preset": "tiny"},
            "text_encoder": {"kind": "open_clip", "model": f"local-dir:{corpus['clip']}", "max_tokens": 32},
        },
        "optim": {"lr": 2e-3, "warmup_steps": min(50, s.steps // 4), "batch_size": 32, "ema_decay": 0.995},
        "schedule": {"steps": s.steps, "log_every": 25, "threads": 1},
        "checkpoint": {"every": s.steps},
        "validation": {"every": None, "prompts": [], "clip_score": False},
    }
    if arm != "none":
        raw["model"]["retrieval"] = {"index": str(corpus["index"]), "k": s.k, "condition": arm}
    return raw


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from curate.train.config import parse_train_config
    from curate.train.trainer import train

    lines: list[str] = []
    summary = train(parse_train_config(raw), say=lines.append, progress=False)
    return {"output": raw["output"], "seconds": summary["seconds"]}


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


def _evaluate_arm(
    output: str, arm: str, index: Path, prompts: dict[str, list[str]], s: RagSettings
) -> dict[str, Any]:
    import torch

    from curate.demo.adherence import adherence_of
    from curate.train.generate import load_generator
    from curate.train.retrieval import generation_neighbours

    torch.set_num_threads(s.threads)
    gen, _ = load_generator(output)
    result: dict[str, Any] = {}
    for kind, ps in prompts.items():
        nb = generation_neighbours(gen, index, ps) if arm != "none" else None
        images = gen.sample(
            ps,
            neighbours=nb,
            guidance=s.guidance,
            rag_guidance=s.rag_guidance,
            steps=s.sample_steps,
            seed=s.seed,
        )
        scores = adherence_of(images, ps)
        result[kind] = {
            "n": len(ps),
            **{k: scores[k] for k in ("adherence", "background", "colours", "shapes")},
            "per_prompt": scores["per_prompt"],
        }
        if kind == "rare":
            found = [rare_found(img, p, s.rare) for img, p in zip(images, ps, strict=True)]
            result[kind].update(rare_found=float(np.mean(found)), per_prompt_found=found)
    return result


def compare_arms(
    corpus: dict[str, Any],
    out: Path,
    settings: RagSettings,
    say: Callable[[str], None] = print,
    side_by_side: bool = True,
) -> dict[str, Any]:
    """Train every arm on ``corpus`` (from :func:`build_corpus`) into ``out/train/<arm>``, score each on the
    held-out prompts and compare it with the first arm. Returns the report (see :func:`compare_rag`).
    ``side_by_side``: the arms train at once, a process each; else one after the other in this process (the
    same models: one thread each either way; for tests, where starting processes costs more than 5 steps)."""
    from curate.demo.train_compare import paired_interval

    started = time.perf_counter()
    prompts = held_out_prompts(settings.prompts, settings.rare, set(corpus["captions"]))
    configs = [_train_config(corpus, out, arm, settings) for arm in settings.arms]
    say(
        f"training {len(configs)} arms ({', '.join(settings.arms)}) {'side by side' if side_by_side else 'in turn'} "
        f"for {settings.steps} steps, seed {settings.seed}"
    )
    if side_by_side:
        with mp.get_context("spawn").Pool(len(configs)) as pool:
            trained = pool.map(_train, configs)
    else:
        trained = [_train(c) for c in configs]
    say(f"generating {sum(map(len, prompts.values()))} held-out prompts with each arm")
    results = {
        arm: {**t, **_evaluate_arm(t["output"], arm, corpus["index"], prompts, settings)}
        for arm, t in zip(settings.arms, trained, strict=True)
    }
    base = settings.arms[0]
    for arm, r in results.items():
        if arm != base:
            for kind in KINDS:
                r[kind]["vs_" + base] = paired_interval(
                    r[kind]["per_prompt"], results[base][kind]["per_prompt"]
                )
    return {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "corpus_rows": corpus["rows"],
        "rare_rows": corpus["rare_rows"],
        "prompts": prompts,
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def compare_rag(
    out: str | Path,
    settings: RagSettings = DEMO_RAG,
    clip: str | Path | None = None,
    say: Callable[[str], None] = print,
    side_by_side: bool = True,
) -> dict[str, Any]:
    """Build the rare-concept corpus in ``out``, train and score every arm, write ``out/rag_compare.json``.

    The report: ``settings``, ``corpus_rows`` (indexed), ``rare_rows`` (of them naming a rare word),
    ``prompts`` ({kind: [prompt]}), ``results`` ({arm: {output, seconds, rare: {...}, common: {...}}}, each kind
    with ``n``, ``adherence``, ``background``, ``colours``, ``shapes``, ``per_prompt``; ``rare`` also
    ``rare_found`` and ``per_prompt_found``; the arms after the first ``vs_<first arm>``: the paired interval of
    the adherence difference), ``seconds``."""
    out = Path(out)
    started = time.perf_counter()
    say(f"retrieval on a rare concept: {settings.describe()}; in {out}")
    corpus = build_corpus(out, settings, Path(clip) if clip else None)
    say(f"corpus: {corpus['rows']} indexed rows, {corpus['rare_rows']} name {'/'.join(settings.rare)}")
    report = compare_arms(corpus, out, settings, say, side_by_side)
    report["seconds"] = time.perf_counter() - started
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def table_lines(report: dict[str, Any]) -> list[str]:
    """The comparison as aligned plain lines: per kind of prompt each arm's adherence, each later arm's
    difference to the first with its interval, and the rare prompts' ``rare found``; headed by its settings."""
    s = RagSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["settings"].items()})
    results = report["results"]
    base, others = s.arms[0], s.arms[1:]
    width = max(10, *(len(a) for a in s.arms))
    lines = [
        f"retrieval vs none on a rare concept ({report['rare_rows']} of {report['corpus_rows']} indexed rows name "
        f"{'/'.join(s.rare)}): {s.describe()}; {report['seconds']:.0f}s",
        f"  {'prompts':<20}{'n':>4}  "
        + "".join(f"{a:>{width}}  " for a in s.arms)
        + "".join(f"{a + ' - ' + base:>{len(a) + len(base) + 3}}  95% interval" for a in others),
    ]
    rows = [(f"{kind} adherence", kind, "adherence") for kind in KINDS] + [
        ("rare found", "rare", "rare_found")
    ]
    for label, kind, key in rows:
        n = results[base][kind]["n"]
        line = f"  {label:<20}{n:>4}  " + "".join(f"{results[a][kind][key]:>{width}.3f}  " for a in s.arms)
        if key == "adherence":
            for a in others:
                iv = results[a][kind].get("vs_" + base) or {}
                if iv:
                    cell = f"{iv['diff']:+.3f}"
                    line += f"{cell:>{len(a) + len(base) + 3}}  {iv['low']:+.3f} to {iv['high']:+.3f}"
        lines.append(line.rstrip())
    lines.append(
        "  (adherence: the world's exact analyser, mean of background, colours and shapes; rare found: the share "
        "of rare prompts whose image shows every rare word; interval: paired bootstrap over the prompts, one "
        "training seed)"
    )
    return lines
