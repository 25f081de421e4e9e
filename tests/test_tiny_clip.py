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


def test_pack_then_unpack_gives_the_trained_weights_byte_for_byte(trained, tmp_path):
    """The package keeps only the token rows training moved; unpack rebuilds the rest from the seed."""
    (folder, _), (result, _), _ = trained
    packed = tiny_clip.pack(folder, tmp_path / "packed")
    state = safetensors_torch.load_file(folder / tiny_clip.WEIGHTS_FILE)
    table = state["token_embedding.weight"]
    shipped = safetensors_torch.load_file(tmp_path / "packed" / tiny_clip.SHIPPED_WEIGHTS)
    assert "token_embedding.weight" not in shipped
    assert 0 < packed["moved_token_rows"] == len(shipped["token_embedding.rows"]) < table.shape[0] // 100
    # The rows a training caption uses are among the moved ones.
    tokenizer = __import__("open_clip").tokenizer.SimpleTokenizer(context_length=32)
    used = set(tokenizer([_random_scene(np.random.default_rng(0)).caption])[0].tolist()) - {0}
    assert used <= set(shipped["token_embedding.rows"].tolist())

    rebuilt = tiny_clip.unpack(tmp_path / "rebuilt", tmp_path / "packed")
    assert (
        rebuilt
        == packed
        == {
            **result,
            "state_sha256": packed["state_sha256"],
            "moved_token_rows": packed["moved_token_rows"],
        }
    )
    assert (tmp_path / "rebuilt" / tiny_clip.WEIGHTS_FILE).read_bytes() == (
        folder / tiny_clip.WEIGHTS_FILE
    ).read_bytes()


def test_unpack_refuses_a_package_that_does_not_rebuild_the_trained_state(trained, tmp_path):
    (folder, _), _, _ = trained
    tiny_clip.pack(folder, tmp_path / "packed")
    calibration = tmp_path / "packed" / tiny_clip.CALIBRATION_FILE
    data = json.loads(calibration.read_text())
    calibration.write_text(json.dumps({**data, "seed": data["seed"] + 1}))  # another initialisation
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        tiny_clip.unpack(tmp_path / "out", tmp_path / "packed")
    assert not (tmp_path / "out").exists()


def test_the_shipped_demo_clip_unpacks_and_tells_captions_apart(tmp_path):
    """The model the package ships (scripts/pack_demo_clip.py) loads through open_clip's own loading code and
    ranks a drawn scene's own caption above another scene's."""
    info = tiny_clip.unpack(tmp_path / "clip")
    assert info["steps"] == 450 and info["seed"] == 0 and 0 < info["threshold"] < 1
    model = ClipModel.load(f"local-dir:{tmp_path / 'clip'}", "random", device="cpu")
    scenes = [_random_scene(np.random.default_rng([99, i])) for i in range(24)]
    images = model.encode_images(
        [model.preprocess(tiny_clip._downloaded(s, i)) for i, s in enumerate(scenes)]
    )
    own = (images * model.encode_texts([s.caption for s in scenes])).sum(1)
    other = (images * model.encode_texts([scenes[(i + 1) % 24].caption for i in range(24)])).sum(1)
    assert (own > other).mean() >= 0.8
    assert (own >= info["threshold"]).mean() >= 0.8
