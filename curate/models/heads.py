"""LAION's small heads on CLIP image embeddings: the CLIP-based NSFW detector and the improved aesthetic
predictor. Knows nothing of shards or configs: loads a head's weights and turns embeddings into scores.

Both heads take L2-normalised image embeddings of the CLIP they were trained on (``HeadWeights.clip_model``
/ ``clip_pretrained``). Their layer stacks are built from the shapes in the state dict, so LAION's files,
fine-tuned variants of the same layout and the tiny heads of the tests all load with
``load_state_dict(strict=True)``: a file of another layout fails to load instead of scoring nonsense.

Weights are read as tensors only: ``.safetensors`` with safetensors, ``.pth``/``.pt``/``.bin`` with
``torch.load(weights_only=True)``, which refuses pickles that would build anything but tensors and
containers (a downloaded ``.pth`` never runs code). A head loaded from a stand-in (random weights,
:mod:`curate.models.stand_in`) is named with " (stand-in)".
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curate.models.device import pick_device
from curate.models.weights import WeightsSpec, stand_in_label

__all__ = [
    "AESTHETIC_HEADS",
    "AESTHETIC_L14",
    "NSFW_B32",
    "NSFW_HEADS",
    "NSFW_L14",
    "AestheticHead",
    "EmbeddingHead",
    "HeadWeights",
    "NsfwHead",
    "load_aesthetic_head",
    "load_head_state_dict",
    "load_nsfw_head",
]


@dataclass(frozen=True)
class HeadWeights:
    """A head's weights file and the CLIP whose image embeddings it was trained on."""

    spec: WeightsSpec
    clip_model: str
    clip_pretrained: str

    @property
    def clip_label(self) -> str:
        """The ``clip_model`` column value of embeddings this head takes (see ``clip.clip_label``)."""
        return f"{self.clip_model}/{self.clip_pretrained}"


_NSFW_REPO = "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models"

NSFW_L14 = HeadWeights(
    WeightsSpec(
        "LAION CLIP-based NSFW detector (ViT-L/14, openai)",
        "laion/nsfw/clip_ViT-L-14_openai_binary_nsfw_head.pth",
        url=f"{_NSFW_REPO}/clip_ViT-L-14_openai_binary_nsfw_head.pth",
    ),
    "ViT-L-14",
    "openai",
)
NSFW_B32 = HeadWeights(
    WeightsSpec(
        "LAION CLIP-based NSFW detector (ViT-B/32, openai)",
        "laion/nsfw/clip_ViT-B-32_openai_binary_nsfw_head.pth",
        url=f"{_NSFW_REPO}/clip_ViT-B-32_openai_binary_nsfw_head.pth",
    ),
    "ViT-B-32",
    "openai",
)
AESTHETIC_L14 = HeadWeights(
    WeightsSpec(
        "LAION improved aesthetic predictor (sac+logos+ava1, ViT-L/14, openai)",
        "laion/aesthetic/sac+logos+ava1-l14-linearMSE.pth",
        url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    ),
    "ViT-L-14",
    "openai",
)

# The published heads by the CLIP they expect: the default head for a configured CLIP.
NSFW_HEADS = {h.clip_label: h for h in (NSFW_L14, NSFW_B32)}
AESTHETIC_HEADS = {h.clip_label: h for h in (AESTHETIC_L14,)}


# --- the modules -------------------------------------------------------------------------------------


class Normalization(nn.Module):
    """Keras' Normalization layer as LAION ported it: ``(x - mean) / (sqrt(variance) + 1e-10)``."""

    def __init__(self, mean_shape: torch.Size, variance_shape: torch.Size):
        super().__init__()
        self.register_buffer("mean", torch.zeros(mean_shape))
        self.register_buffer("variance", torch.ones(variance_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.variance.sqrt() + 1e-10)


class NsfwHead(nn.Module):
    """LAION's CLIP-based NSFW detector: ``norm``, then ``linear_1 .. linear_N`` with ReLU after every layer
    but the last, then a sigmoid. ``dims`` are the widths, input first: L/14 768-64-512-256-1, B/32
    512-32-32-1 (B/32's dropout is inert at eval and holds no weights, so it is left out)."""

    def __init__(self, dims: list[int], mean_shape: torch.Size, variance_shape: torch.Size):
        super().__init__()
        self.norm = Normalization(mean_shape, variance_shape)
        self.n_linear = len(dims) - 1
        for i in range(self.n_linear):
            setattr(self, f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for i in range(1, self.n_linear + 1):
            x = getattr(self, f"linear_{i}")(x)
            if i < self.n_linear:
                x = torch.relu(x)
        return torch.sigmoid(x)


class AestheticHead(nn.Module):
    """The improved aesthetic predictor's ``layers``: linear layers with no activation between them (the
    published MLP is linear end to end); the dropouts of the original sit at the index gaps (``layers.1``,
    ``.3``, ``.5``) as identities, which is what a dropout is at eval."""

    def __init__(self, dims: list[int], slots: list[int]):
        super().__init__()
        layers: list[nn.Module] = [nn.Identity() for _ in range(slots[-1] + 1)]
        for k, slot in enumerate(slots):
            layers[slot] = nn.Linear(dims[k], dims[k + 1])
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# --- loading -----------------------------------------------------------------------------------------


def load_head_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a ``torch.save``-d state dict read with
    ``weights_only=True`` (a pickle that would build any other object is refused, never run)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a plain tensor state dict; refused to unpickle it: {e}") from None
    else:
        raise ValueError(
            f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth, .pt or .bin"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def nsfw_head_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> NsfwHead:
    n = 0
    while f"linear_{n + 1}.weight" in state:
        n += 1
    if n == 0 or "norm.mean" not in state or "norm.variance" not in state:
        raise ValueError(
            f"{source}: not a LAION CLIP-based NSFW head (expected norm.mean, norm.variance and "
            f"linear_1..N weights; got {sorted(state)[:8]})"
        )
    dims = [state["linear_1.weight"].shape[1]] + [
        state[f"linear_{i}.weight"].shape[0] for i in range(1, n + 1)
    ]
    head = NsfwHead(dims, state["norm.mean"].shape, state["norm.variance"].shape)
    _load_strict(head, state, source)
    return head


_LAYER = re.compile(r"layers\.(\d+)\.(weight|bias)")


def aesthetic_head_from_state_dict(
    state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> AestheticHead:
    slots = sorted({int(m.group(1)) for k in state if (m := _LAYER.fullmatch(k))})
    # Gaps of one index are the original's dropouts; wider gaps would hide activations this head lacks.
    if not slots or slots[0] != 0 or any(b - a > 2 for a, b in pairwise(slots)):
        raise ValueError(
            f"{source}: not an improved-aesthetic-predictor head (expected layers.0/2/4/6/7 linear layers; "
            f"got {sorted(state)[:8]})"
        )
    dims = [state["layers.0.weight"].shape[1]] + [state[f"layers.{s}.weight"].shape[0] for s in slots]
    head = AestheticHead(dims, slots)
    _load_strict(head, state, source)
    return head


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: does not load into {type(module).__name__}: {e}") from None


@dataclass
class EmbeddingHead:
    """A loaded head, in fp32 and eval mode, on ``device``."""

    net: nn.Module
    device: Any
    input_dim: int
    name: str  # the weights file's stem (+ " (stand-in)"), recorded with the scores

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, input_dim] L2-normalised embeddings -> [n] float32 scores."""
        if len(embeddings) == 0:
            return np.zeros(0, np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise ValueError(f"{self.name} takes [n, {self.input_dim}] embeddings, got {embeddings.shape}")
        x = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.net(x)
        return out.reshape(-1).float().cpu().numpy()


def load_nsfw_head(path: str | os.PathLike, device: str = "auto") -> EmbeddingHead:
    """A LAION CLIP-based NSFW head; its scores are probabilities, 0..1."""
    net = nsfw_head_from_state_dict(load_head_state_dict(path), str(path))
    return _ready(net, net.linear_1.in_features, path, device)


def load_aesthetic_head(path: str | os.PathLike, device: str = "auto") -> EmbeddingHead:
    """LAION's improved aesthetic predictor; its scores are ratings, roughly 1..10."""
    net = aesthetic_head_from_state_dict(load_head_state_dict(path), str(path))
    return _ready(net, net.layers[0].in_features, path, device)


def _ready(net: nn.Module, input_dim: int, path: str | os.PathLike, device: str) -> EmbeddingHead:
    # Always fp32: these heads cost under a million multiply-adds a row, and a score should not depend on
    # the GPU it ran on.
    dev = pick_device(device)
    net = net.float().to(dev).eval()
    return EmbeddingHead(net, dev, int(input_dim), stand_in_label(Path(path).stem, path))
