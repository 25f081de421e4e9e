"""Stand-ins (random weights of the real architecture, ``curate models stand-in``): written where the real
weights go, loaded by each stage's own setup(), marked in every *_model value, in run.json and the report;
never written over real weights, and replaced by ``curate models fetch`` only once the real ones are here.

The two transformers models are shrunk with config overrides (the same families at ~10 M parameters); the
full published configs are checked on the meta device, where 2 B parameters cost nothing."""

from __future__ import annotations

import io
import json
import unicodedata

import numpy as np
import pytest
from conftest import score_shard, write_pipeline
from PIL import Image
from support.data import make_input

from curate.base import ModelNotFound
from curate.core.config import load_config
from curate.core.pipeline import Pipeline
from curate.core.runner import run_pipeline
from curate.models.stand_in import NOTE, published_config, read_marker, write_stand_ins
from curate.models.weights import is_stand_in, local_path, stand_in_marker

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VLM, LLM = "Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"
SMALL_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SMALL = {
    VLM: {
        **SMALL_TEXT,
        "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
        "rope_scaling": {"mrope_section": [2, 3, 3]},  # halves of the 16-wide attention heads
    },
    LLM: SMALL_TEXT,
}
# Qwen's published special tokens: Qwen2-VL's 14, then Qwen2.5's 8 more.
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
QWEN25_ONLY = {"<tool_call>": 151657, "<|fim_prefix|>": 151659, "<|file_sep|>": 151664}


def _offline(monkeypatch, models) -> None:
    monkeypatch.setenv("CURATE_MODEL_DIR", str(models))
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _pipeline(tmp, stages, rows: int = 4, **top):
    path = write_pipeline(tmp / "p.yaml", make_input(tmp / "in.parquet", rows), tmp / "out", stages, **top)
    return path


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (40 + 8 * i, 56 + 4 * i, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


ALL_STAGES = [
    {"stage": "synthetic_image"},
    {
        "stage": "clip_score",
        "model": "ViT-B-32",
        "pretrained": "openai",
        "device": "cpu",
        "decode_threads": 1,
    },
    {"stage": "nsfw", "clip_model": "ViT-B-32", "clip_pretrained": "openai", "device": "cpu"},
    {"stage": "watermark", "laion": True, "text": False, "ai_watermark": False, "device": "cpu"},
    {"stage": "recaption", "model": VLM, "device": "cpu", "max_new_tokens": 6, "decode_threads": 1},
    {"stage": "fuse_captions", "model": LLM, "device": "cpu", "max_new_tokens": 6},
]


@pytest.fixture(scope="module")
def every_model(tmp_path_factory):
    """(pipeline, results, model directory): stand-ins of a pipeline with every kind of model, written once."""
    tmp = tmp_path_factory.mktemp("stand-ins")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp / "models")
        pipeline = Pipeline(load_config(_pipeline(tmp, ALL_STAGES)))
        results = write_stand_ins(pipeline, overrides=SMALL)
        yield pipeline, results, tmp / "models"


def test_writes_every_model_at_the_path_its_real_weights_resolve_to(every_model):
    _, results, models = every_model
    assert [(r.stage, r.action) for r in results] == [
        ("clip_score", "written"),
        ("nsfw", "written"),
        ("watermark", "written"),
        ("recaption", "written"),
        ("fuse_captions", "written"),
    ]
    paths = {r.stage: r.path.relative_to(models).as_posix() for r in results}
    assert paths == {
        "clip_score": "open_clip/ViT-B-32/openai/open_clip_model.safetensors",
        "nsfw": "laion/nsfw/clip_ViT-B-32_openai_binary_nsfw_head.pth",
        "watermark": "laion/watermark/watermark_model_v1.pt",
        "recaption": "hf/Qwen/Qwen2-VL-2B-Instruct",
        "fuse_captions": "hf/Qwen/Qwen2.5-1.5B-Instruct",
    }
    counts = {r.stage: r.parameters for r in results}
    assert counts["clip_score"] == 151_277_313  # OpenAI's ViT-B/32, as open_clip builds it
    assert counts["nsfw"] == 512 * 32 + 32 + 32 * 32 + 32 + 32 + 1  # LAION's B/32 head, 512-32-32-1
    assert counts["watermark"] == 11_817_627  # EfficientNet-B3 and LAION's 1536-625-256-2 head
    for r in results:
        assert is_stand_in(r.path) and r.bytes > 0
        marker = read_marker(r.path)
        assert marker["what"] == NOTE and marker["parameters"] == r.parameters and marker["architecture"]
        assert marker["model"] == r.model and marker["written_by"].startswith("curate ")
    head = torch.load(models / paths["nsfw"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in head.items() if k.startswith("norm.")} == {
        "norm.mean": (1, 512),
        "norm.variance": (1, 512),
    }
    vlm = models / paths["recaption"]
    assert sorted(p.name for p in vlm.iterdir()) == [
        "STAND_IN.json",
        "chat_template.json",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    from safetensors import safe_open

    with safe_open(vlm / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}  # as the real checkpoint


def test_each_stage_loads_its_stand_in_and_says_so_in_every_model_column(every_model):
    pipeline, _, _ = every_model
    table = score_shard([_jpeg(i) for i in range(3)])
    stages = {b.name: b.stage for b in pipeline.stages}
    for name in ("clip_score", "nsfw", "watermark", "recaption", "fuse_captions"):
        stages[name].ensure_setup()  # the stage's own loading code, as with real weights
        table = stages[name](table)
    assert table["clip_model"].to_pylist() == ["ViT-B-32/openai (stand-in)"] * 3
    assert (
        table["nsfw_model"].to_pylist()
        == ["laion_clip/ViT-B-32/openai (stand-in)/clip_ViT-B-32_openai_binary_nsfw_head (stand-in)"] * 3
    )
    assert table["caption_vlm_model"].to_pylist() == [f"{VLM} (stand-in)"] * 3
    assert table["caption_fused_model"].to_pylist() == [f"{LLM} (stand-in)"] * 3
    # The head took clip_score's embeddings: the stand-in labels match on both sides.
    assert stages["nsfw"].scorer.clip_loaded is False
    for column in ("clip_score", "nsfw_score", "watermark_score"):
        assert all(v is not None and np.isfinite(v) for v in table[column].to_pylist()), column
    # Random weights write visible text (never an empty caption), so the fusion LLM has work.
    assert all(c and c.strip() for c in table["caption_vlm"].to_pylist())
    assert all(s in ("fused", "fallback_echo", "fallback_short") for s in table["fusion_status"].to_pylist())


def test_the_synthetic_tokenizers_have_qwens_vocabulary_and_special_ids(every_model):
    from transformers import AutoProcessor, AutoTokenizer

    _, results, _ = every_model
    folders = {r.stage: r.path for r in results}
    llm = AutoTokenizer.from_pretrained(folders["fuse_captions"])
    processor = AutoProcessor.from_pretrained(folders["recaption"])
    vlm = processor.tokenizer
    assert len(llm) == 151_665 and len(vlm) == 151_657  # Qwen2.5's 22 added tokens, Qwen2-VL's 14
    for tok, ids in ((llm, {**SPECIAL_IDS, **QWEN25_ONLY}), (vlm, SPECIAL_IDS)):
        assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
        assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643 and tok.bos_token is None
    rng = np.random.default_rng(0)
    texts = ["a dog on a beach, 2019", "Größe: 12 € — naïve café", "东京塔 🗼 at night", "tab\tand\nnewline"]
    texts += [
        "".join(chr(c) for c in rng.integers(32, 0x2FFF, 40) if not 0xD800 <= c < 0xE000) for _ in range(5)
    ]
    for text in texts:
        ids = llm(text)["input_ids"]
        assert max(ids) < 151643 and llm.decode(ids) == unicodedata.normalize("NFC", text)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = llm.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_laion_l14_heads_have_the_published_layers_and_load(tmp_path, monkeypatch):
    from curate.models.clip import clip_weights
    from curate.models.heads import load_aesthetic_head, load_nsfw_head

    _offline(monkeypatch, tmp_path / "models")
    clip = local_path(
        clip_weights("ViT-L-14", "openai")[0]
    )  # the real CLIP is here: only the heads are built
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"real weights")
    stages = [{"stage": "nsfw"}, {"stage": "aesthetic"}]
    results = write_stand_ins(Pipeline(load_config(_pipeline(tmp_path, stages))))
    assert [(r.stage, r.action, r.parameters) for r in results] == [
        ("nsfw", "written", 768 * 64 + 64 + 64 * 512 + 512 + 512 * 256 + 256 + 256 + 1),
        ("nsfw", "kept: real weights present", None),
        (
            "aesthetic",
            "written",
            768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1,
        ),
    ]
    nsfw, aesthetic = load_nsfw_head(results[0].path, "cpu"), load_aesthetic_head(results[2].path, "cpu")
    assert (nsfw.input_dim, aesthetic.input_dim) == (768, 768)
    assert nsfw.name == "clip_ViT-L-14_openai_binary_nsfw_head (stand-in)"
    assert aesthetic.name == "sac+logos+ava1-l14-linearMSE (stand-in)"
    emb = np.random.default_rng(0).normal(size=(3, 768)).astype(np.float32)
    assert nsfw.score(emb).shape == aesthetic.score(emb).shape == (3,)


@pytest.mark.parametrize(("repo", "published"), [(LLM, 1_543_714_304), (VLM, 2_208_985_600)])
def test_the_published_configs_build_the_real_parameter_count(tmp_path, repo, published):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    (tmp_path / "config.json").write_text(json.dumps(published_config(repo)))
    config = AutoConfig.from_pretrained(tmp_path)
    auto = AutoModelForImageTextToText if repo == VLM else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == published
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (1536, 28, 151936)


def test_an_unknown_hub_model_needs_its_published_config(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "models")
    stages = [{"stage": "fuse_captions", "model": "someorg/tiny-llm"}]
    pipeline = Pipeline(load_config(_pipeline(tmp_path, stages)))
    assert published_config("someorg/tiny-llm") is None
    with pytest.raises(ModelNotFound, match=r"no published config of someorg/tiny-llm.*someorg__tiny-llm"):
        write_stand_ins(pipeline)
    assert not (tmp_path / "models/hf/someorg").exists()  # nothing half-written
    # Its published files, given in a folder of the same layout as curate's own, are enough.
    import shutil

    from curate.models.stand_in import CONFIGS

    shutil.copytree(CONFIGS / "Qwen__Qwen2.5-1.5B-Instruct", tmp_path / "configs/someorg__tiny-llm")
    (r,) = write_stand_ins(
        pipeline, overrides={"fuse_captions": SMALL_TEXT}, config_dirs=[tmp_path / "configs"]
    )
    assert r.action == "written" and r.path == tmp_path / "models/hf/someorg/tiny-llm" and is_stand_in(r.path)


@pytest.fixture
def llm_and_watermark(tmp_path, monkeypatch):
    """A pipeline of a (small) fusion LLM and LAION's watermark net, with the real watermark weights "here"."""
    _offline(monkeypatch, tmp_path / "models")
    stages = [
        {"stage": "watermark", "laion": True, "text": False, "ai_watermark": False, "device": "cpu"},
        {"stage": "fuse_captions", "model": LLM, "device": "cpu"},
    ]
    path = _pipeline(tmp_path, stages)
    from curate.models.watermark import LAION_WATERMARK

    real = local_path(LAION_WATERMARK)
    real.parent.mkdir(parents=True)
    real.write_bytes(b"the real weights, as downloaded")
    return path, real


def test_real_weights_are_kept_and_stand_ins_replaced_only_when_asked(llm_and_watermark, cli):
    path, real = llm_and_watermark
    pipeline = Pipeline(load_config(path))
    first = write_stand_ins(pipeline, overrides=SMALL)
    assert [(r.stage, r.action) for r in first] == [
        ("watermark", "kept: real weights present"),
        ("fuse_captions", "written"),
    ]
    assert real.read_bytes() == b"the real weights, as downloaded" and not is_stand_in(real)
    assert not stand_in_marker(real).exists()
    llm = first[1].path
    written = read_marker(llm)["written"]
    again = write_stand_ins(pipeline, overrides=SMALL)
    assert [r.action for r in again] == ["kept: real weights present", "kept: stand-in present"]
    assert again[1].parameters == first[1].parameters and read_marker(llm)["written"] == written
    replaced = write_stand_ins(
        pipeline, overrides={LLM: {**SMALL_TEXT, "num_hidden_layers": 1}}, replace=True
    )
    assert [r.action for r in replaced] == ["kept: real weights present", "written"]
    assert replaced[1].parameters < first[1].parameters  # rewritten, one layer fewer
    assert real.read_bytes() == b"the real weights, as downloaded"
    assert sorted(p.name for p in llm.parent.iterdir()) == [llm.name]  # no temporary folder left

    listing = cli("models", "list", path)
    assert listing.code == 0, listing
    rows = {line.split("│")[1].strip(): line for line in listing.out.splitlines() if line.count("│") > 4}
    assert "stand-in" in rows["fuse_captions"] and "yes" in rows["watermark"]
    assert "stand-in" not in rows["watermark"] and "mean nothing" in listing.err

    fetched = cli("models", "fetch", path)  # offline: the real weights cannot come, the stand-in stays
    assert fetched.code == 2, fetched
    assert "stand-in fuse_captions: caption fusion LLM Qwen/Qwen2.5-1.5B-Instruct" in fetched.out
    assert f"the stand-in (random weights) stays at {llm}" in fetched.out.replace("\n", "")
    assert "1 of them here as stand-ins only" in fetched.err
    assert is_stand_in(llm) and (llm / "model.safetensors").exists()


def test_models_stand_in_command(tmp_path, monkeypatch, cli):
    _offline(monkeypatch, tmp_path / "models")
    stages = [{"stage": "watermark", "laion": True, "text": False, "ai_watermark": False}]
    path = _pipeline(tmp_path, stages)
    r = cli("models", "stand-in", path)
    assert r.code == 0, r
    where = tmp_path / "models/laion/watermark/watermark_model_v1.pt"
    assert f"watermark: LAION watermark detector (EfficientNet-B3, watermark_model_v1) -> {where}" in r.out
    assert "11,817,627 parameters" in r.out and "MB): written" in r.out
    assert "mean nothing" in r.err
    assert "kept: stand-in present" in cli("models", "stand-in", path).out
    assert "written" in cli("models", "stand-in", path, "--replace").out


def test_fetch_replaces_a_stand_in_only_once_the_download_is_complete(tmp_path, monkeypatch):
    import http.server
    import threading

    from curate.models import manage
    from curate.models.weights import WeightsSpec

    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("CURATE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    www = tmp_path / "www"
    www.mkdir()
    (www / "head.pth").write_bytes(b"real weights")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for name, url in (("gone.pth", f"{base}/missing.pth"), ("head.pth", f"{base}/head.pth")):
            spec = WeightsSpec(f"a head {name}", f"heads/{name}", url=url)
            target = local_path(spec)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"random weights")
            stand_in_marker(target).write_text("{}")
            if name == "gone.pth":
                with pytest.raises(Exception, match="404"):
                    manage._fetch(spec)
                assert target.read_bytes() == b"random weights" and is_stand_in(target)
            else:
                assert manage._fetch(spec) == target
                assert target.read_bytes() == b"real weights" and not is_stand_in(target)
                assert not stand_in_marker(target).exists()
        assert sorted(p.name for p in (tmp_path / "models/heads").iterdir()) == [
            "gone.pth",
            "gone.pth.stand-in.json",
            "head.pth",
        ]
    finally:
        server.shutdown()


def test_run_json_and_the_report_name_the_stand_ins_a_run_used(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "models")
    stages = [
        {"stage": "synthetic_image", "size": 32},
        {"stage": "watermark", "laion": True, "text": False, "ai_watermark": False, "device": "cpu"},
    ]
    path = _pipeline(tmp_path, stages, output={"report": True})
    (r,) = write_stand_ins(Pipeline(load_config(path)))
    summary = run_pipeline(load_config(path), show_progress=False)
    assert summary.exit_code == 0
    info = json.loads((tmp_path / "out/run.json").read_text())
    name = "LAION watermark detector (EfficientNet-B3, watermark_model_v1)"
    assert info["stand_ins"] == [{"stage": "watermark", "model": name, "path": str(r.path)}]
    page = (tmp_path / "out/report/report.html").read_text()
    banner = "This run used stand-in models (random weights): its scores, filters and captions mean nothing."
    assert banner in page and page.index(banner) < page.index("shard(s) done")
    assert f"<li>watermark: {name}</li>" in page

    plain = write_pipeline(tmp_path / "plain.yaml", tmp_path / "in.parquet", tmp_path / "plain", stages[:1])
    assert run_pipeline(load_config(plain), show_progress=False).exit_code == 0
    assert json.loads((tmp_path / "plain/run.json").read_text())["stand_ins"] == []
