"""clip_score with a tiny randomly initialised open_clip model, saved and loaded through open_clip's own code."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shard_files, write_pipeline
from PIL import Image
from support.data import make_tiny_clip

from curate.models.clip import ClipModel
from curate.stages.clip_score import ClipScore, ClipScoreConfig

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _jpeg(colour, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _table() -> pa.Table:
    images = [_jpeg((i * 40, 200 - i * 30, 90)) for i in range(6)]
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(9)],
            "caption": ["a red square", "a blue circle", "", None, "a cat", "a dog", "x", "y", "z"],
            "status": ["ok"] * 6 + ["http_404", "ok", "ok"],
            "drop_reason": [None] * 7 + ["words<3", None],
            "image": [*images, None, images[0], b"not an image at all"],
        }
    )


def _by_hand(folder, images: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1).numpy()
    return img, txt


def test_scores_are_the_cosine_of_open_clip_embeddings(tiny_clip):
    table = _table()
    stage = ClipScore(ClipScoreConfig(model=f"local-dir:{tiny_clip}", text_embeddings=True, batch_size=4))
    stage.ensure_setup()
    out = stage(table)

    img, txt = _by_hand(
        tiny_clip, table["image"].to_pylist()[:6], [c or "" for c in table["caption"].to_pylist()[:6]]
    )
    scores = out["clip_score"].to_pylist()
    np.testing.assert_allclose(scores[:6], np.sum(img * txt, axis=1), atol=1e-5)
    # Not ok, dropped earlier, and undecodable rows: null, never a made-up score.
    assert scores[6:] == [None, None, None]
    assert out["clip_model"].to_pylist() == ["local-dir/" + tiny_clip.name] * 6 + [None] * 3
    emb = out["image_embedding"]
    assert emb.type == pa.list_(pa.float16())
    assert [len(e) if e is not None else None for e in emb.to_pylist()] == [32] * 6 + [None] * 3
    np.testing.assert_allclose(np.array(emb.to_pylist()[:6], np.float32), img, atol=2e-3)
    np.testing.assert_allclose(np.array(out["text_embedding"].to_pylist()[:6], np.float32), txt, atol=2e-3)
    assert out.num_rows == table.num_rows and out["uid"].equals(table["uid"])


def test_text_embeddings_skip_the_padding_and_equal_open_clips(tiny_clip, monkeypatch):
    # Captions of every length from empty to past the context (16 tokens in the tiny CLIP, 77 in real ones),
    # in no order, more than two groups.
    from curate.models import clip as clip_module

    words = [
        "a",
        "small",
        "red",
        "house",
        "by",
        "the",
        "lake",
        "under",
        "a",
        "grey",
        "sky",
        "with",
        "two",
        "boats",
    ]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, size=int(n))) for n in rng.permutation(70) % 20]
    model = ClipModel.load(f"local-dir:{tiny_clip}", "random")
    lengths = []
    prefix = clip_module._encode_text_prefix
    monkeypatch.setattr(
        clip_module, "_encode_text_prefix", lambda m, t: lengths.append(t.shape[1]) or prefix(m, t)
    )
    got = model.encode_texts(captions)
    with torch.no_grad():
        full = torch.nn.functional.normalize(model.model.encode_text(model.tokenizer(captions)), dim=-1)
    np.testing.assert_allclose(got, full.numpy(), atol=1e-5)
    # Three groups sorted by length: the short ones ran on part of the context.
    context = model.model.context_length
    assert len(lengths) == 3 and lengths == sorted(lengths) and lengths[0] <= 12 and lengths[-1] == context


def test_weights_file_of_a_registered_architecture(tiny_clip, tmp_path):
    """``pretrained=<file>``: the route a hub tag's file takes, through open_clip's loader."""
    from support.data import TINY_CLIP_CFG

    from curate.models.clip import ClipModel

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "curate-tiny-test.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "cfg")
    weights = tiny_clip / "open_clip_model.safetensors"
    by_file = ClipModel.load("curate-tiny-test", str(weights))
    by_folder = ClipModel.load(f"local-dir:{tiny_clip}", "random")
    x = [by_file.preprocess(Image.open(io.BytesIO(_jpeg((10, 200, 30)))))]
    np.testing.assert_allclose(by_file.encode_images(x), by_folder.encode_images(x), atol=1e-6)
    assert by_file.name == "curate-tiny-test/open_clip_model.safetensors"
    random = ClipModel.load("curate-tiny-test", "random")
    assert random.name == "curate-tiny-test/random"
    assert not np.allclose(random.encode_images(x), by_file.encode_images(x))


def test_unknown_tag_names_the_tags_there_are():
    from curate.base import ModelNotFound
    from curate.models.clip import clip_weights

    with pytest.raises(ModelNotFound, match="datacomp_xl_s13b_b90k"):
        clip_weights("ViT-L-14", "no-such-tag")
    (spec, *_) = clip_weights("ViT-L-14", "openai")
    assert spec.hub_repo == "timm/vit_large_patch14_clip_224.openai"


def _world_pipeline(tmp_path, world_server, tiny_clip, name: str, executor: str):
    world, server = world_server
    input_path = tmp_path / "world.parquet"
    if not input_path.exists():
        pq.write_table(world.input_table(server.url), input_path)
    stages = [
        {
            "stage": "download",
            "image_size": 64,
            "resize_mode": "center_crop",
            "allow_private": [server.host_port],
        },
        {"stage": "clip_score", "model": f"local-dir:{tiny_clip}", "torch_threads": 1, "decode_threads": 1},
    ]
    return write_pipeline(
        tmp_path / f"{name}.yaml",
        input_path,
        tmp_path / name,
        stages,
        input={"url_col": "url", "caption_col": "caption"},
        executor={"kind": executor},
        shard_size=100,
    )


@pytest.mark.slow
def test_local_and_ray_write_the_same_shards(tmp_path, world_server, tiny_clip, ray_cluster, cli):
    for executor in ("local", "ray"):
        r = cli("run", _world_pipeline(tmp_path, world_server, tiny_clip, executor, executor), "-q")
        assert r.code == 0, r
    local, ray = shard_files(tmp_path / "local"), shard_files(tmp_path / "ray")
    assert local.keys() == ray.keys() and all(local[k] == ray[k] for k in local)

    side = pq.read_table(tmp_path / "local" / "shards" / "00000.parquet")
    ok = side.filter(pa.compute.equal(side["status"], "ok"))
    assert ok.num_rows > 50 and ok["clip_score"].null_count == 0 and ok["image_embedding"].null_count == 0
    failed = side.filter(pa.compute.not_equal(side["status"], "ok"))
    assert failed.num_rows > 0 and failed["clip_score"].null_count == failed.num_rows
    # The tar's json carries the score but not the embedding, which stays in the parquet sidecar.
    with tarfile.open(tmp_path / "local" / "shards" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert "clip_score" in meta and "image_embedding" not in meta
