"""Sample-quality metrics for the trainer: Fréchet distance (FID), kernel distance (KID) and CLIPScore.

The formulas need only numpy (no scipy); the features come from a ``FeatureExtractor``:

- ``inception``: the FID Inception network, the one FID and KID numbers in papers are computed with
  (pytorch-fid's port of the TensorFlow graph: ``pytorch_fid.inception.InceptionV3``, its 2048-d pool
  features, inputs resized bilinearly to 299x299 and scaled to [-1, 1]). Its weights are not fetched here
  (the trainer must run offline): ``inception_weights`` is a local copy of pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` (from its GitHub release), loaded strictly.
- ``torchvision_inception``: torchvision's Inception-v3 with a local state dict (``.pth`` or
  ``.safetensors``). Close to, but not, the FID network: its numbers do not compare with published FIDs.
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
    "fid_inception",
    "frechet_distance",
    "is_fid_inception",
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


def _to_unit(im) -> Any:
    """A PIL image -> [3, H, W] float in [0, 1], as pytorch-fid's ToTensor gives it."""
    import torch

    return torch.from_numpy(np.array(im.convert("RGB"), np.float32)).permute(2, 0, 1) / 255.0


def _by_size(images: list, run) -> np.ndarray:
    """``run(batch)`` over the images grouped by size (a batch must be one size), in the images' order."""
    import torch

    out: list[Any] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    for idx in groups.values():
        feats = run(torch.stack([_to_unit(images[i]) for i in idx]))
        for i, f in zip(idx, feats, strict=True):
            out[i] = f
    return np.stack(out)


def is_fid_inception(state: dict) -> bool:
    """Whether a state dict is the FID Inception's (1008 classes, no auxiliary head) rather than
    torchvision's Inception-v3 (1000 classes, AuxLogits)."""
    fc = state.get("fc.weight")
    return fc is not None and fc.shape[0] == 1008 and not any(k.startswith("AuxLogits.") for k in state)


def fid_inception(weights: Path):
    """pytorch-fid's ``InceptionV3`` (the FID network, pool features) with the weights file at ``weights``,
    loaded strictly. pytorch-fid only loads its weights from its release URL; here its loader is handed the
    local file instead, so the network, its blocks and its input handling stay pytorch-fid's own."""
    from unittest import mock

    from pytorch_fid import inception as pfi

    state = _load_state_dict(weights)
    if not is_fid_inception(state):
        raise ValueError(
            f"{weights} is not the FID Inception's weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
            "for a torchvision Inception-v3 state dict use feature_extractor: torchvision_inception"
        )
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)


def _fid_inception_extractor(weights: Path, device: str, batch_size: int) -> FeatureExtractor:
    import torch

    net = fid_inception(weights).eval().to(device)

    def run(batch):
        with torch.inference_mode():
            return net(batch.to(device))[0].squeeze(-1).squeeze(-1).float().cpu().numpy()

    return FeatureExtractor(
        f"fid_inception_v3:{weights.name}", 2048, lambda ims: _by_size(ims, run), batch_size
    )


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

    return FeatureExtractor(f"torchvision_inception_v3:{weights.name}", 2048, encode, batch_size)


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

    ``kind``: ``inception`` (the FID Inception, :func:`fid_inception`, with pytorch-fid's weights file at
    ``inception_weights``), ``torchvision_inception`` (torchvision's Inception-v3 with the state dict at
    ``inception_weights``, a ``.pth`` read with ``weights_only=True`` or a ``.safetensors``; images resized
    bilinearly to 299x299, ImageNet normalisation, the 2048-d pool features), ``clip`` (the unit-length image
    embeddings of ``clip``, an object with ``preprocess(PIL image) -> tensor`` and ``encode_images(list of
    tensors) -> array``, such as ``curate.models.clip.ClipModel``), or ``auto``: when ``inception_weights``
    names an existing file, the Inception its layout says (the FID one or torchvision's), else clip when one
    is passed. Inception weights cannot be downloaded here (the trainer runs offline), hence the CLIP
    fallback; see the module docstring on why CLIP features are a sound choice and why the kinds' numbers
    must not be compared.
    """
    weights = Path(inception_weights) if inception_weights else None
    if kind == "auto":
        if weights is not None and weights.is_file():
            kind = "inception" if is_fid_inception(_load_state_dict(weights)) else "torchvision_inception"
        elif clip is not None:
            kind = "clip"
        else:
            why = f"{weights} does not exist" if weights is not None else "no inception_weights given"
            raise ValueError(
                f"no feature extractor available ({why}, no clip model): pass inception_weights=<pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth, or a torchvision Inception-v3 state dict> or "
                "clip=<a curate.models.clip.ClipModel>"
            )
    if kind in ("inception", "torchvision_inception"):
        if weights is None or not weights.is_file():
            raise ValueError(
                f"kind={kind!r} needs inception_weights=<a local Inception weights file>, got {weights}"
            )
        if kind == "inception":
            return _fid_inception_extractor(weights, device, batch_size)
        return _inception_extractor(weights, device, batch_size)
    if kind == "clip":
        if clip is None:
            raise ValueError("kind='clip' needs clip=<a curate.models.clip.ClipModel>")
        return _clip_extractor(clip, batch_size)
    raise ValueError(
        f"unknown feature extractor kind {kind!r}: use 'auto', 'inception', 'torchvision_inception' or 'clip'"
    )
