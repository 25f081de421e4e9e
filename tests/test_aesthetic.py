"""aesthetic: LAION's improved aesthetic predictor as a tiny random head on a tiny random CLIP, saved and
loaded through the real loaders."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from conftest import score_shard
from PIL import Image
from pydantic import ValidationError
from support.data import make_tiny_clip

from curate.base import ModelNotFound
from curate.kit.image_batches import decode_rgb
from curate.models.clip import ClipModel
from curate.models.heads import AESTHETIC_L14, AestheticHead, load_aesthetic_head
from curate.stages.aesthetic import Aesthetic, AestheticConfig

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

N_GOOD = 5
SLOTS = [0, 2, 4, 6, 7]  # where the published head has its linear layers; dropouts between


def _image(i: int) -> bytes:
    rng = np.random.default_rng(100 + i)
    pixels = rng.integers(0, 256, (30 + 5 * i, 44, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _mixed_shard() -> pa.Table:
    """Rows 0..4 scoreable; 5 timed out; 6 dropped earlier; 7 bytes that do not decode."""
    good = [_image(i) for i in range(N_GOOD)]
    return score_shard(
        [*good, None, good[1], b"GIF89a broken"],
        status=["ok"] * N_GOOD + ["timeout", "ok", "ok"],
        drop=[None] * (N_GOOD + 1) + ["nsfw", None],
    )


def _random_state(dims: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    head = AestheticHead(dims, SLOTS)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in head.state_dict().items()}


def _by_hand(state: dict, emb: np.ndarray) -> np.ndarray:
    """The improved aesthetic predictor written out in numpy: affine maps, no activations."""
    x = emb.astype(np.float64)
    for s in SLOTS:
        x = x @ state[f"layers.{s}.weight"].double().numpy().T + state[f"layers.{s}.bias"].double().numpy()
    return x[:, 0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aesthetic-head")
    state = _random_state([32, 24, 16, 8, 4, 1])
    torch.save(state, folder / "tiny_aesthetic.pth")
    safetensors_torch.save_file(state, str(folder / "tiny_aesthetic.safetensors"))
    return state, folder / "tiny_aesthetic.pth", folder / "tiny_aesthetic.safetensors"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=1)


def _stage(tiny_clip, head_path) -> Aesthetic:
    stage = Aesthetic(
        AestheticConfig(
            head=str(head_path), clip_model=f"local-dir:{tiny_clip}", clip_pretrained="random", device="cpu"
        )
    )
    stage.ensure_setup()
    return stage


def test_head_loads_from_pth_and_safetensors(tiny_head):
    state, pth, st = tiny_head
    emb = _unit(np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32))
    for path in (pth, st):
        head = load_aesthetic_head(path, device="cpu")
        assert head.input_dim == 32
        np.testing.assert_allclose(head.score(emb), _by_hand(state, emb), rtol=1e-5, atol=1e-5)


def test_the_published_layout_loads_strictly_and_others_do_not(tmp_path):
    state = _random_state([768, 1024, 128, 64, 16, 1])
    assert sorted(state) == sorted(f"layers.{s}.{p}" for s in SLOTS for p in ("weight", "bias"))
    torch.save(state, tmp_path / "l14.pth")
    assert load_aesthetic_head(tmp_path / "l14.pth", device="cpu").input_dim == 768
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor head"):  # an NSFW head
        torch.save({"norm.mean": torch.zeros(4), "linear_1.weight": torch.zeros(1, 4)}, tmp_path / "n.pth")
        load_aesthetic_head(tmp_path / "n.pth")
    with pytest.raises(ValueError, match="does not load"):  # a linear layer that does not chain
        torch.save({**state, "layers.2.weight": torch.zeros(128, 999)}, tmp_path / "bad.pth")
        load_aesthetic_head(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_aesthetic_head(tmp_path / "l14.onnx")


def test_score_is_the_head_on_the_clip_embedding(tiny_clip, tiny_head):
    state, _, st = tiny_head
    stage = _stage(tiny_clip, st)
    out = stage(_mixed_shard())
    assert out.schema.field("aesthetic_score").type == pa.float32()
    scores = out["aesthetic_score"].to_pylist()
    assert scores[N_GOOD:] == [None, None, None]
    clip = ClipModel.load(f"local-dir:{tiny_clip}", "random", device="cpu")
    emb = clip.encode_images([clip.preprocess(decode_rgb(_image(i))) for i in range(N_GOOD)])
    emb = _unit(emb.astype(np.float16).astype(np.float32))  # as stored in image_embedding
    np.testing.assert_allclose(scores[:N_GOOD], _by_hand(state, emb), rtol=1e-5, atol=1e-5)
    assert stage(_mixed_shard())["aesthetic_score"].to_pylist() == scores  # deterministic


def test_reuses_embeddings_of_its_clip_only(tiny_clip, tiny_head):
    state, pth, _ = tiny_head
    n = N_GOOD
    planted = _unit(np.random.default_rng(5).normal(size=(n, 32))).astype(np.float16)
    own = f"local-dir/{tiny_clip.name}"
    emb = pa.FixedSizeListArray.from_arrays(pa.array(planted.reshape(-1), pa.float16()), 32)
    emb = emb.cast(pa.list_(pa.float16()))
    images = [_image(i) for i in range(n)]

    stage = _stage(tiny_clip, pth)
    out = stage(score_shard(images, clip_model=pa.array([own] * n), image_embedding=emb))
    assert not stage.scorer.clip_loaded
    want = _by_hand(state, _unit(planted.astype(np.float32)))
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), want, rtol=1e-5, atol=1e-5)

    # Embeddings of another CLIP are not this head's input: the rows are embedded again.
    stage = _stage(tiny_clip, pth)
    out = stage(score_shard(images, clip_model=pa.array(["ViT-L-14/openai"] * n), image_embedding=emb))
    assert stage.scorer.clip_loaded
    fresh = _stage(tiny_clip, pth)(score_shard(images))["aesthetic_score"].to_numpy()
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), fresh, rtol=1e-6)
    assert not np.allclose(fresh, want)


def test_weights_and_config():
    specs = Aesthetic().weights()
    assert specs[0] == AESTHETIC_L14.spec
    assert specs[0].url == (
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
        "sac%2Blogos%2Bava1-l14-linearMSE.pth"
    )
    assert specs[0].local == "laion/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    assert AESTHETIC_L14.clip_label == "ViT-L-14/openai"
    assert {s.name for s in specs[1:]} == {"open_clip ViT-L-14 (openai)"}
    assert Aesthetic.reads == ("image", "status", "drop_reason")
    assert Aesthetic.writes == ("aesthetic_score",)
    with pytest.raises(ValidationError, match="no aesthetic head for the CLIP 'ViT-B-32/openai'"):
        AestheticConfig(clip_model="ViT-B-32")
    with pytest.raises(ValidationError, match="extra"):
        AestheticConfig(backend="opennsfw")


def test_offline_without_the_head_names_curate_models_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound, match="curate models fetch") as e:
        Aesthetic().ensure_setup()
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(e.value)
