"""data.cache / `curate train --cache`: captions and VAE latents encoded once into <output>/cache; training from
the cache takes the same steps as training without it, and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_export import _config, make_sd_pipeline, write_shard

from curate.base import ConfigError
from curate.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    return {"shard": write_shard(tmp / "shards" / "00000.tar", n=16), "sd": make_sd_pipeline(tmp / "sd")}


def _sd(world, output, **over):
    base = {"model.pretrained": str(world["sd"]), "model.unet": None, "model.text_encoder": None}
    return _config(world, output, **{**base, **over})


def test_the_cache_holds_each_samples_text_and_latent_distribution(world, tmp_path, cli):
    import yaml

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_sd(world, tmp_path / "t").to_dict()))
    r = cli("train", path, "--cache")
    assert r.code == 0, r.err
    assert not (tmp_path / "t" / "checkpoints").exists()  # the pass alone: nothing trained
    cached = load_file(tmp_path / "t" / "cache" / "00000.tar.safetensors")
    assert {k.split("/")[1] for k in cached} == {"states", "pooled", "mean", "std"}
    assert len(cached) == 16 * 4
    # what the frozen encoders give for the same sample
    from curate.train.data import caption_of, iter_samples, to_pixels
    from curate.train.model import load_frozen

    cfg = _sd(world, tmp_path / "t")
    text, vae, _ = load_frozen(cfg.model, None, "cpu")
    sample = next(iter_samples(str(world["shard"])))
    states = text.encode([caption_of(sample, "txt")], "cpu").states[0]
    assert torch.allclose(cached[f"{sample.uid}/states"], states, atol=1e-6)
    x = to_pixels(sample.image, 16, "center", False, np.random.default_rng(0))
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(x)[None]).latent_dist.mean[0]
    assert cached[f"{sample.uid}/mean"].shape == (4, 8, 8)
    assert torch.allclose(cached[f"{sample.uid}/mean"], mean, atol=1e-5)


def test_training_from_the_cache_takes_the_same_steps_and_resumes_exactly(world, tmp_path):
    plain = train(_sd(world, tmp_path / "plain", **{"schedule.steps": 3}), progress=False)
    cached = train(_sd(world, tmp_path / "a", **{"schedule.steps": 3, "data.cache": True}), progress=False)
    # the same batches, noise and timesteps; the latents drawn from the same distribution with the same draws
    np.testing.assert_allclose(
        [h["loss"] for h in cached["history"]], [h["loss"] for h in plain["history"]], rtol=1e-4
    )
    over = {"data.cache": True, "checkpoint.every": 1}
    train(_sd(world, tmp_path / "b", **{**over, "schedule.steps": 1}), progress=False)
    train(_sd(world, tmp_path / "b", **{**over, "schedule.steps": 3}), progress=False)
    a = load_file(tmp_path / "a/checkpoints/step-00000003/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step-00000003/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_refuses_random_crops_and_flips(world, tmp_path):
    with pytest.raises(ConfigError, match="cache needs crop: center and flip: false"):
        _sd(world, tmp_path / "x", **{"data.cache": True, "data.flip": True})
