"""A pretrained diffusers pipeline to fine-tune (``model.pretrained``): where its folder is, and its parts.

``model.pretrained`` is a local folder in diffusers' Stable Diffusion 1.x/2.x layout (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id. A hub id resolves as
every model curate loads (:mod:`curate.models.weights`): the model directory at ``hf/<org>/<name>``, else a
download of the pipeline's snapshot there unless offline, else :class:`~curate.base.ModelNotFound` naming
``curate models fetch TRAIN.yaml``, which fetches it ahead of time for air-gapped nodes.

A VAE given by hub id (``model.vae.path``) resolves the same way, and :func:`training_weights` lists (and
fetches) everything of a training config that comes from the hub.

The trainer fine-tunes the UNet (all of it, or LoRA adapters through peft) with the pipeline's own frozen
text encoder and VAE and its noise schedule: the scheduler config's betas, timesteps and prediction type
(epsilon or v_prediction).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from curate.base import ModelNotFound, TrainError

__all__ = [
    "PIPELINE_PARTS",
    "fetch_model",
    "fetch_pipeline",
    "load_noise_schedule",
    "load_pipeline_text",
    "load_pipeline_unet",
    "load_pipeline_vae",
    "pipeline_folder",
    "pipeline_spec",
    "training_weights",
    "vae_folder",
]

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What a snapshot skips: other frameworks, a safety checker nobody trains with, and pickles beside safetensors.
_NEVER = ("*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ckpt", "flax_model*", "tf_model*", "*.xml")


def pipeline_spec(repo: str):
    """The model-directory entry of a hub pipeline (``hf/<org>/<name>``)."""
    from curate.models.hub import repo_spec

    return repo_spec("pretrained pipeline", repo)


def pipeline_folder(pretrained: str, download: bool = True) -> Path:
    """The local folder of ``pretrained``: a folder as it is, else the hub id's model-directory folder, else
    its snapshot downloaded there (unless offline)."""
    from curate.models.hub import is_hub_id
    from curate.models.weights import cached_or_fetched

    path = Path(pretrained).expanduser()
    if path.exists():
        missing = [
            p
            for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer")
            if not (path / p).exists()
        ]
        if missing:
            raise ModelNotFound(
                f"model.pretrained: {path} is not a diffusers Stable Diffusion pipeline folder "
                f"(no {', '.join(missing)} in it)"
            )
        return path
    if not is_hub_id(pretrained):
        raise ModelNotFound(
            f"model.pretrained: {pretrained} is neither a local folder nor a hub id like org/name"
        )
    return cached_or_fetched(
        pipeline_spec(pretrained),
        fetch_pipeline,
        download=download,
        noun="pipeline",
        put="put a snapshot of {source} in that folder",
        instead="give a local pipeline folder as model.pretrained",
    )


def fetch_pipeline(spec) -> Path:
    """Download the snapshot of a hub pipeline (its parts only) into the model directory, atomically."""

    def parts(files: list[str]) -> list[str]:
        if "model_index.json" not in files:
            raise ModelNotFound(f"{spec.source} has no model_index.json: not a diffusers pipeline")
        return ["model_index.json"] + [f for f in files if f.split("/")[0] in PIPELINE_PARTS]

    return _snapshot(spec, parts)


def fetch_model(spec, subfolder: str | None = None) -> Path:
    """Download a hub diffusers model (a VAE), or one subfolder of a repository, into the model directory."""

    def wanted(files: list[str]) -> list[str]:
        mine = [f for f in files if subfolder is None or f.startswith(subfolder.rstrip("/") + "/")]
        if not any(f.rsplit("/", 1)[-1] == "config.json" for f in mine):
            raise ModelNotFound(f"{spec.source}{'/' + subfolder if subfolder else ''} has no config.json")
        return mine

    return _snapshot(spec, wanted)


def _snapshot(spec, choose) -> Path:
    """The files ``choose`` picks, without pickles or fp16 variants where a folder has fp32 safetensors."""
    from curate.models.hub import fetch_snapshot

    def wanted(files: list[str]) -> list[str]:
        chosen = [f for f in choose(files) if not any(fnmatch.fnmatch(f.split("/")[-1], p) for p in _NEVER)]
        # a folder with safetensors needs no pickles of the same weights (nor fp16 variants: training is fp32)
        for folder in {f.rsplit("/", 1)[0] if "/" in f else "" for f in chosen}:
            mine = [f for f in chosen if (f.rsplit("/", 1)[0] if "/" in f else "") == folder]
            if any(f.endswith(".safetensors") and ".fp16." not in f for f in mine):
                chosen = [f for f in chosen if not (f in mine and (f.endswith(".bin") or ".fp16." in f))]
        return chosen

    return fetch_snapshot(spec, wanted)


def vae_folder(path: str, subfolder: str | None, download: bool = True) -> Path:
    """``model.vae.path``: a local folder as it is, else the hub id's model-directory folder, else a download
    (of ``subfolder`` only, when given)."""
    from curate.models.hub import is_hub_id, repo_spec
    from curate.models.weights import cached_or_fetched

    local = Path(path).expanduser()
    if local.exists() or not is_hub_id(path):
        return local  # diffusers says what is wrong with a folder that is not a VAE
    return cached_or_fetched(
        repo_spec("VAE", path),
        lambda spec: fetch_model(spec, subfolder),
        download=download,
        noun="VAE",
        put="put a snapshot of {source} in that folder",
        instead="give a local folder as model.vae.path",
    )


def training_weights(cfg, download: bool = True) -> list:
    """What a training config loads from the hub (the pretrained pipeline, the VAE, a transformers text
    encoder), each a :class:`~curate.models.manage.WeightsStatus`, fetched into the model directory with
    ``download`` (``curate models fetch TRAIN.yaml``). Local folders need nothing and are not listed."""
    from curate.models.hub import fetch_repo, is_hub_id, repo_spec
    from curate.models.manage import WeightsStatus
    from curate.models.weights import is_offline, local_path

    wanted = []
    m = cfg.model
    if m.pretrained and is_hub_id(m.pretrained):
        wanted.append(("model.pretrained", pipeline_spec(m.pretrained), fetch_pipeline))
    if m.vae is not None and is_hub_id(m.vae.path):
        sub = m.vae.subfolder
        wanted.append(("model.vae", repo_spec("VAE", m.vae.path), lambda s, sub=sub: fetch_model(s, sub)))
    te = m.text_encoder
    if not m.pretrained and te.kind == "hf" and te.path and is_hub_id(te.path):
        wanted.append(("model.text_encoder", repo_spec("text encoder", te.path), fetch_repo))
    out = []
    for where, spec, fetcher in wanted:
        path = local_path(spec)
        if path.exists():
            out.append(WeightsStatus(where, spec, path, True))
            continue
        error = None
        if not download:
            error = "not downloaded"
        elif is_offline():
            error = "offline: CURATE_OFFLINE or HF_HUB_OFFLINE is set"
        else:
            try:
                fetcher(spec)
            except Exception as e:  # every failure is reported with its source
                error = f"{spec.source}: {e}"
        out.append(WeightsStatus(where, spec, path, error is None, error))
    return out


def load_noise_schedule(folder: Path):
    """The pipeline's noise schedule as a DDPMScheduler (its betas, timesteps, prediction type)."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(str(folder), subfolder="scheduler"))
    # Stable Diffusion's schedulers (PNDM) leave clip_sample out, and DDPM's default clips x0 to [-1, 1]:
    # right for pixels, wrong for latents (diffusers' StableDiffusionPipeline sets it False as well)
    config.setdefault("clip_sample", False)
    noise = DDPMScheduler.from_config(config)
    if noise.config.prediction_type not in ("epsilon", "v_prediction"):
        raise TrainError(
            f"{folder}/scheduler predicts {noise.config.prediction_type!r}: the trainer knows epsilon and v_prediction"
        )
    return noise


def load_pipeline_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    if unet.config.addition_embed_type is not None:
        raise TrainError(
            f"{folder}: its UNet takes added conditions ({unet.config.addition_embed_type}, as SDXL's does); "
            "model.pretrained takes Stable Diffusion 1.x/2.x pipelines"
        )
    return unet


def load_pipeline_vae(folder: Path, device: Any):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").to(device)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def load_pipeline_text(folder: Path, device: Any):
    """The pipeline's CLIP text encoder and tokenizer (frozen)."""
    from transformers import AutoTokenizer, CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    return model, tokenizer
