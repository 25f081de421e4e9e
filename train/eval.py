"""``curate eval``: a GenEval-style evaluation of a checkpoint on a compositional prompt suite.

    curate eval OUT                                   the shipped "geneval" suite, CLIPScore (+ VQAScore when
                                                      the training config has validation.vqa_model)
    curate eval OUT --suite world --vqa-model M -n 4  the sample world's suite, also scored exactly

CLIPScore reads a prompt as a bag of words, so it cannot tell "a red cube and a blue ball" from its swap;
GenEval (Ghosh et al. 2023) splits compositional skill into six tasks (single object, two objects, counting,
colours, position, attribute binding) and scores each on its own. Here every prompt of a suite is generated
``images_per_prompt`` times with curate's own sampler (:func:`curate.train.generate.load_generator`: the EMA
weights when there are any, no retrieval neighbours), and each image is scored with:

- ``clip_score``: 100 * max(cos, 0) with the checkpoint's CLIP (the text encoder's, as validation does);
  absent when the text encoder is not an open_clip model;
- every prompt scorer the caller gives (``curate eval`` gives VQAScore as ``vqa_score``);
- every *exact* scorer the caller gives (``curate eval`` gives the sample world's analyser as ``adherence``
  for a suite that asks for it, ``"exact": "world"``). The trainer knows none of its own, so it never
  imports the demo. Where an exact score exists, the learned ones are checked against it: per category, the
  Pearson correlation over images, and for scores in [0, 1] (VQAScore) the share of images where
  ``score >= 0.5`` agrees with ``exact == 1``.

A suite is JSONL in GenEval's metadata format: one ``{"tag": ..., "prompt": ...}`` per line (other keys,
such as GenEval's ``include``, are kept but not read), the tag one of :data:`CATEGORIES`; a first line
without a prompt is the header (``suite``, ``source``, ``exact``). Shipped suites live in
``pipelines/eval_suites/`` (installed as ``curate.pipelines``); a GenEval ``evaluation_metadata.jsonl`` loads
as it is.

Output (``out``): ``images/<category>/<prompt>-<sample>.png``, ``eval.json`` (settings, per-category and
overall means, the agreement, every image's scores) and ``eval.html`` (the per-category table and a grid of
samples per category).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CATEGORIES", "Suite", "SuiteError", "evaluate", "load_suite", "shipped_suites", "write_html"]

# GenEval's tags, in its order, and what the pages call them.
CATEGORIES = {
    "single_object": "single object",
    "two_object": "two objects",
    "counting": "counting",
    "colors": "colours",
    "position": "position",
    "color_attr": "attribute binding",
}
DECISION_THRESHOLD = {"vqa_score": 0.5}  # a score in [0, 1] read as "the image shows the prompt"
EXACT_SCORERS = ("world",)  # what a suite's "exact" may ask for; the caller supplies the scorer

# Images and their prompts -> {"per_prompt": [one score per image (None: not scored)], ...}.
PromptScorer = Callable[[list[Image.Image], list[str]], dict[str, Any]]


class SuiteError(ValueError):
    """A suite that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    prompts: tuple[tuple[str, str], ...]  # (category, prompt), in file order
    exact: str | None = None  # the exact analyser the prompts are written for ("world")

    @property
    def categories(self) -> list[str]:
        """The categories present, in :data:`CATEGORIES` order."""
        present = {c for c, _ in self.prompts}
        return [c for c in CATEGORIES if c in present]


def _suites_folder() -> Path:
    from importlib.resources import files

    return Path(str(files("curate.pipelines") / "eval_suites"))


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in _suites_folder().glob("*.jsonl"))


def load_suite(name_or_file: str | Path) -> Suite:
    """A shipped suite by name ("geneval", "world") or a JSONL file of that format; SuiteError when bad."""
    path = Path(name_or_file)
    if not path.suffix and not path.exists():
        path = _suites_folder() / f"{name_or_file}.jsonl"
        if not path.exists():
            raise SuiteError(
                f"no suite {str(name_or_file)!r}: give a JSONL file or one of {', '.join(shipped_suites())}"
            )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"suite {path}: {e}") from None
    header: dict[str, Any] = {}
    prompts: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"suite {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SuiteError(f"{where}: a line must be a JSON object")
        if "prompt" not in row and not prompts and not header:
            header = row
            continue
        prompt, tag = row.get("prompt"), row.get("tag")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SuiteError(f"{where}: no prompt (a non-empty string under 'prompt')")
        if tag not in CATEGORIES:
            raise SuiteError(f"{where}: tag {tag!r} is not a category; one of {', '.join(CATEGORIES)}")
        prompts.append((tag, prompt.strip()))
    if not prompts:
        raise SuiteError(f"suite {path}: no prompts")
    exact = header.get("exact")
    if exact is not None and exact not in EXACT_SCORERS:
        raise SuiteError(
            f"suite {path}: exact {exact!r} is not an analyser; one of {', '.join(EXACT_SCORERS)}"
        )
    return Suite(str(header.get("suite", path.stem)), str(header.get("source", "")), tuple(prompts), exact)


# --- scoring ---------------------------------------------------------------------------------------------


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _pearson(a: list[float | None], b: list[float | None]) -> float | None:
    pairs = np.array(
        [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None], np.float64
    )
    if len(pairs) < 2 or pairs[:, 0].std() == 0 or pairs[:, 1].std() == 0:
        return None  # undefined: too few images, or one score constant
    return float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])


def _agreement(learned: str, values: list[float | None], exact: list[float | None]) -> dict[str, Any]:
    both = [(x, y) for x, y in zip(values, exact, strict=True) if x is not None and y is not None]
    out: dict[str, Any] = {"n": len(both), "pearson": _pearson(values, exact)}
    if learned in DECISION_THRESHOLD and both:
        t = DECISION_THRESHOLD[learned]
        out[f"decision_agreement@{t}"] = float(np.mean([(x >= t) == (y == 1) for x, y in both]))
    return out


def _summary(
    rows: list[dict[str, Any]], learned: list[str], exact: list[str], prompts: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"prompts": prompts, "n": len(rows)}
    for key in (*learned, *exact):
        out[key] = _mean([r[key] for r in rows])
    for key in exact:
        scored = [r[key] for r in rows if r[key] is not None]
        out[f"{key}_correct"] = float(np.mean([v == 1 for v in scored])) if scored else None
    if exact:
        out["agreement"] = {
            f"{a}~{e}": _agreement(a, [r[a] for r in rows], [r[e] for r in rows])
            for a in learned
            for e in exact
        }
    return out


def _per_image(name: str, scorer: PromptScorer, images: list[Image.Image], prompts: list[str]) -> list:
    result = scorer(images, prompts)
    values = result.get("per_prompt")
    if values is None or len(values) != len(images):
        raise ValueError(f"the scorer {name!r} gave no score per image (per_prompt)")
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


def evaluate(
    checkpoint: str | Path,
    suite: Suite,
    out: str | Path,
    *,
    images_per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 3.0,
    sampler: str = "ddim",
    seed: int = 0,
    device: str = "cpu",
    scorers: dict[str, PromptScorer] | None = None,
    exact: dict[str, PromptScorer] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Generate the suite's images into ``out``, score them, write ``eval.json`` and ``eval.html``; returns
    what ``eval.json`` holds."""
    from curate.train.generate import load_generator
    from curate.train.metrics import clip_score

    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1, got {images_per_prompt}")
    scorers, exact = dict(scorers or {}), dict(exact or {})
    folder = Path(out)
    gen, state = load_generator(checkpoint, device)
    prompts = [p for _, p in suite.prompts for _ in range(images_per_prompt)]
    say(
        f"generating {len(prompts)} images ({len(suite.prompts)} prompts x {images_per_prompt}) from {state['path']}"
    )
    arrays = gen.sample(prompts, guidance=guidance, steps=steps, sampler=sampler, seed=seed, device=device)
    rows: list[dict[str, Any]] = []
    for i, array in enumerate(arrays):
        index, sample = divmod(i, images_per_prompt)
        category = suite.prompts[index][0]
        rel = Path("images") / category / f"{index:04d}-{sample:02d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / rel)
        rows.append(
            {"category": category, "prompt": prompts[i], "index": index, "sample": sample, "path": str(rel)}
        )
    images = [Image.fromarray(a) for a in arrays]

    learned: list[str] = []
    models: dict[str, str] = {}
    clip = gen.text.clip
    if clip is not None:
        img_emb = clip.encode_images([clip.preprocess(im) for im in images])
        txt_emb = clip.encode_texts(prompts)
        for row, a, b in zip(rows, img_emb, txt_emb, strict=True):
            row["clip_score"] = clip_score(a, b)
        learned.append("clip_score")
        models["clip_score"] = getattr(clip, "name", "clip")
    for key, scorer in scorers.items():
        say(f"scoring with {key}")
        for row, v in zip(rows, _per_image(key, scorer, images, prompts), strict=True):
            row[key] = v
        learned.append(key)
        models[key] = getattr(scorer, "name", key)
    for key, scorer in exact.items():
        for row, v in zip(rows, _per_image(key, scorer, images, prompts), strict=True):
            row[key] = v
    exact_keys = list(exact)

    counts = {c: sum(cat == c for cat, _ in suite.prompts) for c in suite.categories}
    result = {
        "suite": suite.name,
        "source": suite.source,
        "checkpoint": state["path"],
        "step": state["step"],
        "settings": {
            "images_per_prompt": images_per_prompt,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler,
            "seed": seed,
        },
        "metrics": learned,
        "exact": exact_keys,
        "models": models,
        "categories": {
            c: {
                "label": CATEGORIES[c],
                **_summary([r for r in rows if r["category"] == c], learned, exact_keys, counts[c]),
            }
            for c in suite.categories
        },
        "overall": _summary(rows, learned, exact_keys, len(suite.prompts)),
        "images": rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / "eval.json")
    write_html(result, folder)
    return result


# --- the page ------------------------------------------------------------------------------------------


def _thumb(path: Path, side: int = 128) -> bytes | None:
    """A PNG of the image scaled so its longer side is ``side`` (pixels kept sharp when enlarging)."""
    try:
        im = Image.open(path).convert("RGB")
    except OSError:
        return None
    scale = side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def write_html(result: dict[str, Any], folder: str | Path) -> Path:
    """``eval.html`` beside ``eval.json``: the per-category table, the agreement with the exact scores, and a
    grid of samples per category (thumbnails inline, so the page opens anywhere)."""
    from curate.tools import html_page as h

    folder = Path(folder)
    learned, exact = result["metrics"], result["exact"]
    keys = [*learned, *exact, *(f"{e}_correct" for e in exact)]
    s = result["settings"]
    body = [
        f"<p>{h.escape(result['checkpoint'])} (step {result['step']}); {s['images_per_prompt']} image(s) per "
        f"prompt, {s['steps']} {h.escape(s['sampler'])} steps, guidance {s['guidance']}, seed {s['seed']}. "
        f"Models: {h.escape(', '.join(f'{k}: {v}' for k, v in result['models'].items()) or 'none')}.</p>",
        f"<p class='note'>Suite source: {h.escape(result['source'] or 'not stated')}</p>",
        "<h2>per category</h2>",
    ]
    rows = [
        [cat["label"], cat["prompts"], cat["n"], *(cat[k] for k in keys)]
        for cat in [*result["categories"].values(), {"label": "overall", **result["overall"]}]
    ]
    body.append(h.table(["category", "prompts", "images", *keys], rows, right=set(range(1, 3 + len(keys)))))
    if exact:
        pairs = list(result["overall"]["agreement"])
        cols = sorted({k for p in pairs for k in result["overall"]["agreement"][p]} - {"n"})
        body.append("<h2>agreement with the exact scores, per image</h2>")
        rows = [
            [cat["label"], pair, *(cat["agreement"][pair].get(c) for c in cols), cat["agreement"][pair]["n"]]
            for cat in [*result["categories"].values(), {"label": "overall", **result["overall"]}]
            for pair in pairs
        ]
        body.append(h.table(["category", "learned~exact", *cols, "images"], rows, right={2, 3, 4}))
    for key, cat in result["categories"].items():
        body.append(f"<h2>{h.escape(cat['label'])}</h2><div class='grid'>")
        for row in (r for r in result["images"] if r["category"] == key):
            scores = " · ".join(f"{k} {h.number(row.get(k))}" for k in (*learned, *exact))
            body.append(
                h.card(_thumb(folder / row["path"]), [("cap", row["prompt"]), ("score", scores)], row["path"])
            )
        body.append("</div>")
    target = folder / "eval.html"
    tmp = folder / "eval.html.tmp"
    tmp.write_text(h.page(f"evaluation: {result['suite']}", body), encoding="utf-8")
    tmp.replace(target)
    return target
