"""open_clip models: L2-normalised image and text embeddings. Knows nothing of shards or configs.

``pretrained`` says where the weights come from, through open_clip's own loading code:

- a pretrained tag of the architecture (``openai``, ``datacomp_xl_s13b_b90k``, ...): the file is resolved
  as :mod:`curate.models.weights` says (model directory, else the hub) and given to open_clip as
  ``pretrained=<file>``;
- a file (``.safetensors``, ``.bin``, ``.pt``): ``pretrained=<file>`` for the named architecture;
- a folder with ``open_clip_config.json`` and weights, as on the hub: loaded with ``local-dir:<folder>``,
  config and all (how the demo's small CLIP and any fine-tuned checkpoint load);
- ``random``: random weights, for speed measurements only; recorded as such in ``clip_model``.

Weights that are a stand-in (:mod:`curate.models.stand_in`) load the same way; ``clip_model`` then ends in
" (stand-in)" (:func:`resolved_clip_label`), which is also what the LAION heads match to reuse embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.base import MemoryNeed, ModelNotFound
from curate.models.device import autocast, pick_device, pick_dtype
from curate.models.weights import WeightsSpec, local_path, resolve, stand_in_label

__all__ = ["ClipModel", "clip_label", "clip_weights", "resolved_clip_label"]

_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def clip_weights(model: str, pretrained: str) -> list[WeightsSpec]:
    """The hub files that hold ``model``/``pretrained`` (safetensors first); [] for a path or ``random``."""
    if pretrained == "random" or _is_path(pretrained) or model.startswith(("local-dir:", "hf-hub:")):
        return []
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ModelNotFound(
            f"open_clip has no pretrained tag {pretrained!r} for {model!r}"
            + (f"; its tags: {', '.join(tags)}" if tags else "; is the architecture name right?")
            + "; or give a path to a checkpoint file or folder"
        )
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    name = f"open_clip {model} ({pretrained})"
    if hub.count("/") >= 2:  # org/repo/filename
        repo, filename = hub.rsplit("/", 1)
        return [WeightsSpec(name, f"open_clip/{model}/{pretrained}/{filename}", repo, filename)]
    if hub:
        return [WeightsSpec(name, f"open_clip/{model}/{pretrained}/{f}", hub, f) for f in _FILES]
    url = cfg.get("url")
    return [WeightsSpec(name, f"open_clip/{model}/{pretrained}/{os.path.basename(url)}", url=url)]


def clip_label(model: str, pretrained: str) -> str:
    """What the ``clip_model`` column holds: ``ViT-L-14/openai``, or the name of the checkpoint folder or file."""
    if model.startswith("local-dir:"):
        return f"local-dir/{os.path.basename(model[len('local-dir:') :].rstrip('/'))}"
    if _is_path(pretrained):
        return f"{model}/{os.path.basename(pretrained.rstrip('/'))}"
    return f"{model}/{pretrained}"


def resolved_clip_label(model: str, pretrained: str) -> str:
    """The ``clip_model`` value a :meth:`ClipModel.load` of ``model``/``pretrained`` records, known without
    loading or downloading anything: :func:`clip_label`, with " (stand-in)" when the weights it would load
    (the first of its files in the model directory, or the given path) are a stand-in."""
    return stand_in_label(clip_label(model, pretrained), _local_weights(model, pretrained))


def _local_weights(model: str, pretrained: str) -> Path | None:
    """The weights file or folder a load would use, where it is here already; None for random weights or
    weights that would be downloaded."""
    if model.startswith("local-dir:"):
        return Path(model[len("local-dir:") :]).expanduser()
    if pretrained == "random":
        return None
    if _is_path(pretrained):
        return Path(pretrained).expanduser()
    try:
        specs = clip_weights(model, pretrained)
    except ModelNotFound:
        return None
    return next((local_path(s) for s in specs if local_path(s).exists()), None)


def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).expanduser().exists()


def resolve_clip(model: str, pretrained: str, download: bool = True) -> str | None:
    """The local weights file (or folder) for ``model``/``pretrained``; None for random weights."""
    if pretrained == "random":
        return None
    if _is_path(pretrained):
        return str(resolve(WeightsSpec(f"open_clip {model}", ""), pretrained))
    specs = clip_weights(model, pretrained)
    for spec in specs:
        if local_path(spec).exists():
            return str(local_path(spec))
    errors = []
    for spec in specs:
        try:
            return str(resolve(spec, download=download))
        except ModelNotFound as e:
            errors.append(e)
    raise errors[0]


@dataclass
class ClipModel:
    model: Any
    preprocess: Any  # PIL image -> CHW float tensor
    tokenizer: Any
    device: Any
    dtype: Any
    name: str  # "<architecture>/<pretrained>" (+ " (stand-in)"), recorded in the clip_model column

    @classmethod
    def load(
        cls,
        model: str,
        pretrained: str,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ) -> ClipModel:
        import open_clip
        import torch

        if threads:
            torch.set_num_threads(threads)
        dev = pick_device(device)
        weights = (
            model[len("local-dir:") :] if model.startswith("local-dir:") else resolve_clip(model, pretrained)
        )
        if weights is not None and Path(weights).is_dir():
            if not (Path(weights) / "open_clip_config.json").exists():
                raise ModelNotFound(f"{weights} is a folder without open_clip_config.json")
            net, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{weights}", device=dev)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{weights}")
        else:
            # A tag's weights go in as a file, so the tag's own settings (QuickGELU for OpenAI's weights, the
            # normalisation and resize they were trained with) must go in with them.
            tag = (
                {}
                if weights is None or _is_path(pretrained)
                else open_clip.get_pretrained_cfg(model, pretrained)
            )
            extra = {
                "force_quick_gelu": bool(tag.get("quick_gelu", False)),
                "image_mean": tag.get("mean"),
                "image_std": tag.get("std"),
                "image_interpolation": tag.get("interpolation"),
                "image_resize_mode": tag.get("resize_mode"),
            }
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=weights, device=dev, **extra
            )
            tokenizer = open_clip.get_tokenizer(model)
        net.eval()
        name = stand_in_label(clip_label(model, pretrained), weights)
        return cls(net, preprocess, tokenizer, dev, pick_dtype(dev, precision), name)

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def encode_images(self, tensors: list) -> np.ndarray:
        """Preprocessed image tensors -> [n, d] float32, each row of unit length."""
        import torch

        if not tensors:
            return np.zeros((0, self.dim), np.float32)
        batch = torch.stack(tensors).to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            emb = self.model.encode_image(batch)
        return _unit(emb)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            emb = _encode_text(self.model, tokens)
        return _unit(emb)


# Captions sorted by length and run in groups this size, each cut after its longest caption's last token.
TEXT_GROUP = 32


def _encode_text(model: Any, tokens: Any) -> Any:
    """``model.encode_text(tokens)`` without the padding where that is exact: open_clip's own ``CLIP`` has a
    causal text tower pooled at the end-of-text token, so the positions after it change nothing, and alt-text
    is mostly far shorter than the 77-token context. Other towers (HF text encoders, first-token pooling, no
    causal mask) run as they are."""
    import open_clip
    import torch

    if (
        type(model) is not open_clip.CLIP
        or getattr(model, "attn_mask", None) is None
        or model.text_pool_type not in ("argmax", "eos")
    ):
        return model.encode_text(tokens)
    if model.text_pool_type == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    order = torch.argsort(ends)
    out = []
    for group in order.split(TEXT_GROUP):
        length = int(ends[group].max()) + 1
        out.append(_encode_text_prefix(model, tokens[group, :length]))
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[order] = emb
    return result


def _encode_text_prefix(model: Any, text: Any) -> Any:
    """open_clip's ``CLIP.encode_text`` on the first ``text.shape[1]`` positions (open_clip 3.x)."""
    from open_clip.transformer import text_global_pool
    from torch import nn

    n = text.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, nn.Linear)
            else x @ model.text_projection
        )
    return x


def _unit(emb) -> np.ndarray:
    x = emb.float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_memory(model: str, pretrained: str, device: str, batch: int, precision: str = "auto") -> MemoryNeed:
    """What a worker running this CLIP needs, from open_clip's config (or the checkpoint folder's), without
    loading weights."""
    from curate.models.footprint import image_model_need, open_clip_folder_params, open_clip_params

    if model.startswith("local-dir:"):
        params, vision = open_clip_folder_params(model[len("local-dir:") :])
    elif Path(pretrained).expanduser().is_dir():
        params, vision = open_clip_folder_params(Path(pretrained).expanduser())
    else:
        params, vision = open_clip_params(model)
    kind = "cnn" if isinstance(vision.get("layers"), list) or vision.get("timm") else "vit"
    return image_model_need(
        params,
        device,
        batch,
        kind=kind,
        vision=vision,
        precision=precision,
        name=clip_label(model, pretrained),
    )
