from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from curate.train.metrics import (
    FeatureExtractor,
    clip_score,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
)

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (32, 32), (64, 24)]
    return [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(n))
    ]


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16)) * 3 + 1
    scale = float(np.trace(np.cov(x, rowvar=False)))
    assert abs(frechet_distance(x, x)) < 1e-6 * scale


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    # The features' own means and covariances, so the check is exact (no sampling error).
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6))
    a = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T
    b = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T
    var_a, var_b = np.array([1.0, 2, 3, 4, 5, 6]), np.array([6.0, 1, 0.5, 2, 9, 0.1])
    mu_a, mu_b = np.arange(6.0), np.arange(6.0)[::-1] * 0.5
    a, b = a * np.sqrt(var_a) + mu_a, b * np.sqrt(var_b) + mu_b
    expected = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula: the principal square root of S_a S_b by its eigendecomposition."""
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eig(cov_a @ cov_b)
    covmean = (vectors * np.sqrt(values.astype(complex))) @ np.linalg.inv(vectors)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean.real))


def test_frechet_distance_matches_the_direct_formula():
    rng = np.random.default_rng(2)
    for d in (1, 3, 8):
        a = rng.normal(size=(50, d)) @ rng.normal(size=(d, d))
        b = rng.normal(size=(40, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
        assert frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-7, abs=1e-9)
        assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-7)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_kernel_inception_distance():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
    same_mean, same_std = kernel_inception_distance(a, b, subsets=10, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=10, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted > 0.05
    assert shifted > 20 * abs(same_mean)
    # Deterministic for a seed; the subset size is capped at the smaller set.
    assert kernel_inception_distance(a, b, seed=5) == kernel_inception_distance(a, b, seed=5)
    small = kernel_inception_distance(a[:50], b, subsets=3)
    assert np.isfinite(small[0])


def test_kernel_inception_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 1
    k = lambda p, q: (p @ q / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(7)) / 49
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=100)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)  # every subset is the whole (shuffled) set
    assert std == pytest.approx(0, abs=1e-9)


def test_clip_score():
    assert clip_score(np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])) == pytest.approx(50.0)
    assert clip_score(np.array([[3.0, 0.0]]), np.array([[-2.0, 0.1]])) == 0.0
    image = np.array([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 0.0]])
    text = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    assert clip_score(image, text) == pytest.approx((100 + 0 + 100 / np.sqrt(2)) / 3)
    with pytest.raises(ValueError):
        clip_score(image, text[:2])


def test_feature_extractor_batches():
    extractor = FeatureExtractor("sizes", 2, lambda ims: [im.size for im in ims], batch_size=2)
    images = _images(5)
    assert extractor(images).tolist() == [list(im.size) for im in images]
    assert extractor([]).shape == (0, 2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_inception_extractor(tmp_path, suffix):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    for kind in ("torchvision_inception", "auto"):
        extractor = load_feature_extractor(kind, inception_weights=str(path), batch_size=2)
        assert extractor.dim == 2048 and extractor.name.startswith("torchvision_inception_v3:")
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_feature_extractor("inception", inception_weights=str(path))
    feats = extractor(_images(3))
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])


def _fid_inception_file(path, seed: int = 0):
    """A file of pytorch-fid's weights layout (pt_inception-2015-12-05-6726825d.pth): the state dict of
    fid_inception_v3's network (torchvision's Inception-v3 with 1008 classes, no auxiliary head, the FID
    blocks), random here, saved with torch.save."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    torch.save(net.state_dict(), path)
    return net


def test_fid_inception_loads_the_pytorch_fid_weights_file_and_gives_its_pool_features(tmp_path):
    """The README's file, pytorch-fid's pt_inception-2015-12-05-6726825d.pth, loads strictly into pytorch-fid's
    own InceptionV3, and the features are that network's: its pool3 output for [0, 1] inputs."""
    pytest.importorskip("pytorch_fid")
    from pytorch_fid.inception import InceptionV3

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    net = _fid_inception_file(path)
    for kind in ("inception", "auto"):
        extractor = load_feature_extractor(kind, inception_weights=str(path), batch_size=2)
        assert extractor.dim == 2048 and extractor.name == f"fid_inception_v3:{path.name}"
    images = _images(5)  # three sizes: batched by size, returned in order
    feats = extractor(images)
    assert feats.shape == (5, 2048) and np.isfinite(feats).all()
    # the same as pytorch-fid's InceptionV3 built on this state dict, image by image
    from curate.train.metrics import fid_inception

    reference = fid_inception(path).eval()
    assert isinstance(reference, InceptionV3)
    # the file's weights, first and last layers (strictly loaded: every other layer too)
    assert torch.equal(reference.blocks[0][0].conv.weight, net.Conv2d_1a_3x3.conv.weight)
    assert torch.equal(reference.blocks[3][2].branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)
    for im, f in zip(images, feats, strict=True):
        x = torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            want = reference(x)[0].flatten().numpy()
        np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-5)
    # a truncated or renamed state dict fails the strict load instead of scoring with random layers
    state = torch.load(path, weights_only=True)
    state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_feature_extractor("inception", inception_weights=str(tmp_path / "broken.pth"))


def test_auto_without_anything_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match=r"inception_weights=.*clip="):
        load_feature_extractor("auto")
    with pytest.raises(ValueError, match="does not exist"):
        load_feature_extractor("auto", inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="inception_weights"):
        load_feature_extractor("inception")
    with pytest.raises(ValueError, match="clip="):
        load_feature_extractor("clip")
    with pytest.raises(ValueError, match="unknown"):
        load_feature_extractor("dino")


def test_clip_extractor(tmp_path):
    pytest.importorskip("open_clip")
    from support.data import make_tiny_clip

    from curate.models.clip import ClipModel

    folder = make_tiny_clip(tmp_path / "clip")
    clip = ClipModel.load(f"local-dir:{folder}", "", device="cpu", precision="fp32")
    for kind in ("clip", "auto"):
        extractor = load_feature_extractor(kind, clip=clip, inception_weights=tmp_path / "missing.pth")
        assert extractor.name.startswith("clip") and extractor.dim == clip.dim
    feats = extractor(_images(4))
    assert feats.shape == (4, clip.dim) and feats.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert frechet_distance(feats, feats) == pytest.approx(0, abs=1e-9)
