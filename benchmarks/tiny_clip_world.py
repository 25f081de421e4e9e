"""How well the demo's tiny CLIP finds the sample world's mismatched captions, at its calibrated threshold.

Trains the model (or loads one already trained with ``--model``), builds the world, takes its ``clean`` and
``mismatched_caption`` rows, prepares each image as the demo's download does (centre crop, 256 px, JPEG q95),
scores image against caption through :class:`curate.models.clip.ClipModel` and reports precision and recall
of "score < threshold" as the detector of mismatched captions. The threshold is the one calibrated on
held-out generated scenes, never one tuned on the world. Not part of the test run.

    python benchmarks/tiny_clip_world.py                 # train with the defaults, then measure
    python benchmarks/tiny_clip_world.py --model DIR     # measure a model trained before
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from curate.demo.tiny_clip import CALIBRATION_FILE, train_tiny_clip
from curate.demo.world import build_world
from curate.kit.imaging import ImageOptions, process
from curate.models.clip import ClipModel

DOWNLOAD = ImageOptions(image_size=256, resize_mode="center_crop", encode_quality=95)


def world_scores(model_dir: Path, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is_mismatched) over the world's clean and mismatched_caption rows."""
    world = build_world(size, seed=seed)
    rows = [t for t in world.truth if t["kind"] in ("clean", "mismatched_caption")]
    model = ClipModel.load(f"local-dir:{model_dir}", "random")
    scores = []
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        images = []
        for t in chunk:
            done = process(world.files[t["path"]][0], DOWNLOAD)
            images.append(model.preprocess(Image.open(io.BytesIO(done.image)).convert("RGB")))
        img = model.encode_images(images)
        txt = model.encode_texts([t["caption"] for t in chunk])
        scores.append((img * txt).sum(axis=1))
    return np.concatenate(scores), np.array([t["kind"] == "mismatched_caption" for t in rows])


def report(step: int, steps: int, loss: float) -> None:
    if step % 50 == 0 or step == steps:
        print(f"step {step}/{steps} loss {loss:.3f}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a folder written by train_tiny_clip; default: train one")
    ap.add_argument("--steps", type=int, help="training steps (default: train_tiny_clip's)")
    ap.add_argument("--batch-size", type=int, help="training batch (default: train_tiny_clip's)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--world-size", type=int, default=2000)
    ap.add_argument("--world-seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or Path(tmp) / "tiny_clip"
        if args.model is None:
            options = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v}
            started = time.perf_counter()
            train_tiny_clip(model_dir, seed=args.seed, progress=report, **options)
            print(f"trained in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        calibration = json.loads((model_dir / CALIBRATION_FILE).read_text())
        scores, mismatched = world_scores(model_dir, args.world_size, args.world_seed)

    flagged = scores < calibration["threshold"]
    hits = int((flagged & mismatched).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(int(mismatched.sum()), 1)
    print(
        f"steps      {calibration['steps']} (batch {calibration.get('batch_size')}, seed {calibration['seed']})"
    )
    print(f"seconds    {calibration['seconds']}")
    print(
        f"threshold  {calibration['threshold']:.4f} (held-out precision {calibration['heldout_precision']:.3f},"
        f" recall {calibration['heldout_recall']:.3f})"
    )
    print(f"world      {len(scores)} rows, {int(mismatched.sum())} mismatched, {int(flagged.sum())} flagged")
    print(f"precision  {precision:.3f}")
    print(f"recall     {recall:.3f}")
    print(
        f"scores     clean median {np.median(scores[~mismatched]):.3f}, "
        f"mismatched median {np.median(scores[mismatched]):.3f}"
    )


if __name__ == "__main__":
    main()
