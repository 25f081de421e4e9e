"""The trainer in the diffusers ecosystem: fine-tuning a Stable Diffusion pipeline folder (whole UNet or LoRA),
and `curate export` to folders that diffusers' own DiffusionPipeline.from_pretrained loads and runs, with the
same images as `curate generate` for the same seed.

Everything is tiny and random, built from configs and saved with save_pretrained (a Stable Diffusion pipeline
of ~0.5 M parameters, a 1.6 M-parameter open_clip); shards are one tar of coloured squares."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.data import make_tiny_clip

from curate.base import ConfigError
from curate.train.config import parse_train_config
from curate.train.export import export_pipeline, open_clip_text_to_transformers, open_clip_tokenizer
from curate.train.generate import generate
from curate.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = {
    "preset": None,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
PROMPTS = ["a red square on a blue background", "a yellow square"]


def write_shard(path: Path, n: int = 24, size: int = 24) -> Path:
    """One WebDataset tar: a coloured square on another colour, its caption in <uid>.txt."""
    names = list(COLOURS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            fg, bg = names[i % 4], names[(i // 4 + 1 + i) % 4]
            img = Image.new("RGB", (size, size), COLOURS[bg])
            img.paste(COLOURS[fg], (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
            buf = io.BytesIO()
            img.save(buf, "PNG")
            uid = f"{i:032x}"
            members = {
                "png": buf.getvalue(),
                "txt": f"a {fg} square on a {bg} background".encode(),
                "json": json.dumps({"uid": uid}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{uid}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tiny_clip_tokenizer(length: int = 16):
    """A transformers CLIPTokenizer over single characters (byte-level BPE without merges)."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789!"
    vocab = {"!": 0}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=length)


def make_sd_pipeline(folder: Path, prediction: str = "epsilon", seed: int = 0) -> Path:
    """A Stable Diffusion 1.x-layout pipeline folder with random weights: a ~0.3 M-parameter UNet over 4x8x8
    latents of a 16 px AutoencoderKL, a 2-layer CLIPTextModel, and a PNDM scheduler (SD's own)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=32,
        **{k: v for k, v in UNET.items() if k != "preset"},
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type=prediction,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return {
        "shard": write_shard(tmp / "shards" / "00000.tar"),
        "clip": make_tiny_clip(tmp / "clip"),
        "sd": make_sd_pipeline(tmp / "sd"),
        "tmp": tmp,
    }


def _config(world, output: Path, **over):
    raw = {
        "output": str(output),
        "seed": 1,
        "data": {"shards": [str(world["shard"])], "resolution": 16, "shuffle_buffer": 8},
        "model": {
            "unet": UNET,
            "text_encoder": {
                "kind": "open_clip",
                "model": f"local-dir:{world.get('clip')}",
                "max_tokens": 12,
            },
        },
        "optim": {"lr": 1e-3, "batch_size": 4, "ema_decay": 0.9},
        "schedule": {"steps": 2, "log_every": 1},
        "checkpoint": {"every": 2},
        "validation": {"every": None, "prompts": [], "clip_score": False, "eval_samples": 0},
    }
    for key, value in over.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return parse_train_config(raw)


def _pipeline_images(pipe, prompts, steps=3, guidance=3.0, seed=0) -> np.ndarray:
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    )
    return np.stack([np.asarray(im) for im in out.images])


def _unet_equals(unet, weights: dict[str, torch.Tensor]) -> bool:
    own = unet.state_dict()
    mine = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    return mine.keys() == own.keys() and all(torch.equal(own[k], mine[k]) for k in own)


# -- open_clip's text tower as transformers' CLIP -------------------------------------------------------------


def test_the_converted_open_clip_text_tower_gives_the_same_states_and_embedding(world):
    from curate.models.clip import ClipModel

    clip = ClipModel.load(f"local-dir:{world['clip']}", "", device="cpu", precision="fp32")
    hf = open_clip_text_to_transformers(clip.model)
    tokenizer = open_clip_tokenizer(clip.tokenizer)
    captions = ["a red square on a blue background", "A Yellow  square!", "", "x" * 60]
    ours = clip.tokenizer(captions)
    theirs = tokenizer(captions, truncation=True, max_length=16).input_ids
    ids = torch.zeros(len(captions), 16, dtype=torch.long)  # open_clip pads with 0
    for i, row in enumerate(theirs):
        ids[i, : len(row)] = torch.tensor(row)
    assert torch.equal(ours, ids)  # the same ids, cut with the end token
    from curate.train.config import TextEncoderConfig
    from curate.train.model import TextEncoder

    enc = TextEncoder.load(
        TextEncoderConfig(kind="open_clip", model=f"local-dir:{world['clip']}"), None, "cpu"
    )
    text = enc.encode(captions, "cpu")
    with torch.no_grad():
        out = hf(input_ids=ids)
        assert torch.allclose(out.last_hidden_state, text.states, atol=1e-5)
        assert torch.allclose(out.text_embeds, clip.model.encode_text(ours), atol=1e-5)


# -- from scratch: curate's own model, in pixel space, with the open_clip text tower ------------------------------


def test_a_model_trained_from_scratch_exports_and_diffusers_generates_what_curate_generates(
    world, tmp_path, cli
):
    from diffusers import DiffusionPipeline

    train(_config(world, tmp_path / "t"), progress=False)
    r = cli("export", tmp_path / "t", tmp_path / "pipe")
    assert r.code == 0, r.err
    assert "trust_remote_code=True" in r.out
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), trust_remote_code=True)
    assert type(pipe).__name__ == "CurateTextToImagePipeline" and pipe.vae is None
    ema = load_file(tmp_path / "t/checkpoints/step-00000002/ema.safetensors")
    live = load_file(tmp_path / "t/checkpoints/step-00000002/model.safetensors")
    assert _unet_equals(pipe.unet, ema) and not _unet_equals(pipe.unet, live)  # the EMA weights by default
    theirs = _pipeline_images(pipe, PROMPTS)
    ours = generate(tmp_path / "t", PROMPTS, steps=3, guidance=3.0, seed=0)["images"]
    assert theirs.shape == ours.shape == (2, 16, 16, 3)
    # the text tower's states agree to ~1e-6, so a pixel may round the other way
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
    assert (theirs == ours).mean() > 0.99
    # --no-ema and --step
    r = cli("export", tmp_path / "t", tmp_path / "live", "--no-ema", "--step", 2)
    assert r.code == 0, r.err
    live_pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "live"), trust_remote_code=True)
    assert _unet_equals(live_pipe.unet, live)
    r = cli("export", tmp_path / "t", tmp_path / "x", "--step", 7)
    assert r.code == 2 and "no checkpoint of step 7" in r.err
    r = cli("export", tmp_path / "t", tmp_path / "pipe")
    assert r.code == 2 and "not empty" in r.err


def test_a_latent_model_with_a_transformers_text_encoder_exports_too(world, tmp_path):
    """A model trained with the pipeline's text encoder and VAE as its parts (kind hf, model.vae), with the
    pooled text embedding: curate's pipeline class, now with a VAE; images equal curate's exactly."""
    from diffusers import DiffusionPipeline

    sd = world["sd"]
    cfg = _config(
        world,
        tmp_path / "t",
        **{
            "model.text_encoder": {"kind": "hf", "path": str(sd / "text_encoder"), "max_tokens": 16},
            "model.vae": {"path": str(sd), "subfolder": "vae"},
            "model.unet": dict(UNET, block_out_channels=[16, 16]),
        },
    )
    (sd / "text_encoder" / "tokenizer_config.json").exists() or _copy_tokenizer(sd)
    train(cfg, progress=False)
    result = export_pipeline(tmp_path / "t", tmp_path / "pipe")
    assert result["kind"] == "curate" and result["weights"] == "ema"
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), trust_remote_code=True)
    assert pipe.vae is not None and pipe.unet.config.class_embed_type == "projection"
    theirs = _pipeline_images(pipe, PROMPTS)
    ours = generate(tmp_path / "t", PROMPTS, steps=3, guidance=3.0, seed=0)["images"]
    assert np.array_equal(theirs, ours)


def _copy_tokenizer(sd: Path) -> None:
    """kind hf reads the tokenizer from the text encoder's folder."""
    import shutil

    for f in (sd / "tokenizer").iterdir():
        shutil.copy(f, sd / "text_encoder" / f.name)


# -- fine-tuning a pretrained pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_fine_tuning_a_pipeline_folder_exports_a_stable_diffusion_pipeline(world, tmp_path, prediction):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    base = make_sd_pipeline(tmp_path / "base", prediction=prediction)
    lines: list[str] = []
    summary = train(
        _config(
            world,
            tmp_path / "t",
            **{"model.pretrained": str(base), "model.unet": None, "model.text_encoder": None},
        ),
        say=lines.append,
        progress=False,
    )
    assert np.isfinite(summary["history"][-1]["loss"])
    assert any("pretrained:" in line for line in lines)
    result = export_pipeline(tmp_path / "t", tmp_path / "pipe")
    assert result["kind"] == "stable_diffusion"
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.scheduler.config.prediction_type == prediction  # the base's noise schedule, as a DDIM sampler
    original = StableDiffusionPipeline.from_pretrained(str(base))
    changed = [
        k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, original.unet.state_dict()[k])
    ]
    assert changed  # fine-tuned
    ema = load_file(tmp_path / "t/checkpoints/step-00000002/ema.safetensors")
    assert _unet_equals(pipe.unet, ema)
    for part in ("vae", "text_encoder"):  # frozen: the base's
        a, b = getattr(pipe, part).state_dict(), getattr(original, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    theirs = _pipeline_images(pipe, PROMPTS)
    assert theirs.shape == (2, 16, 16, 3)  # generated at the trained size
    ours = generate(tmp_path / "t", PROMPTS, steps=3, guidance=3.0, seed=0)["images"]
    # Stable Diffusion's pipeline rounds (x / 2 + 0.5) * 255, curate (x + 1) * 127.5: a pixel may differ by one
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1


def test_lora_trains_only_adapters_resumes_exactly_and_loads_with_load_lora_weights(world, tmp_path):
    from diffusers import DiffusionPipeline

    over = {
        "model.pretrained": str(world["sd"]),
        "model.unet": None,
        "model.text_encoder": None,
        "model.lora": {"rank": 4},
        "optim.lr": 1e-2,
    }
    train(
        _config(world, tmp_path / "a", **{**over, "schedule.steps": 4, "checkpoint.every": 4}), progress=False
    )
    train(
        _config(world, tmp_path / "b", **{**over, "schedule.steps": 2, "checkpoint.every": 2}), progress=False
    )
    train(
        _config(world, tmp_path / "b", **{**over, "schedule.steps": 4, "checkpoint.every": 2}), progress=False
    )
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a/checkpoints/step-00000004" / name)
        b = load_file(tmp_path / "b/checkpoints/step-00000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert a and all("lora_" in k for k in a)  # the checkpoint holds the adapters only
    result = export_pipeline(tmp_path / "a", tmp_path / "pipe")
    assert result["kind"] == "lora"
    assert (tmp_path / "pipe" / "pytorch_lora_weights.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    before = _pipeline_images(pipe, PROMPTS)
    pipe.load_lora_weights(str(tmp_path / "pipe"))
    after = _pipeline_images(pipe, PROMPTS)
    assert not np.array_equal(before, after)  # the adapters change the output
    ours = generate(tmp_path / "a", PROMPTS, steps=3, guidance=3.0, seed=0)["images"]
    assert np.abs(after.astype(int) - ours.astype(int)).max() <= 1


def test_pretrained_config_errors_name_their_yaml_path(world, tmp_path):
    with pytest.raises(ConfigError, match=r"model.*unet.*pretrained pipeline decides"):
        _config(world, tmp_path / "x", **{"model.pretrained": str(world["sd"])})
    with pytest.raises(ConfigError, match="lora adapts a pretrained UNet"):
        _config(world, tmp_path / "x", **{"model.lora": {"rank": 2}})
    from curate.base import ModelNotFound

    with pytest.raises(ModelNotFound, match="not a diffusers Stable Diffusion pipeline folder"):
        train(
            _config(
                world,
                tmp_path / "x",
                **{"model.pretrained": str(world["clip"]), "model.unet": None, "model.text_encoder": None},
            ),
            progress=False,
        )


def test_models_fetch_of_a_training_yaml_and_a_hub_pipeline_from_the_model_directory(
    world, tmp_path, cli, monkeypatch
):
    """`curate models fetch TRAIN.yaml` lists the hub pipeline and VAE a training config names; offline it says
    where they go, and a pipeline put there is what training with that hub id loads."""
    import shutil

    import yaml

    models = tmp_path / "models"
    monkeypatch.setenv("CURATE_MODEL_DIR", str(models))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    cfg = _config(
        world,
        tmp_path / "t",
        **{
            "model.pretrained": "some-org/tiny-sd",
            "model.unet": None,
            "model.text_encoder": None,
            "schedule.steps": 1,
            "checkpoint.every": 1,
        },
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    r = cli("models", "fetch", path)
    assert r.code == 2
    assert "model.pretrained: pretrained pipeline some-org/tiny-sd" in r.out
    assert str(models / "hf" / "some-org" / "tiny-sd") in r.out and "offline" in r.out
    shutil.copytree(world["sd"], models / "hf" / "some-org" / "tiny-sd")
    r = cli("models", "fetch", path)
    assert r.code == 0, r.err
    assert "ok model.pretrained" in r.out
    lines: list[str] = []
    train(cfg, say=lines.append, progress=False)  # offline: from the model directory
    assert (tmp_path / "t" / "checkpoints" / "step-00000001").is_dir()
    # a VAE by hub id resolves there too (it bypassed the model directory before)
    vae_cfg = cfg.model_copy(deep=True)
    from curate.train.config import TrainConfig

    raw = vae_cfg.to_dict()
    raw["model"] = {
        "unet": UNET,
        "text_encoder": {"kind": "hf", "path": str(world["sd"] / "text_encoder")},
        "vae": {"path": "other-org/tiny-vae"},
    }
    path.write_text(yaml.safe_dump(TrainConfig.model_validate(raw).to_dict()))
    r = cli("models", "fetch", path)
    assert r.code == 2 and "model.vae: VAE other-org/tiny-vae" in r.out
