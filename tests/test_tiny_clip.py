"""The demo's tiny CLIP: a few training steps give a folder that loads through ClipModel, deterministically."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from curate.demo import tiny_clip  # noqa: E402 - after the skips: it needs the score extra to train
from curate.demo.world import _random_scene  # noqa: E402
from curate.models.clip import ClipModel  # noqa: E402

KEYS = {"threshold", "heldout_precision", "heldout_recall", "steps", "seconds", "seed"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two folders trained with the same seed, few steps, small batches, a small held-out set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny_clip, "_HELDOUT_SCENES", 40)
        seen: list[tuple[int, int, float]] = []
        folders, results = [], []
        for name in ("a", "b"):
            folder = tmp_path_factory.mktemp(name)
            results.append(
                tiny_clip.train_tiny_clip(
                    folder, steps=3, batch_size=8, seed=3, threads=1, progress=_append(seen)
                )
            )
            folders.append(folder)
    return folders, results, seen


def _append(seen: list):
    return lambda step, steps, loss: seen.append((step, steps, loss))


def test_writes_the_hub_layout_and_the_calibration(trained):
    (folder, _), (result, _), _ = trained
    assert {p.name for p in folder.iterdir()} == {
        tiny_clip.CONFIG_FILE,
        tiny_clip.WEIGHTS_FILE,
        tiny_clip.CALIBRATION_FILE,
    }
    config = json.loads((folder / tiny_clip.CONFIG_FILE).read_text())
    assert config["model_cfg"] == tiny_clip.MODEL_CFG
    assert set(config["preprocess_cfg"]) == {"mean", "std"}
    calibration = json.loads((folder / tiny_clip.CALIBRATION_FILE).read_text())
    assert calibration == result
    assert set(calibration) >= KEYS
    assert math.isfinite(calibration["threshold"])
    assert calibration["steps"] == 3 and calibration["seed"] == 3


def test_progress_is_reported(trained):
    *_, seen = trained
    assert seen[-1][:2] == (3, 3)  # the last step of the second run
    assert all(math.isfinite(loss) for *_, loss in seen)


def test_reloads_through_clip_model(trained):
    (folder, _), _, _ = trained
    model = ClipModel.load(f"local-dir:{folder}", "random", device="cpu")
    assert model.dim == tiny_clip.MODEL_CFG["embed_dim"]
    img = tiny_clip._downloaded(_random_scene(np.random.default_rng(0)), draw_seed=0)
    images = model.encode_images([model.preprocess(img)] * 2)
    texts = model.encode_texts(["a red circle on a blue background", "a black star on a white background"])
    for emb in (images, texts):
        assert emb.shape == (2, tiny_clip.MODEL_CFG["embed_dim"]) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_same_seed_gives_the_same_weights(trained):
    (a, b), (result_a, result_b), _ = trained
    first = safetensors_torch.load_file(a / tiny_clip.WEIGHTS_FILE)
    second = safetensors_torch.load_file(b / tiny_clip.WEIGHTS_FILE)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert result_a["threshold"] == result_b["threshold"]


@pytest.mark.parametrize("seed", range(30))
def test_a_variant_changes_one_attribute_and_the_caption(seed):
    rng = np.random.default_rng([seed, 99])
    scene = _random_scene(rng)
    other = tiny_clip._variant(scene, rng)
    assert other.caption != scene.caption
    changed = [scene.background != other.background] + [
        (s.kind, s.colour) != (o.kind, o.colour) for s, o in zip(scene.shapes, other.shapes, strict=True)
    ]
    assert sum(changed) == 1
    if not changed[0]:  # a shape changed: one the download's centre crop keeps
        assert tiny_clip._kept(scene, next(o for o, c in zip(other.shapes, changed[1:], strict=True) if c))
    assert all(s.colour != other.background for s in other.shapes)
    assert len({(s.kind, s.colour) for s in other.shapes}) == len(other.shapes)


def test_threshold_separates_separable_scores():
    true_scores = np.array([0.8, 0.9, 0.7, 0.85])
    wrong_scores = np.array([0.1, 0.2, 0.3])
    threshold, precision, recall = tiny_clip._best_threshold(true_scores, wrong_scores, share=0.1)
    assert 0.3 < threshold < 0.7
    assert precision == recall == 1.0


def test_rejects_nonsense_settings(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        tiny_clip.train_tiny_clip(tmp_path, steps=0)
