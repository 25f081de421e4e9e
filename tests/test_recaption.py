"""recaption with tiny random BLIP, BLIP-2, LLaVA and Qwen2-VL models: built from their transformers configs
with a WordPiece tokenizer trained here, saved with save_pretrained and loaded back through from_pretrained,
as real weights are. The captions are random words; what is tested is the path: processor, batching,
generate, decode, clean, and which rows get a caption."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pytest
from conftest import score_shard
from PIL import Image

from curate.base import ConfigError, ModelNotFound
from curate.stages.recaption import Recaption, RecaptionConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_GOOD = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> folder of a tiny random model, each built on first use."""
    from curate.demo.tiny_captioners import build_tokenizer, make_tiny_vlm

    root = tmp_path_factory.mktemp("tiny-vlms")
    built: dict[str, object] = {}
    tokenizers: dict[bool, object] = {}

    def get(family: str):
        if family not in built:
            bert = family == "blip"
            if bert not in tokenizers:
                tokenizers[bert] = build_tokenizer(bert_template=bert)
            built[family] = make_tiny_vlm(family, root / family, tokenizer=tokenizers[bert])
        return built[family]

    return get


def _image(i: int, size: tuple[int, int] | None = None) -> bytes:
    """Coloured noise, a different size and format per i."""
    rng = np.random.default_rng(i)
    w, h = size or (40 + 9 * i, 36 + 5 * i)
    base = np.array([40 * i % 255, 200 - 25 * i, 90 + 20 * i], np.float32)
    pixels = np.clip(base + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if i % 2 else "JPEG", quality=90)
    return buf.getvalue()


def _mixed_shard() -> pa.Table:
    """Rows 0..5 captionable; 6 not downloaded; 7 dropped earlier; 8 bytes that do not decode."""
    good = [_image(i) for i in range(N_GOOD)]
    return score_shard(
        [*good, None, good[0], b"\xff\xd8 not a jpeg"],
        status=["ok"] * N_GOOD + ["http_404", "ok", "ok"],
        drop=[None] * (N_GOOD + 1) + ["clip_score<0.3", None],
    )


def _stage(folder, **cfg) -> Recaption:
    stage = Recaption(RecaptionConfig(model=str(folder), device="cpu", decode_threads=1, **cfg))
    stage.ensure_setup()
    return stage


@pytest.mark.parametrize("family", ["blip", "blip2", "florence2", "llava", "qwen2_vl"])
def test_captions_kept_rows_with_images_and_batching_changes_nothing(tiny, family):
    folder = tiny(family)
    table = _mixed_shard()
    out = _stage(folder, batch_size=4, max_new_tokens=12)(table)
    one = _stage(folder, batch_size=1, max_new_tokens=12)(table)

    captions = out["caption_vlm"].to_pylist()
    assert all(isinstance(c, str) and c.strip() == c and c for c in captions[:N_GOOD]), captions
    assert captions[N_GOOD:] == [None, None, None]  # not ok, dropped, undecodable: never captioned
    assert out["caption_vlm_model"].to_pylist() == [folder.name] * N_GOOD + [None] * 3
    assert len(set(captions[:N_GOOD])) > 1  # the image reaches the caption
    assert one["caption_vlm"].to_pylist() == captions  # greedy: a batch of 4 writes what 1 at a time does
    assert out.num_rows == table.num_rows and out["uid"].equals(table["uid"])
    assert out["caption"].equals(table["caption"])  # the alt-text is never touched


def _generate_by_hand(folder, images: list[bytes], text: str | None, max_new_tokens: int) -> list[str]:
    """What transformers gives for these images, loaded and called without curate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    kwargs = {"text": [text] * len(pil), "padding": True} if text is not None else {}
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=pil, return_tensors="pt", **kwargs)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if text is not None and model.config.model_type != "blip":
        ids = ids[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_blip_captions_are_what_generate_writes(tiny):
    folder = tiny("blip")
    images = [_image(i) for i in range(N_GOOD)]
    want = [" ".join(t.split()) for t in _generate_by_hand(folder, images, None, 10)]
    got = _stage(folder, batch_size=3, max_new_tokens=10)(_mixed_shard())["caption_vlm"].to_pylist()
    assert got[:N_GOOD] == want


def test_blip_prompt_is_continued_then_stripped(tiny):
    folder = tiny("blip")
    images = [_image(i) for i in range(3)]
    by_hand = _generate_by_hand(folder, images, "a picture of", 8)
    assert all(t.startswith("a picture of") for t in by_hand)  # BLIP writes its prompt back
    got = _stage(folder, prompt="a picture of", max_new_tokens=8)(score_shard(images))["caption_vlm"]
    assert got.to_pylist() == [" ".join(t[len("a picture of") :].split()) for t in by_hand]


def test_chat_vlm_is_asked_through_its_chat_template(tiny):
    folder = tiny("qwen2_vl")
    stage = _stage(folder, prompt="What is in this picture?", max_new_tokens=6)
    assert stage.captioner.family == "qwen2_vl"
    assert stage.captioner.text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in this picture?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    images = [_image(i) for i in range(3)]
    want = _generate_by_hand(folder, images, stage.captioner.text, 6)
    assert stage(score_shard(images))["caption_vlm"].to_pylist() == [" ".join(t.split()) for t in want]


def test_qwen2_vl_pads_images_of_different_sizes_to_the_same_captions(tiny):
    """Qwen2-VL turns each image into as many tokens as its size needs: a batch is padded on the left."""
    folder = tiny("qwen2_vl")
    images = [_image(10, (56, 56)), _image(11, (112, 56)), _image(12, (60, 110))]
    stage = _stage(folder, batch_size=3, max_new_tokens=8)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    grid = stage.captioner.processor.image_processor(images=pil, return_tensors="pt")["image_grid_thw"]
    assert grid.prod(-1).tolist() == [16, 32, 32]  # vision patches: 4, 8 and 8 tokens after merging
    together = stage(score_shard(images))["caption_vlm"].to_pylist()
    alone = _stage(folder, batch_size=1, max_new_tokens=8)(score_shard(images))["caption_vlm"].to_pylist()
    assert together == alone and all(together)


def test_family_comes_from_the_config_and_prompts_default_per_family(tiny):
    from curate.models.vlm import DEFAULT_PROMPTS, detect_family

    families = ("blip", "blip2", "florence2", "llava", "qwen2_vl")
    assert [detect_family(tiny(f)) for f in families] == list(families)
    assert _stage(tiny("florence2"), max_new_tokens=2).captioner.text == "<MORE_DETAILED_CAPTION>"
    llava = _stage(tiny("llava"), max_new_tokens=2).captioner
    assert llava.prompt == DEFAULT_PROMPTS["llava"]
    assert llava.text == f"USER: <image>\n{DEFAULT_PROMPTS['llava']} ASSISTANT:"
    assert _stage(tiny("blip"), max_new_tokens=2).captioner.text == ""


def test_a_hub_id_loads_from_the_model_directory_offline(tiny, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    shutil.copytree(tiny("blip"), tmp_path / "models/hf/acme/tiny-blip")
    stage = Recaption(RecaptionConfig(model="acme/tiny-blip", device="cpu", max_new_tokens=4))
    (spec,) = stage.weights()
    assert spec.local == "hf/acme/tiny-blip" and spec.source == "hf://acme/tiny-blip"
    stage.ensure_setup()
    out = stage(score_shard([_image(0)]))
    assert out["caption_vlm_model"].to_pylist() == ["acme/tiny-blip"] and out["caption_vlm"][0].as_py()
    pinned = Recaption(RecaptionConfig(model="acme/tiny-blip", revision="v1.0")).weights()[0]
    assert pinned.local == "hf/acme/tiny-blip@v1.0" and pinned.source == "hf://acme/tiny-blip@v1.0"


def test_missing_weights_name_curate_models_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    stage = Recaption(RecaptionConfig(model="Salesforce/blip-image-captioning-large"))
    with pytest.raises(ModelNotFound, match="curate models fetch") as e:
        stage.ensure_setup()
    assert str(tmp_path / "models/hf/Salesforce/blip-image-captioning-large") in str(e.value)
    with pytest.raises(ModelNotFound, match="not a transformers model folder"):
        Recaption(RecaptionConfig(model=str(tmp_path))).ensure_setup()
    with pytest.raises(ModelNotFound, match="neither a local folder nor a hub id"):
        Recaption(RecaptionConfig(model="no/such/folder")).ensure_setup()
    assert Recaption(RecaptionConfig(model=str(tmp_path))).weights() == []


def test_models_list_shows_the_repository(tmp_path, monkeypatch, cli):
    from conftest import write_pipeline
    from support.data import make_input

    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    stages = [{"stage": "synthetic_image"}, {"stage": "recaption", "model": "Qwen/Qwen2-VL-2B-Instruct"}]
    pipe = write_pipeline(
        tmp_path / "p.yaml", make_input(tmp_path / "in.parquet", 3), tmp_path / "out", stages
    )
    from curate.core.config import load_config
    from curate.core.pipeline import Pipeline
    from curate.models.manage import plan_weights

    (entry,) = plan_weights(Pipeline(load_config(pipe)))
    assert entry.stage == "recaption" and entry.spec.source == "hf://Qwen/Qwen2-VL-2B-Instruct"
    assert entry.path == tmp_path / "models/hf/Qwen/Qwen2-VL-2B-Instruct" and not entry.present
    assert entry.error == "offline: CURATE_OFFLINE or HF_HUB_OFFLINE is set"
    assert cli("models", "list", pipe).code == 0
    assert cli("models", "fetch", pipe).code == 2  # offline: it says what is missing, and fails


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("vllm") is not None, reason="vllm is installed here"
)
def test_vllm_backend_without_vllm_fails_when_the_stage_is_built():
    with pytest.raises(ConfigError, match=r"pip install 'curate\[vllm\]'"):
        Recaption(RecaptionConfig(backend="vllm"))


def test_config_is_strict():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RecaptionConfig(family="gpt4")
    with pytest.raises(ValidationError):
        RecaptionConfig(max_new_tokens=0)
    with pytest.raises(ValidationError):
        RecaptionConfig(temperature=0.7)


def test_bf16_when_asked_on_a_cpu(tiny):
    stage = _stage(tiny("llava"), precision="bf16", max_new_tokens=6)
    assert stage.captioner.model.dtype == torch.bfloat16 and stage.captioner.dtype == torch.bfloat16
    captions = stage(_mixed_shard())["caption_vlm"].to_pylist()
    assert all(captions[:N_GOOD]) and captions[N_GOOD:] == [None, None, None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["blip", "qwen2_vl"])
def test_on_a_gpu_in_bf16(tiny, family):
    stage = Recaption(RecaptionConfig(model=str(tiny(family)), max_new_tokens=6, batch_size=4))
    stage.ensure_setup()
    assert stage.captioner.device.type == "cuda" and stage.captioner.model.dtype == torch.bfloat16
    captions = stage(_mixed_shard())["caption_vlm"].to_pylist()
    assert all(captions[:N_GOOD]) and captions[N_GOOD:] == [None, None, None]
