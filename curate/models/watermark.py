"""LAION's watermark detector (LAION-AI/LAION-5B-WatermarkDetection): P(watermark) per image. Knows nothing
of shards or configs.

An EfficientNet-B3 from timm whose classifier is replaced by a small MLP (1536 -> 625 -> 256 -> 2), trained
on images resized to 256x256 and normalised with ImageNet's mean and std; class 0 is "watermark". LAION
created it as ``efficientnet_b3a``, which timm (>= 0.9) folds into ``efficientnet_b3``: the same layers and
parameter names, so the weights load into either. The MLP's widths are read from the weights file, so a
small test model with the same layout loads through the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.base import ModelNotFound
from curate.models.device import autocast, pick_device, pick_dtype
from curate.models.weights import WeightsSpec, resolve

__all__ = ["LAION_WATERMARK", "WatermarkModel", "build_watermark_net", "load_state_dict"]

LAION_WATERMARK = WeightsSpec(
    name="LAION watermark detector (EfficientNet-B3, watermark_model_v1)",
    local="laion/watermark/watermark_model_v1.pt",
    url="https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
)
IMAGE_SIZE = 256
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_HEAD = ("classifier.0.weight", "classifier.3.weight", "classifier.5.weight")  # the MLP's three Linears


def build_watermark_net(arch: str = "efficientnet_b3", hidden: tuple[int, int] = (625, 256)) -> Any:
    """The timm backbone ``arch`` with LAION's classifier head, randomly initialised, in eval mode."""
    import timm
    from torch import nn

    net = timm.create_model(arch, pretrained=False, num_classes=2)
    if not isinstance(getattr(net, "classifier", None), nn.Module):
        raise ModelNotFound(f"timm's {arch!r} has no `classifier` head: LAION's detector is an EfficientNet")
    net.classifier = nn.Sequential(
        nn.Linear(net.num_features, hidden[0]),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 2),
    )
    return net.eval()


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file, or from a torch file (``.pt``/``.pth``/``.bin``) without running
    any pickled code. A ``module.`` prefix (a model saved from DistributedDataParallel) is dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelNotFound(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class WatermarkModel:
    net: Any
    transform: Any  # PIL image -> [3, 256, 256] float tensor
    device: Any
    dtype: Any

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike | None = None,
        arch: str = "efficientnet_b3",
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
    ) -> WatermarkModel:
        """The detector with weights from ``weights``, or resolved as :mod:`curate.models.weights` says
        (model directory, else a download); raises :class:`ModelNotFound` when there are none."""
        import torch
        from torchvision import transforms as T

        if threads:
            torch.set_num_threads(threads)
        path = resolve(LAION_WATERMARK, weights)
        state = load_state_dict(path)
        missing = [k for k in _HEAD if k not in state]
        if missing:
            raise ModelNotFound(
                f"{path} is not a LAION watermark detector: it lacks {', '.join(missing)} "
                "(expected timm EfficientNet weights with LAION's 3-layer classifier head)"
            )
        net = build_watermark_net(arch, (state[_HEAD[0]].shape[0], state[_HEAD[1]].shape[0]))
        features = state[_HEAD[0]].shape[1]
        if features != net.num_features:
            raise ModelNotFound(
                f"{path}: its head takes {features} features but timm's {arch!r} gives {net.num_features}; "
                "is the architecture right?"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:  # names every missing and unexpected key: keep the first lines
            detail = " ".join(str(e).splitlines()[:3])[:500]
            raise ModelNotFound(f"{path} does not fit timm's {arch!r} with LAION's head: {detail}") from None
        dev = pick_device(device)
        net = net.to(dev).eval()
        transform = T.Compose([T.Resize((IMAGE_SIZE, IMAGE_SIZE)), T.ToTensor(), T.Normalize(_MEAN, _STD)])
        return cls(net, transform, dev, pick_dtype(dev, precision))

    def preprocess(self, img: Any) -> Any:
        """An RGB PIL image -> the [3, 256, 256] tensor the detector takes."""
        return self.transform(img)

    def score(self, tensors: list) -> np.ndarray:
        """Preprocessed tensors -> P(watermark) per image, float32 in [0, 1]."""
        import torch

        if not tensors:
            return np.zeros(0, np.float32)
        batch = torch.stack(tensors).to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.net(batch)
        return torch.softmax(logits.float(), dim=1)[:, 0].cpu().numpy().astype(np.float32)
