"""Sample-quality metrics for the trainer: Fréchet distance (FID), kernel distance (KID) and CLIPScore.

The formulas need only numpy (no scipy); the features come from a ``FeatureExtractor``:

- ``inception``: torchvision's Inception-v3, 2048-d pool features, the network of FID and KID. Its weights
  are not fetched here (the trainer must run offline): pass a local state dict (``.pth`` or
  ``.safetensors``) as ``inception_weights``. torchvision's ImageNet weights are close to, but not the same
  as, the TensorFlow graph of the original FID, so even these numbers differ a little from clean-fid's or
  torch-fidelity's.
- ``clip``: the unit-length image embeddings of the CLIP model that the curate run already has (a
  ``curate.models.clip.ClipModel``). Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in Fréchet
  Inception Distance", show that Inception features let FID follow ImageNet class content rather than
  perceived quality, and argue for Fréchet distances in CLIP feature space.

Numbers from different extractors (or different weights) are not comparable: ``FeatureExtractor.name`` says
which was used, and belongs next to every number reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FeatureExtractor",
    "clip_score",
    "frechet_distance",
    "kernel_inception_distance",
    "load_feature_extractor",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _features(feats: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(feats, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be [n, d] with n >= 2, got shape {x.shape}")
    return x


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues from rounding -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ([n, d] each; FID on Inception features).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. Tr (S_a S_b)^(1/2) is the sum of the
    square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD matrix with the same
    eigenvalues as S_a S_b, so no non-symmetric matrix square root (scipy's ``sqrtm``) is needed and tiny
    negative eigenvalues from rounding are clipped to 0.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-sized samples under k(x, y) = (x.y / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 10,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018, "Demystifying MMD GANs"): (mean, std) over random subsets.

    Each of ``subsets`` rounds draws ``subset_size`` rows (capped at the smaller set's size) from each set
    without replacement and computes the unbiased MMD^2 under the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, as torch-fidelity does. Unbiased, so it can be slightly negative for two
    samples of one distribution; the std is over the subsets (ddof 0).
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    scores = np.array(
        [
            _mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(subsets)
        ]
    )
    return float(scores.mean()), float(scores.std())


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIPScore: the mean over (image, text) pairs of 100 * max(cos, 0).

    Rows are paired in order ([n, d] each, or one [d] vector each) and need not be unit length. This is
    Hessel et al. 2021's per-pair clamp with w = 100; torchmetrics' ``CLIPScore`` clamps the mean instead,
    which is the same unless some pair has a negative cosine.
    """
    a = np.atleast_2d(np.asarray(image_emb, np.float64))
    b = np.atleast_2d(np.asarray(text_emb, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings must pair up, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no embeddings to score")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(1)
    return float((100 * np.clip(cos, 0, None)).mean())


@dataclass
class FeatureExtractor:
    """Images -> [n, dim] float64 features for ``frechet_distance`` and ``kernel_inception_distance``.

    ``name`` says which network made them (numbers from different extractors are not comparable);
    ``encode`` maps a list of PIL images to an array, in batches of ``batch_size``.
    """

    name: str
    dim: int
    encode: Any
    batch_size: int = 64

    def __call__(self, images: list) -> np.ndarray:
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float64)
        parts = [
            np.asarray(self.encode(images[i : i + self.batch_size]), np.float64)
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(parts).reshape(len(images), self.dim)


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _inception_extractor(weights: Path, device: str, batch_size: int) -> FeatureExtractor:
    import torch
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(_load_state_dict(weights))
    net.fc = torch.nn.Identity()
    net.eval().to(device)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)

    def to_input(im) -> torch.Tensor:  # one at a time: images of a batch may differ in size
        x = torch.from_numpy(np.array(im.convert("RGB"), np.float32)).permute(2, 0, 1)[None] / 255.0
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return ((x - mean) / std)[0]

    def encode(images: list) -> np.ndarray:
        batch = torch.stack([to_input(im) for im in images]).to(device)
        with torch.inference_mode():
            return net(batch).float().cpu().numpy()

    return FeatureExtractor(f"inception_v3:{weights.name}", 2048, encode, batch_size)


def _clip_extractor(clip: Any, batch_size: int) -> FeatureExtractor:
    def encode(images: list) -> np.ndarray:
        return clip.encode_images([clip.preprocess(im.convert("RGB")) for im in images])

    dim = int(clip.dim) if hasattr(clip, "dim") else int(encode([_blank()]).shape[1])
    return FeatureExtractor(f"clip:{getattr(clip, 'name', type(clip).__name__)}", dim, encode, batch_size)


def _blank():
    from PIL import Image

    return Image.new("RGB", (224, 224), (127, 127, 127))


def load_feature_extractor(
    kind: str = "auto",
    clip: Any = None,
    inception_weights: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> FeatureExtractor:
    """A ``FeatureExtractor`` for FD / KID.

    ``kind``: ``inception`` (torchvision Inception-v3 with the state dict at ``inception_weights``, a ``.pth``
    read with ``weights_only=True`` or a ``.safetensors``; images resized bilinearly to 299x299, ImageNet
    normalisation, the 2048-d pool features), ``clip`` (the unit-length image embeddings of ``clip``, an
    object with ``preprocess(PIL image) -> tensor`` and ``encode_images(list of tensors) -> array``, such as
    ``curate.models.clip.ClipModel``), or ``auto``: inception when ``inception_weights`` names an existing
    file, else clip when one is passed. Inception weights cannot be downloaded here (the trainer runs
    offline), hence the CLIP fallback; see the module docstring on why CLIP features are a sound choice and
    why the two kinds' numbers must not be compared.
    """
    weights = Path(inception_weights) if inception_weights else None
    if kind == "auto":
        if weights is not None and weights.is_file():
            kind = "inception"
        elif clip is not None:
            kind = "clip"
        else:
            why = f"{weights} does not exist" if weights is not None else "no inception_weights given"
            raise ValueError(
                f"no feature extractor available ({why}, no clip model): pass inception_weights=<a local "
                "Inception-v3 state dict, .pth or .safetensors> or clip=<a curate.models.clip.ClipModel>"
            )
    if kind == "inception":
        if weights is None or not weights.is_file():
            raise ValueError(
                f"kind='inception' needs inception_weights=<a local Inception-v3 state dict>, got {weights}"
            )
        return _inception_extractor(weights, device, batch_size)
    if kind == "clip":
        if clip is None:
            raise ValueError("kind='clip' needs clip=<a curate.models.clip.ClipModel>")
        return _clip_extractor(clip, batch_size)
    raise ValueError(f"unknown feature extractor kind {kind!r}: use 'auto', 'inception' or 'clip'")
