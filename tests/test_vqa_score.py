"""vqa_score with the tiny random VLMs of the recaption tests (LLaVA, Qwen2-VL, BLIP-2) and a tiny random
InstructBLIP built here from its config, saved and loaded through from_pretrained. The score is checked
against the softmax of the model's own logits at the last prompt position, computed here by calling the model
directly, one pair at a time."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
from conftest import score_shard
from PIL import Image
from pydantic import ValidationError

from curate.models.vqa import QUESTION
from curate.stages.vqa_score import VqaScore, VqaScoreConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_GOOD = 4
CAPTIONS = ["a red circle", "two blue squares on the grass", "a dog", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> folder of a tiny random VLM whose vocabulary has "Yes" as one token."""
    from curate.demo.tiny_captioners import build_tokenizer, make_tiny_vlm

    texts = [QUESTION.format(c) for c in CAPTIONS] * 20 + ["Yes", "No"] * 40 + ["Question: Answer:"] * 10
    tokenizer = build_tokenizer(texts, vocab_size=200)
    root = tmp_path_factory.mktemp("tiny-vqa")
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            make = _tiny_instructblip if family == "instructblip" else partial(make_tiny_vlm, family)
            built[family] = make(root / family, tokenizer=tokenizer)
        return built[family]

    return get


def _tiny_instructblip(folder, tokenizer):
    """InstructBLIP (``InstructBlipForConditionalGeneration``) built from its config as the demo's tiny BLIP-2
    is (curate.demo.tiny_captioners.make_tiny_blip2): a ViT, a Q-Former that also reads the instruction (its own
    tokenizer: a copy of the same one), 4 query tokens, an OPT decoder."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    from curate.demo.tiny_captioners import _INIT, IMAGE, _own, _save, _seeded, tiny_opt_config

    tok = _own(tokenizer)
    queries = 4
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": _INIT}
    config = InstructBlipConfig(
        vision_config={**small, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        qformer_config={
            **small,
            "vocab_size": len(tok),
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "pad_token_id": tok.pad_token_id,
        },
        text_config=tiny_opt_config(tok),
        num_query_tokens=queries,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        initializer_range=_INIT,
    )
    _seeded(0)
    model = InstructBlipForConditionalGeneration(config)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        qformer_tokenizer=_own(tokenizer),
        num_query_tokens=queries,
    )
    return _save(folder, model, processor)


def _image(i: int, size: tuple[int, int] | None = None) -> bytes:
    rng = np.random.default_rng(500 + i)
    w, h = size or (40 + 9 * i, 36 + 5 * i)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if i % 2 else "JPEG", quality=90)
    return buf.getvalue()


def _mixed_shard() -> pa.Table:
    """Rows 0..3 scoreable; 4 not downloaded; 5 dropped earlier; 6 bytes that do not decode."""
    good = [_image(i) for i in range(N_GOOD)]
    table = score_shard(
        [*good, None, good[0], b"\xff\xd8 not a jpeg"],
        status=["ok"] * N_GOOD + ["http_404", "ok", "ok"],
        drop=[None] * (N_GOOD + 1) + ["clip_score<0.3", None],
    )
    return table.set_column(1, "caption", pa.array([*CAPTIONS, "x", "y", "z"]))


def _stage(folder, **cfg) -> VqaScore:
    stage = VqaScore(VqaScoreConfig(model=str(folder), device="cpu", decode_threads=1, **cfg))
    stage.ensure_setup()
    return stage


def _by_hand(folder, prompts: list[str], images: list[bytes]) -> tuple[np.ndarray, int]:
    """softmax(logits[-1])["Yes"] of the model called directly on each pair alone (no padding)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    (yes,) = processor.tokenizer.encode("Yes", add_special_tokens=False)
    out = []
    for prompt, data in zip(prompts, images, strict=True):
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=[pil], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        out.append(float(torch.softmax(logits.double(), dim=-1)[yes]))
    return np.array(out), yes


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "blip2", "instructblip"])
def test_score_is_the_softmax_of_the_models_own_logits_at_yes(tiny, family):
    folder = tiny(family)
    stage = _stage(folder, batch_size=3)
    prompts = [stage.scorer.prompt(c) for c in CAPTIONS]
    if family == "blip2":
        assert (
            prompts[0] == 'Question: Does this figure show "a red circle"? Please answer yes or no. Answer:'
        )
    elif family == "instructblip":  # the instruction as it is, to the decoder and to the Q-Former
        assert prompts[0] == 'Does this figure show "a red circle"? Please answer yes or no.'
    elif family == "qwen2_vl":
        assert prompts[0] == (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            'Does this figure show "a red circle"? Please answer yes or no.<|im_end|>\n<|im_start|>assistant\n'
        )
    else:
        assert (
            prompts[0]
            == 'USER: <image>\nDoes this figure show "a red circle"? Please answer yes or no. ASSISTANT:'
        )
    want, yes = _by_hand(folder, prompts, [_image(i) for i in range(N_GOOD)])
    assert stage.scorer.answer_id == yes
    out = stage(_mixed_shard())
    got = out["vqa_score"].to_pylist()
    assert got[N_GOOD:] == [None, None, None]  # not ok, dropped, undecodable: never scored
    np.testing.assert_allclose(got[:N_GOOD], want, rtol=1e-4, atol=1e-7)
    assert all(0 < g < 1 for g in got[:N_GOOD]) and len(set(got[:N_GOOD])) == N_GOOD
    assert out["vqa_model"].to_pylist() == [folder.name] * N_GOOD + [None] * 3


def test_as_a_trainers_prompt_scorer(tiny):
    folder = tiny("llava")
    scorer = _stage(folder).scorer
    images = [Image.open(io.BytesIO(_image(i))).convert("RGB") for i in range(3)]
    result = scorer(images, CAPTIONS[:3], batch_size=2)
    assert result["n"] == 3 and len(result["per_prompt"]) == 3
    np.testing.assert_allclose(result["per_prompt"], scorer.score(images, CAPTIONS[:3]), rtol=1e-5)
    assert result["vqa_score"] == pytest.approx(np.mean(result["per_prompt"]))


def test_an_answer_that_is_not_one_token_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"the answer 'Zebrafishes' is not a token of .*vocabulary"):
        _stage(tiny("llava"), answer="Zebrafishes")


def test_models_that_answer_no_questions_are_refused(tiny):
    with pytest.raises(ValueError, match="VQAScore does not apply to blip: BLIP's captioning model"):
        _stage(tiny("blip"))


def test_config_checks():
    with pytest.raises(ValidationError, match=r"must hold \{\} exactly once"):
        VqaScoreConfig(question="Is this good?")
    with pytest.raises(ValidationError, match="backend"):
        VqaScoreConfig(backend="vllm")
    with pytest.raises(ValidationError, match="answer must not be empty"):
        VqaScoreConfig(answer=" ")
    assert VqaScoreConfig().question == 'Does this figure show "{}"? Please answer yes or no.'


def test_a_model_that_cannot_be_had_names_it(tmp_path, monkeypatch):
    from curate.base import ModelNotFound

    monkeypatch.setenv("CURATE_OFFLINE", "1")
    monkeypatch.setenv("CURATE_MODEL_DIR", str(tmp_path / "empty"))
    stage = VqaScore(VqaScoreConfig(model="llava-hf/llava-1.5-7b-hf", device="cpu"))
    assert [s.hub_repo for s in stage.weights()] == ["llava-hf/llava-1.5-7b-hf"]
    with pytest.raises(ModelNotFound, match=r"llava-hf/llava-1\.5-7b-hf.*curate models fetch"):
        stage.ensure_setup()
