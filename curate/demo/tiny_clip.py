"""Train a small open_clip model on the sample world's scenes, for a demo that cannot download a real CLIP.

The model learns only what the world draws (eight colours, five shapes, a background), which is enough for the
demo's ``clip_score`` stage to tell a scene's own caption from another scene's. Training scenes come from the
world's own scene generator, with random generators seeded apart from ``build_world``'s, and go through what the
demo's download does to an image (centre crop to a square, resize to 256 px, JPEG re-encode), so that scores
on downloaded images mean what they mean on the training images.

Each batch holds pairs of scenes that differ in one attribute only (the background, or a shape's colour or
kind, for a shape the crop keeps), as hard negatives: some of the world's mismatched captions differ from
the true one in little more. On the world itself they change little (its mismatched captions are mostly
another background), but they make one-attribute differences easier to see (pair accuracy 0.85 against 0.83
without them, at the default settings).

The folder written loads with ``open_clip.create_model_and_transforms("local-dir:<folder>")``; the threshold
calibrated on held-out scenes is in ``curate_calibration.json``.

The package ships the model trained with the defaults (``shipped_folder()``, made by ``pack``), so that the demo does
not spend two minutes training it on first use. It is small because almost all of the model is the token
embedding of open_clip's 49,408-token vocabulary, and training moves only the rows of tokens its captions use
(embeddings take no weight decay, and AdamW leaves a parameter with a zero gradient where it is): the package
keeps those rows and every other parameter, and ``unpack`` rebuilds the rest from the seeded initialisation,
checking the whole state against the trained model's SHA-256 before it writes anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from curate.demo.world import COLOURS, NOISE_RATES, SHAPES, _draw, _encode, _random_scene, _Scene, _Shape
from curate.kit.imaging import ImageOptions, resize

__all__ = ["MODEL_CFG", "pack", "shipped_folder", "train_tiny_clip", "unpack"]

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "patch_size": 8, "head_width": 32},
    # vocab_size is that of open_clip's bundled BPE tokenizer, which the loaded model uses.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CALIBRATION_FILE = "curate_calibration.json"
# The trained model as the package ships it (see ``pack``): trained parameters and the moved token rows.
SHIPPED_WEIGHTS = "trained.safetensors"
_ROWS, _VALUES = "token_embedding.rows", "token_embedding.values"
_EMBEDDING_TABLE = "token_embedding.weight"

# What the demo's download does to every image before it is scored.
_DOWNLOAD = ImageOptions(image_size=256, resize_mode="center_crop")
_POOL_PAIRS_PER_STEP = 12  # scene pairs drawn per training step: ~5 epochs over them at batch 128
_LR, _WEIGHT_DECAY, _WARMUP = 2e-3, 0.1, 0.1
# Odds of changing the background, a shape's colour, a shape's kind in a batch's hard negatives. Random
# negatives already teach backgrounds; the world's hard cases share the background and differ in shapes.
_CHANGE_ODDS = (0.2, 0.4, 0.4)
_HELDOUT_SCENES = 1000
# Seed streams, apart from build_world's ([seed, 0], [seed, 1, row], [seed, 2]).
_TRAIN_STREAM, _HELDOUT_STREAM, _ORDER_STREAM, _PICK_STREAM = 7, 8, 9, 10


def train_tiny_clip(
    output: str | os.PathLike,
    *,
    steps: int = 450,
    batch_size: int = 128,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train, calibrate and save the model to ``output``; returns what ``curate_calibration.json`` holds.

    About 130 s with the defaults on two idle CPU cores (35 s drawing scenes, 85 s training, 10 s
    calibrating). The same seed and ``threads`` give the same weights. ``progress(step, steps, loss)`` is called every ten steps and after the last.
    """
    import open_clip
    import torch

    if steps < 1 or batch_size < 4:
        raise ValueError(f"need steps >= 1 and batch_size >= 4, got steps={steps}, batch_size={batch_size}")
    started = time.perf_counter()
    threads = threads or 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        size = MODEL_CFG["vision_cfg"]["image_size"]
        # What open_clip.get_tokenizer("local-dir:<output>") gives back when the model is loaded.
        tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=MODEL_CFG["text_cfg"]["context_length"]
        )
        images, captions = _pool(seed, max(batch_size, steps * _POOL_PAIRS_PER_STEP), size, threads)
        model = open_clip.CLIP(**MODEL_CFG)
        _train(model, images, tokenizer(captions), _batches(captions, batch_size, steps, seed), progress)
        calibration = _calibrate(model, tokenizer, seed, size, threads)
    finally:
        torch.set_num_threads(previous_threads)
    result = {
        **calibration,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - started, 1),
        "seed": seed,
    }
    _save(Path(output), model, result)
    return result


def _save(folder: Path, model: Any, calibration: dict) -> None:
    """The hub layout that ``local-dir:<folder>`` loads, plus the calibration."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (folder / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")


def shipped_folder() -> Path:
    """The package folder that holds the shipped demo CLIP (``pack``'s output)."""
    from importlib.resources import files

    return Path(str(files("curate.demo") / "demo_clip"))


def _initial_state(seed: int) -> dict[str, Any]:
    """The model's parameters before training, as ``train_tiny_clip`` starts them with ``seed``."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.CLIP(**MODEL_CFG).state_dict()


def _state_sha256(state: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def pack(trained: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Write the model ``train_tiny_clip`` saved in ``trained`` to ``dest`` as the package ships it: every
    parameter but the token embedding, the token rows training moved, and the calibration with the whole
    state's SHA-256. Returns the calibration written."""
    from safetensors.torch import load_file, save_file

    trained, dest = Path(trained), Path(dest)
    state = load_file(trained / WEIGHTS_FILE)
    calibration = json.loads((trained / CALIBRATION_FILE).read_text())
    initial = _initial_state(int(calibration["seed"]))
    moved = (state[_EMBEDDING_TABLE] != initial[_EMBEDDING_TABLE]).any(dim=1).nonzero().flatten()
    packed = {name: tensor for name, tensor in state.items() if name != _EMBEDDING_TABLE}
    packed[_ROWS] = moved.contiguous()
    packed[_VALUES] = state[_EMBEDDING_TABLE][moved].contiguous()
    calibration = {**calibration, "state_sha256": _state_sha256(state), "moved_token_rows": len(moved)}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(packed, dest / SHIPPED_WEIGHTS)
    (dest / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
    return calibration


def unpack(output: str | os.PathLike, source: str | os.PathLike | None = None) -> dict:
    """Rebuild the packed model from ``source`` (default: the shipped one) into ``output``, in the layout
    ``train_tiny_clip`` writes. Raises ``ValueError``, writing nothing, when the rebuilt state is not the
    trained one (for example a torch release that initialises differently): train it instead."""
    from safetensors.torch import load_file

    source = Path(source) if source is not None else shipped_folder()
    calibration = json.loads((source / CALIBRATION_FILE).read_text())
    packed = load_file(source / SHIPPED_WEIGHTS)
    state = _initial_state(int(calibration["seed"]))
    rows, values = packed.pop(_ROWS), packed.pop(_VALUES)
    state[_EMBEDDING_TABLE][rows] = values
    for name, tensor in packed.items():
        state[name] = tensor
    if _state_sha256(state) != calibration["state_sha256"]:
        raise ValueError(
            f"the demo CLIP rebuilt from {source} differs from the trained one (state SHA-256 mismatch); "
            "train it with `curate models train-demo-clip`"
        )
    import open_clip

    model = open_clip.CLIP(**MODEL_CFG)
    model.load_state_dict(state)
    _save(Path(output), model, calibration)
    return calibration


def _train(
    model: Any,
    images: Any,
    tokens: Any,
    batches: list[np.ndarray],
    progress: Callable[[int, int, float], None] | None,
) -> None:
    """AdamW on open_clip's ClipLoss, with warm-up and cosine decay; leaves the model in eval mode."""
    import torch
    from open_clip.loss import ClipLoss

    # No weight decay on gains, biases, embeddings and the temperature, as in open_clip's trainer.
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}], lr=_LR
    )
    loss_fn = ClipLoss()
    jitter = torch.Generator().manual_seed(torch.initial_seed())
    steps = len(batches)
    model.train()
    for step, index in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps)
        image_features, text_features, logit_scale = model(_augment(images[index], jitter), tokens[index])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # as in CLIP: a temperature above 100 makes training unstable
            model.logit_scale.clamp_(0, math.log(100))
        if progress is not None and (step % 10 == 0 or step == steps - 1):
            progress(step + 1, steps, loss.item())
    model.eval()


# --- training data -----------------------------------------------------------------------------------


def _pool(seed: int, n_pairs: int, size: int, threads: int) -> tuple[Any, list[str]]:
    """``2 * n_pairs`` images as a uint8 [n, 3, size, size] tensor and their captions; rows 2k and 2k+1 are
    a scene and its variant with one attribute changed."""
    import torch

    def pair(i: int) -> tuple[list[np.ndarray], list[str]]:
        rng = np.random.default_rng([seed, _TRAIN_STREAM, i])
        scene = _random_scene(rng)
        other = _variant(scene, rng)
        quality = int(rng.integers(70, 96))
        draw_seed = int(rng.integers(2**32))
        # The same grain for both: they differ in the changed attribute only.
        pixels = [
            _augmented(_downloaded(s, draw_seed, quality, served=False), size, rng) for s in (scene, other)
        ]
        return pixels, [scene.caption, other.caption]

    # PIL and numpy let go of the GIL for the heavy parts: threads overlap the drawing.
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pairs = list(pool.map(pair, range(n_pairs)))
    images = torch.from_numpy(np.stack([p for pixels, _ in pairs for p in pixels]))
    return images, [c for _, caps in pairs for c in caps]


def _downloaded(scene: _Scene, draw_seed: int, quality: int = 95, served: bool = True) -> Image.Image:
    """The scene as the demo stores it: drawn (and, if ``served``, encoded as the world serves it), then
    centre-cropped, resized to 256 px and re-encoded as JPEG."""
    img = _draw(scene, np.random.default_rng(draw_seed))
    if served:  # training skips it: at 64 px its artefacts are lost under the second JPEG's
        img = Image.open(io.BytesIO(_encode(img, scene.format))).convert("RGB")
    buf = io.BytesIO()
    resize(img, _DOWNLOAD).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _augmented(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """``_pixels`` of a slightly different crop, with mild brightness and contrast changes: nothing that
    makes a caption false (no colour shifts, no flips that would matter; a crop of up to 6 % per side keeps
    every shape the centre crop kept)."""
    w, h = img.size
    cut = rng.uniform(0, 0.06, size=4) * np.array([w, h, w, h])
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(cut[0], cut[1], w - cut[2], h - cut[3]))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.92, 1.08)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.92, 1.08)))
    return np.asarray(img, np.uint8).transpose(2, 0, 1).copy()


def _pixels(img: Image.Image, size: int) -> np.ndarray:
    """uint8 CHW at the model's input size, resized as open_clip's eval transform does (bicubic)."""
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8).transpose(2, 0, 1).copy()


def _augment(images: Any, generator: Any) -> Any:
    """uint8 images -> model input, each with a small gain of its own (the pool is reused across epochs)."""
    import torch

    gain = 1 + 0.04 * (2 * torch.rand(images.shape[0], 1, 1, 1, generator=generator) - 1)
    return _normalise((images.float() * gain).clamp_(0, 255))


def _normalise(images: Any) -> Any:
    """[n, 3, h, w] pixel values in 0..255 -> the model's input, normalised as open_clip's transform does."""
    import torch

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _variant(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """The scene with one attribute changed: the background, or one shape's colour or kind."""
    first = int(rng.choice(3, p=_CHANGE_ODDS))
    for what in (first, (first + 1) % 3, (first + 2) % 3):  # the drawn change, else another that exists
        options = _changes(scene, what)
        if options:
            return options[int(rng.integers(len(options)))]
    return scene  # unreachable: another background is always free (at most 3 shapes of 8 colours)


def _changes(scene: _Scene, what: int) -> list[_Scene]:
    """Every scene with the background (0), one shape's colour (1) or one shape's kind (2) changed, where
    the caption stays a valid world caption (no shape the background's colour, no repeated shape). Only
    shapes that the centre crop keeps change: a change to a shape cropped away is no difference."""
    shapes = scene.shapes
    if what == 0:
        used = {s.colour for s in shapes}
        return [
            dataclasses.replace(scene, background=c) for c in COLOURS if c not in used | {scene.background}
        ]
    taken = {(s.kind, s.colour) for s in shapes}
    out = []
    for k, s in enumerate(shapes):
        if not _kept(scene, s):
            continue
        if what == 1:
            new = [dataclasses.replace(s, colour=c) for c in COLOURS if c not in (scene.background, s.colour)]
        else:
            new = [dataclasses.replace(s, kind=t) for t in SHAPES if t != s.kind]
        out += [
            dataclasses.replace(scene, shapes=(*shapes[:k], n, *shapes[k + 1 :]))
            for n in new
            if (n.kind, n.colour) not in taken
        ]
    return out


def _kept(scene: _Scene, shape: _Shape) -> bool:
    """Whether most of the shape (3/4 of its bounding box) lies inside the centred square of the download."""
    side = min(scene.width, scene.height)
    x0, y0 = (scene.width - side) / 2, (scene.height - side) / 2
    inside_x = min(shape.cx + shape.r, x0 + side) - max(shape.cx - shape.r, x0)
    inside_y = min(shape.cy + shape.r, y0 + side) - max(shape.cy - shape.r, y0)
    return max(inside_x, 0) * max(inside_y, 0) >= 0.75 * (2 * shape.r) ** 2


def _batches(captions: list[str], batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """Row indices of each step's batch: whole pairs, in a new order every epoch, without two rows of the
    same caption in a batch (ClipLoss would count the other one as a wrong answer)."""
    rng = np.random.default_rng([seed, _ORDER_STREAM])
    n_pairs, per_batch = len(captions) // 2, batch_size // 2
    batches: list[np.ndarray] = []
    queue: list[int] = []
    while len(batches) < steps:
        if len(queue) < per_batch:
            queue += [int(i) for i in rng.permutation(n_pairs)]
        chosen, seen, later = [], set(), []
        while queue and len(chosen) < per_batch:
            p = queue.pop(0)
            caps = (captions[2 * p], captions[2 * p + 1])
            if seen.isdisjoint(caps):
                chosen.append(p)
                seen.update(caps)
            else:
                later.append(p)
        queue = later + queue
        batches.append(np.array([r for p in chosen for r in (2 * p, 2 * p + 1)]))
    return batches


def _lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(_WARMUP * steps))
    if step < warmup:
        return _LR * (step + 1) / warmup
    return _LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --- calibration -------------------------------------------------------------------------------------


def _calibrate(model: Any, tokenizer: Any, seed: int, size: int, threads: int) -> dict:
    """The threshold on held-out scenes: every scene scored against its own caption and against the
    caption of another held-out scene that says something else, as the world's mismatched rows are made.
    Precision is given at the world's share of mismatched captions."""
    import torch

    def image(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, _HELDOUT_STREAM, i])
        scene = _random_scene(rng)
        return _pixels(_downloaded(scene, int(rng.integers(2**32))), size)

    scenes = [
        _random_scene(np.random.default_rng([seed, _HELDOUT_STREAM, i])) for i in range(_HELDOUT_SCENES)
    ]
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(image, range(_HELDOUT_SCENES)))
    pick = np.random.default_rng([seed, _PICK_STREAM])
    others = []
    for s in scenes:
        candidates = [o.caption for o in scenes if o.caption != s.caption]
        others.append(candidates[int(pick.integers(len(candidates)))])
    with torch.inference_mode():
        img = model.encode_image(_normalise(torch.from_numpy(np.stack(images))), normalize=True)
        own = model.encode_text(tokenizer([s.caption for s in scenes]), normalize=True)
        wrong = model.encode_text(tokenizer(others), normalize=True)
    true_scores, wrong_scores = (img * own).sum(1).numpy(), (img * wrong).sum(1).numpy()
    share = NOISE_RATES["mismatched_caption"]
    threshold, precision, recall = _best_threshold(true_scores, wrong_scores, share)
    return {
        "threshold": round(threshold, 6),
        "heldout_precision": round(precision, 4),
        "heldout_recall": round(recall, 4),
        "heldout_pairs": len(scenes),
        "mismatch_share": share,
    }


def _best_threshold(
    true_scores: np.ndarray, wrong_scores: np.ndarray, share: float
) -> tuple[float, float, float]:
    """(threshold, precision, recall) of "score < threshold" as a detector of wrong captions, at the
    threshold of the best F1 where a ``share`` of all pairs are wrong (precision weighs the two sets so)."""
    candidates = np.unique(np.concatenate([true_scores, wrong_scores]))
    # Midpoints between neighbouring scores, and one past the top, so every split is reachable.
    cuts = np.concatenate([(candidates[:-1] + candidates[1:]) / 2, [candidates[-1] + 1e-6]])
    best = (float("-inf"), 0.0, 0.0, 0.0)
    for cut in cuts:
        recall = float(np.mean(wrong_scores < cut))
        false_rate = float(np.mean(true_scores < cut))
        flagged = share * recall + (1 - share) * false_rate
        precision = share * recall / flagged if flagged > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        if f1 > best[0]:
            best = (f1, float(cut), precision, recall)
    return best[1], best[2], best[3]
