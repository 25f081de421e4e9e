"""Human-preference reward models: how much people would prefer an image for its prompt, as one number per
image-caption pair. Know nothing of shards or configs.

LAION's aesthetic head rates the image alone; a reward model is trained on people's choices between images
generated for the same prompt, so it scores the pair. Curation keeps the pairs it rates high (Compress &
Align), and RL fine-tuning of generators (AlignProp, DRaFT, ReFL) optimises against the same models.

Each family is a small adapter (:class:`RewardFamily`) in :data:`FAMILIES`, loading the published weights
through the code they were published for and scoring as the authors' own code does:

===============  ==========================================  ===================================================
family           weights and loading                         score of image ``i`` and caption ``t``
===============  ==========================================  ===================================================
``pickscore``    a transformers ``CLIPModel`` folder (hub     ``logit_scale.exp() * cos(image, text)`` of the
                 ``yuvalkirstain/PickScore_v1``), processor   projected features (PickScore's README)
                 from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
``hpsv2``        open_clip ViT-H-14 with the HPS v2 (or       ``image . text`` of the L2-normalised features
                 v2.1) checkpoint as ``pretrained=<file>``    (``hpsv2.score``: the diagonal of the logits
                 (hub ``xswu/HPSv2``)                         without the logit scale)
``imagereward``  ``ImageReward.pt`` and ``med_config.json``   ``(mlp(text_encoder(t, cross-attending to
                 (hub ``THUDM/ImageReward``), BERT's          vit(i))[CLS]) - 0.16717...) / 1.03333...``
                 uncased vocabulary; its BLIP ViT and text    (``ImageReward.score``)
                 encoder loaded into transformers'
                 ``BlipVisionModel`` and ``BlipTextModel``
===============  ==========================================  ===================================================

ImageReward's checkpoint maps onto transformers' BLIP classes (the two that ``BlipForImageTextRetrieval``
is made of) name for name after :func:`imagereward_state_dict`: the text encoder's keys are BLIP's ``med.py``
BERT names, which transformers kept; the ViT's are timm's (``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``,
``norm``), renamed one to one (``qkv`` is one fused linear in both). What does not map, and is not used by
the score: ``blip.vision_proj`` and ``blip.text_proj`` (BLIP's contrastive projections). What is not in the
files and is taken from BLIP's code: the ViT's attention heads (width / 64, as BLIP's ViT-B and ViT-L have),
its LayerNorm epsilon (1e-6) and patch size read from the patch embedding's shape.

A new family is an adapter with ``weights``, ``load``, ``memory`` and ``label``, added with
:func:`register_family`. Models loaded from stand-in weights (:mod:`curate.models.stand_in`) have
" (stand-in)" in their ``name``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from curate.base import MemoryNeed, ModelNotFound
from curate.models.weights import WeightsSpec, local_path, resolve, stand_in_label

__all__ = [
    "FAMILIES",
    "HPS_VERSIONS",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_MED_CONFIG",
    "IMAGEREWARD_STD",
    "RewardFamily",
    "RewardModel",
    "RewardSource",
    "family",
    "imagereward_checkpoint",
    "imagereward_state_dict",
    "register_family",
]


@dataclass(frozen=True)
class RewardSource:
    """Where a reward model comes from; ``None`` fields take the family's defaults."""

    family: str
    model: str | None = None  # hub id, version name or local path: the family says which
    processor: str | None = None  # pickscore: processor folder or hub id; imagereward: BERT vocab.txt
    architecture: str = "ViT-H-14"  # hpsv2: the open_clip architecture of the checkpoint


class RewardModel(Protocol):
    name: str  # recorded in reward_model

    def preprocess(self, image: Any) -> Any:
        """A PIL RGB image -> the model's input tensor (runs in the decode threads)."""
        ...

    def score(self, images: list[Any], texts: list[str]) -> np.ndarray:
        """One reward per (preprocessed image, caption) pair, float32, in order."""
        ...


class RewardFamily:
    """An adapter: what files a family's model is, how to load it, and what it needs in memory."""

    name: ClassVar[str]
    default_model: ClassVar[str]

    def weights(self, src: RewardSource) -> list[WeightsSpec]:
        """The files to fetch (the model directory's entries); [] for local paths. :class:`ModelNotFound`
        for a model name the family does not know."""
        raise NotImplementedError

    def load(self, src: RewardSource, device: str, precision: str, threads: int | None) -> RewardModel:
        raise NotImplementedError

    def memory(self, src: RewardSource, device: str, batch: int, precision: str) -> MemoryNeed:
        raise NotImplementedError

    def label(self, src: RewardSource) -> str:
        """What ``reward_model`` records, before a stand-in's suffix."""
        raise NotImplementedError

    def model(self, src: RewardSource) -> str:
        return src.model or self.default_model


FAMILIES: dict[str, RewardFamily] = {}


def register_family(adapter: RewardFamily) -> RewardFamily:
    """Add a reward family under its ``name``; another adapter under a taken name is an error."""
    existing = FAMILIES.get(adapter.name)
    if existing is not None and type(existing) is not type(adapter):
        raise ValueError(f"reward family {adapter.name!r} is taken by {type(existing).__qualname__}")
    FAMILIES[adapter.name] = adapter
    return adapter


def family(name: str) -> RewardFamily:
    if name not in FAMILIES:
        raise ModelNotFound(f"no reward family {name!r}; the families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).expanduser().exists()


# --- PickScore: a CLIP-H/14 fine-tuned on Pick-a-Pic, through transformers -------------------------------

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's README loads the processor here


@dataclass
class PickScoreModel:
    model: Any  # transformers CLIPModel
    processor: Any
    device: Any
    dtype: Any
    name: str

    def preprocess(self, image: Any) -> Any:
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def score(self, images: list[Any], texts: list[str]) -> np.ndarray:
        import torch

        from curate.models.device import autocast

        if not images:
            return np.zeros(0, np.float32)
        pixels = torch.stack(images).to(self.device, self.dtype)
        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            image = _features(self.model.get_image_features(pixel_values=pixels))
            text = _features(self.model.get_text_features(**tokens))
            image = image.float() / image.float().norm(dim=-1, keepdim=True)
            text = text.float() / text.float().norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale.exp().float() * (image * text).sum(-1)
        return scores.cpu().numpy().astype(np.float32)


def _features(out: Any) -> Any:
    """The projected features: transformers 5 returns them as ``pooler_output``, 4.x as the tensor."""
    return out if hasattr(out, "dim") else out.pooler_output


class PickScoreFamily(RewardFamily):
    name = "pickscore"
    default_model = PICKSCORE

    def processor(self, src: RewardSource) -> str:
        model = self.model(src)
        return src.processor or (PICKSCORE_PROCESSOR if model == PICKSCORE else model)

    def weights(self, src: RewardSource) -> list[WeightsSpec]:
        from curate.models.hub import is_hub_id, repo_spec

        out = []
        for what, repo in (
            ("PickScore model", self.model(src)),
            ("PickScore processor", self.processor(src)),
        ):
            if is_hub_id(repo) and all(s.hub_repo != repo for s in out):
                out.append(repo_spec(what, repo))
        return out

    def load(self, src: RewardSource, device: str, precision: str, threads: int | None) -> PickScoreModel:
        from transformers import AutoProcessor, CLIPModel

        from curate.models.hub import resolve_model
        from curate.models.vlm import load_hf_model, quiet_progress

        folder = resolve_model("PickScore model", self.model(src))
        proc = resolve_model("PickScore processor", self.processor(src))
        with quiet_progress():
            processor = AutoProcessor.from_pretrained(proc)
        model, dev, dtype = load_hf_model(CLIPModel, folder, device, precision, threads, False)
        return PickScoreModel(model, processor, dev, dtype, stand_in_label(self.label(src), folder))

    def memory(self, src: RewardSource, device: str, batch: int, precision: str) -> MemoryNeed:
        from curate.models.footprint import hf_params, image_model_need, open_clip_params, safetensors_params

        folder = _hub_folder("PickScore model", self.model(src))
        if folder is not None and (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            params = safetensors_params(folder) or hf_params(config)
            v = config.get("vision_config", {})
            vision = {
                "image_size": v.get("image_size", 224),
                "patch_size": v.get("patch_size", 32),
                "width": v.get("hidden_size", 768),
            }
        else:  # not here yet: PickScore_v1 is CLIP ViT-H/14, whose size open_clip knows
            params, vision = open_clip_params("ViT-H-14")
        return image_model_need(
            params, device, batch, vision=vision, precision=precision, name=self.label(src)
        )

    def label(self, src: RewardSource) -> str:
        from curate.models.hub import model_label

        return f"pickscore/{model_label(self.model(src))}"


def _hub_folder(what: str, model: str) -> Path | None:
    """Where ``model`` (a folder or a hub id) is here, without downloading; None where it is not."""
    from curate.models.hub import is_hub_id, repo_spec

    path = Path(model).expanduser()
    if path.exists():
        return path
    if is_hub_id(model):
        folder = local_path(repo_spec(what, model))
        return folder if folder.exists() else None
    return None


# --- HPS v2: open_clip ViT-H-14 fine-tuned on HPD v2 ----------------------------------------------------

HPS_VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hpsv2's hps_version_map


def hps_spec(version: str, architecture: str = "ViT-H-14") -> WeightsSpec:
    file = HPS_VERSIONS[version]
    # Under open_clip/<arch>/<tag>/: a stand-in of it is written as open_clip's own architecture.
    return WeightsSpec(
        f"HPS {version} ({architecture})",
        f"open_clip/{architecture}/hps{version}/{file}",
        hub_repo="xswu/HPSv2",
        hub_file=file,
    )


@dataclass
class HpsModel:
    clip: Any  # curate.models.clip.ClipModel
    name: str

    def preprocess(self, image: Any) -> Any:
        return self.clip.preprocess(image)

    def score(self, images: list[Any], texts: list[str]) -> np.ndarray:
        if not images:
            return np.zeros(0, np.float32)
        image = self.clip.encode_images(images)
        text = self.clip.encode_texts(texts)
        return np.sum(image * text, axis=1).astype(np.float32)


class HpsFamily(RewardFamily):
    name = "hpsv2"
    default_model = "v2.1"

    def weights(self, src: RewardSource) -> list[WeightsSpec]:
        model = self.model(src)
        if model in HPS_VERSIONS:
            return [hps_spec(model, src.architecture)]
        if _is_path(model):
            return []
        raise ModelNotFound(
            f"HPS: {model!r} is neither a version ({', '.join(HPS_VERSIONS)}) nor a path to a checkpoint"
        )

    def checkpoint(self, src: RewardSource) -> Path:
        model = self.model(src)
        specs = self.weights(src)
        return resolve(specs[0]) if specs else resolve(WeightsSpec(f"HPS checkpoint {model}", ""), model)

    def load(self, src: RewardSource, device: str, precision: str, threads: int | None) -> HpsModel:
        from curate.models.clip import ClipModel

        path = self.checkpoint(src)
        clip = ClipModel.load(src.architecture, str(path), device, precision, threads)
        return HpsModel(clip, stand_in_label(self.label(src), path))

    def memory(self, src: RewardSource, device: str, batch: int, precision: str) -> MemoryNeed:
        from curate.models.footprint import image_model_need, open_clip_params

        params, vision = open_clip_params(src.architecture)
        return image_model_need(
            params, device, batch, vision=vision, precision=precision, name=self.label(src)
        )

    def label(self, src: RewardSource) -> str:
        model = self.model(src)
        if model in HPS_VERSIONS:
            return f"hpsv2/{model}"
        return f"hpsv2/{src.architecture}/{Path(model).name}"


# --- ImageReward: BLIP ViT-L + BLIP's cross-attending BERT + an MLP, through transformers' BLIP classes --

IMAGEREWARD = "ImageReward-v1.0"
IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py: rewards = (mlp(...) - mean) / std
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward.py tokenises with padding="max_length", max_length=35
# med_config.json of THUDM/ImageReward as published (BERT-base with cross-attention; the width it attends to
# is the ViT's, set in code as BLIP_Pretrain does): sizes the model before the file is here.
IMAGEREWARD_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
# ImageReward.py's BLIP_Pretrain(image_size=224, vit="large"): BLIP's ViT-L/16.
IMAGEREWARD_VIT = {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24}
BLIP_VIT_HEAD_WIDTH = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
BLIP_VIT_EPS = 1e-6  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGEREWARD_FILES = {
    "checkpoint": WeightsSpec(
        "ImageReward v1.0", "imagereward/v1.0/ImageReward.pt", "THUDM/ImageReward", "ImageReward.pt"
    ),
    "med_config": WeightsSpec(
        "ImageReward v1.0 text encoder config",
        "imagereward/v1.0/med_config.json",
        "THUDM/ImageReward",
        "med_config.json",
    ),
    "vocab": WeightsSpec(
        "BERT uncased vocabulary (ImageReward's tokenizer)",
        "bert/bert-base-uncased/vocab.txt",
        "google-bert/bert-base-uncased",
        "vocab.txt",
    ),
}

_VIT_RENAMES = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
)


def imagereward_state_dict(
    state: Mapping[str, Any], source: str = "ImageReward checkpoint"
) -> dict[str, dict]:
    """ImageReward's checkpoint split and renamed for transformers: ``{"vision": ..., "text": ..., "mlp": ...}``
    with the keys of ``BlipVisionModel``, ``BlipTextModel(add_pooling_layer=False)`` and the MLP's
    ``layers.N``. BLIP's contrastive projections (``blip.vision_proj``, ``blip.text_proj``) are left out:
    the reward does not use them. Any other key is an error: it would be a part this code does not run."""
    out: dict[str, dict] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, target in _VIT_RENAMES:
                if pattern.match(name):
                    out["vision"][pattern.sub(target, name)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder.") :]
            if name != "embeddings.position_ids":  # a buffer older BERTs saved; transformers rebuilds it
                out["text"][name] = value
        elif key.startswith("mlp."):
            out["mlp"][key[len("mlp.") :]] = value
        elif not key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            unknown.append(key)
    if unknown or not all(out.values()):
        raise ValueError(
            f"{source}: not an ImageReward checkpoint (expected blip.visual_encoder.*, blip.text_encoder.* and "
            f"mlp.layers.*; " + (f"unknown keys: {unknown[:6]})" if unknown else "some are missing)")
        )
    if "embeddings.class_embedding" in out["vision"]:
        out["vision"]["embeddings.class_embedding"] = out["vision"]["embeddings.class_embedding"].reshape(
            1, 1, -1
        )
    return out


_VIT_ORIGINAL = (
    (re.compile(r"^embeddings\.class_embedding$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embedding$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embedding\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$"), r"blocks.\1.norm1.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$"), r"blocks.\1.norm2.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$"), r"blocks.\1.attn.qkv.\2"),
    (
        re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$"),
        r"blocks.\1.attn.proj.\2",
    ),
    (re.compile(r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"blocks.\1.mlp.\2.\3"),
    (re.compile(r"^post_layernorm\.(weight|bias)$"), r"norm.\1"),
)


def imagereward_checkpoint(vision: Any, text: Any, mlp: Any) -> dict[str, Any]:
    """The inverse of :func:`imagereward_state_dict`: transformers' BLIP modules and the MLP as the tensors
    ImageReward.pt holds, under its names (what a stand-in of it is written as)."""
    out = {}
    for key, value in vision.state_dict().items():
        for pattern, target in _VIT_ORIGINAL:
            if pattern.match(key):
                out["blip.visual_encoder." + pattern.sub(target, key)] = value
                break
        else:
            raise ValueError(f"BlipVisionModel key {key!r} has no place in ImageReward's layout")
    out |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    return out | {f"mlp.{k}": v for k, v in mlp.state_dict().items()}


def _vision_dims(vision_state: Mapping[str, Any]) -> dict[str, int]:
    """The ViT's sizes, read off its tensors' shapes (BLIP builds it in code, from ``vit="large"``)."""
    patch = vision_state["embeddings.patch_embedding.weight"]
    positions = int(vision_state["embeddings.position_embedding"].shape[1]) - 1
    return {
        "width": int(patch.shape[0]),
        "patch_size": int(patch.shape[-1]),
        "image_size": round(positions**0.5) * int(patch.shape[-1]),
        "layers": 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers.")),
        "intermediate": int(vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
    }


def _blip_configs(vit: Mapping[str, int], med_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """transformers' ``BlipVisionConfig`` of the ViT, and ``BlipTextConfig`` from ``med_config.json``
    attending to that ViT's width (as BLIP_Pretrain sets ``encoder_width``)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=vit["width"],
        intermediate_size=vit["intermediate"],
        num_hidden_layers=vit["layers"],
        num_attention_heads=max(1, vit["width"] // BLIP_VIT_HEAD_WIDTH),
        image_size=vit["image_size"],
        patch_size=vit["patch_size"],
        layer_norm_eps=BLIP_VIT_EPS,
        hidden_act="gelu",
    )
    m = med_config
    text = BlipTextConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        encoder_hidden_size=vit["width"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        hidden_act=m.get("hidden_act", "gelu"),
        layer_norm_eps=m.get("layer_norm_eps", 1e-12),
        pad_token_id=m.get("pad_token_id", 0),
    )
    return vision, text


@dataclass
class ImageRewardModel:
    vision: Any  # transformers BlipVisionModel
    text: Any  # transformers BlipTextModel (add_pooling_layer=False)
    mlp: Any  # curate.models.heads.AestheticHead: ImageReward's MLP has the aesthetic predictor's layout
    tokenizer: Any
    transform: Any
    device: Any
    dtype: Any
    name: str
    mean: float = IMAGEREWARD_MEAN
    std: float = IMAGEREWARD_STD

    def preprocess(self, image: Any) -> Any:
        return self.transform(image)

    def score(self, images: list[Any], texts: list[str]) -> np.ndarray:
        import torch

        from curate.models.device import autocast

        if not images:
            return np.zeros(0, np.float32)
        pixels = torch.stack(images).to(self.device)
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_LENGTH,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            out = self.text(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
            )
        features = out.last_hidden_state[:, 0, :].float()
        with torch.inference_mode():
            rewards = (self.mlp(features)[:, 0] - self.mean) / self.std
        return rewards.cpu().numpy().astype(np.float32)


class ImageRewardFamily(RewardFamily):
    name = "imagereward"
    default_model = IMAGEREWARD

    def weights(self, src: RewardSource) -> list[WeightsSpec]:
        model = self.model(src)
        out = []
        if model == IMAGEREWARD:
            out += [IMAGEREWARD_FILES["checkpoint"], IMAGEREWARD_FILES["med_config"]]
        elif not _is_path(model):
            raise ModelNotFound(
                f"ImageReward: {model!r} is neither {IMAGEREWARD!r} nor a path to an ImageReward.pt checkpoint"
            )
        if src.processor is None:
            out.append(IMAGEREWARD_FILES["vocab"])
        return out

    def files(self, src: RewardSource) -> tuple[Path, Path, Path]:
        """(checkpoint, med_config.json, vocab.txt): a local checkpoint's med_config.json is beside it."""
        model = self.model(src)
        if model == IMAGEREWARD:
            checkpoint = resolve(IMAGEREWARD_FILES["checkpoint"])
            med = resolve(IMAGEREWARD_FILES["med_config"])
        else:
            checkpoint = resolve(WeightsSpec("ImageReward checkpoint", ""), model)
            med = resolve(
                WeightsSpec("ImageReward med_config.json (beside the checkpoint)", ""),
                checkpoint.with_name("med_config.json"),
            )
        vocab = src.processor
        if vocab is not None and Path(vocab).expanduser().is_dir():
            vocab = str(Path(vocab).expanduser() / "vocab.txt")
        vocab_path = (
            resolve(IMAGEREWARD_FILES["vocab"], vocab) if vocab else resolve(IMAGEREWARD_FILES["vocab"])
        )
        return checkpoint, med, vocab_path

    def load(self, src: RewardSource, device: str, precision: str, threads: int | None) -> ImageRewardModel:
        import torch
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
        from transformers import BertTokenizerFast, BlipTextModel, BlipVisionModel

        from curate.models.device import pick_device, pick_dtype
        from curate.models.heads import aesthetic_head_from_state_dict, load_head_state_dict
        from curate.models.vlm import quiet_progress

        _threads(threads)
        checkpoint, med, vocab = self.files(src)
        parts = imagereward_state_dict(load_head_state_dict(checkpoint), str(checkpoint))
        vision_cfg, text_cfg = _blip_configs(_vision_dims(parts["vision"]), json.loads(med.read_text()))
        with torch.device("meta"):
            vision = BlipVisionModel(vision_cfg)
            text = BlipTextModel(text_cfg, add_pooling_layer=False)
        vision.load_state_dict(parts["vision"], strict=True, assign=True)
        text.load_state_dict(parts["text"], strict=True, assign=True)
        text.embeddings.position_ids = torch.arange(text_cfg.max_position_embeddings).expand((1, -1))
        mlp = aesthetic_head_from_state_dict(parts["mlp"], f"{checkpoint} (mlp)")
        dev = pick_device(device)
        n = vision_cfg.image_size
        transform = Compose(
            [
                Resize(n, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(n),
                ToTensor(),
                Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )
        with quiet_progress():  # the folder's vocab.txt, read as each transformers version reads it
            tokenizer = BertTokenizerFast.from_pretrained(vocab.parent, do_lower_case=True)
        name = stand_in_label(self.label(src), checkpoint)
        return ImageRewardModel(
            vision.to(dev).eval(),
            text.to(dev).eval(),
            mlp.to(dev).eval(),
            tokenizer,
            transform,
            dev,
            pick_dtype(dev, precision),
            name,
        )

    def memory(self, src: RewardSource, device: str, batch: int, precision: str) -> MemoryNeed:
        from curate.models.footprint import image_model_need

        med = IMAGEREWARD_MED_CONFIG
        model = self.model(src)
        if model != IMAGEREWARD and Path(model).expanduser().with_name("med_config.json").is_file():
            med = json.loads(Path(model).expanduser().with_name("med_config.json").read_text())
        params = _imagereward_params(json.dumps(med, sort_keys=True))
        vision = {**IMAGEREWARD_VIT}
        return image_model_need(
            params, device, batch, vision=vision, precision=precision, name=self.label(src)
        )

    def label(self, src: RewardSource) -> str:
        model = self.model(src)
        return f"imagereward/{model}" if model == IMAGEREWARD else f"imagereward/{Path(model).name}"


@functools.lru_cache(maxsize=8)
def _imagereward_params(med_json: str) -> int:
    """Parameters of ImageReward's ViT-L/16, text encoder and MLP, built on the meta device."""
    import torch
    from transformers import BlipTextModel, BlipVisionModel

    from curate.models.heads import AestheticHead

    med = json.loads(med_json)
    vision_cfg, text_cfg = _blip_configs(
        {**IMAGEREWARD_VIT, "intermediate": 4 * IMAGEREWARD_VIT["width"]}, med
    )
    with torch.device("meta"):
        nets = [
            BlipVisionModel(vision_cfg),
            BlipTextModel(text_cfg, add_pooling_layer=False),
            AestheticHead([med["hidden_size"], 1024, 128, 64, 16, 1], [0, 2, 4, 6, 7]),
        ]
    return sum(p.numel() for net in nets for p in net.parameters())


for _adapter in (PickScoreFamily(), HpsFamily(), ImageRewardFamily()):
    register_family(_adapter)
