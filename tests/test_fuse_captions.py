"""fuse_captions with a tiny random Llama (a WordPiece tokenizer trained here, a ChatML chat template), saved
and loaded through from_pretrained; and recaption + fuse_captions in a pipeline run on the sample world, with
the training caption read back through webdataset."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import webdataset as wds
from conftest import sidecars, write_pipeline
from pydantic import ValidationError

from curate.base import ConfigError
from curate.stages.fuse_captions import DEFAULT_PROMPT, FuseCaptions, FuseCaptionsConfig, fill_prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from curate.demo.tiny_captioners import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, tokenizer):
    from curate.demo.tiny_captioners import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "tiny-llm", tokenizer=tokenizer)


def _table() -> pa.Table:
    """0-2 fusable (alt-texts of different lengths); 3 no alt-text; 4 no VLM caption; 5 not ok; 6 dropped."""
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(7)],
            "caption": [
                "Eiffel Tower Paris 2019 stock photo",
                "a red circle",
                "IMG_2041.jpg | Golden retriever Max at Brighton beach, summer holiday, buy prints online",
                "",
                "a cat",
                "x",
                "y",
            ],
            "status": ["ok"] * 5 + ["http_404", "ok"],
            "drop_reason": [None] * 6 + ["duplicate:exact"],
            "caption_vlm": [
                "a tall tower",
                "a red circle on blue",
                "a dog on a beach",
                "a dog",
                None,
                None,
                "z",
            ],
        }
    )


def _stage(folder, **cfg) -> FuseCaptions:
    stage = FuseCaptions(FuseCaptionsConfig(model=str(folder), device="cpu", **{"max_new_tokens": 16, **cfg}))
    stage.ensure_setup()
    return stage


def test_fuses_kept_rows_and_says_what_happened_elsewhere(tiny_llm):
    table = _table()
    out = _stage(tiny_llm, batch_size=2)(table)
    status = out["fusion_status"].to_pylist()
    assert status == ["fused", "fused", "fused", "no_alt_text", "no_vlm_caption", None, None]
    fused = out["caption_fused"].to_pylist()
    assert all(isinstance(f, str) and f and "\n" not in f for f in fused[:3])
    assert fused[3:] == ["a dog", None, None, None]  # no alt-text: the VLM caption as it is, no LLM asked
    assert out["caption_fused_model"].to_pylist() == ["tiny-llm"] * 3 + [None] * 4
    for col in ("caption", "caption_vlm", "uid", "status", "drop_reason"):
        assert out[col].equals(table[col])


def test_batching_and_length_sorting_change_nothing(tiny_llm):
    table = _table()
    want = _stage(tiny_llm, batch_size=1)(table)["caption_fused"].to_pylist()
    for batch_size in (2, 32):
        assert _stage(tiny_llm, batch_size=batch_size)(table)["caption_fused"].to_pylist() == want


def test_answers_are_what_the_model_generates_through_its_chat_template(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    stage = _stage(tiny_llm, max_chars=10_000)
    alt, vlm = "a red circle", "a red circle on blue"
    messages = [
        {"role": "system", "content": stage.config.system_prompt},
        {"role": "user", "content": fill_prompt(DEFAULT_PROMPT, alt, vlm)},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "Synthetic caption: a red circle on blue<|im_end|>\n<|im_start|>assistant\n"
    )
    assert stage.prompt_for(alt, vlm) == text
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = " ".join(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).split())
    assert stage(_table())["caption_fused"][1].as_py() == answer


def test_without_chat_template_the_prompt_is_plain_text(tiny_llm):
    stage = _stage(
        tiny_llm, use_chat_template=False, system_prompt="Be brief.", response_prefix="Merged caption:"
    )
    assert (
        stage.prompt_for("alt {x}", "vlm")
        == "Be brief.\n\n" + fill_prompt(DEFAULT_PROMPT, "alt {x}", "vlm") + "\nMerged caption:"
    )
    long = _stage(tiny_llm, max_input_chars=12).prompt_for("one two three four five", "six\nseven")
    assert "Alt-text: one two\nSynthetic caption: six seven<|im_end|>" in long


def test_an_answer_of_special_tokens_only_falls_back_to_the_vlm_caption(tiny_llm, tmp_path):
    """A model whose every logit is equal writes token 0 (<pad>) again and again: decoded, nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    model.save_pretrained(tmp_path / "silent")
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(tmp_path / "silent")
    out = _stage(tmp_path / "silent")(_table())
    assert out["fusion_status"].to_pylist()[:3] == ["fallback_empty"] * 3
    assert out["caption_fused"].to_pylist()[:3] == [
        "a tall tower",
        "a red circle on blue",
        "a dog on a beach",
    ]
    assert out["caption_fused_model"].to_pylist()[:3] == ["silent"] * 3  # the LLM was asked


class _Scripted:
    """Stands in for the LLM with fixed answers, to reach the fallbacks a random model never writes."""

    name = "scripted"

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.prompts: list[str] = []

    def render(self, system: str, user: str, response_prefix: str = "") -> str:
        return f"{system}\n{user}\n{response_prefix}"

    def generate(self, prompts: list[str], batch_size: int) -> list[str]:
        self.prompts += prompts
        return self.answers[: len(prompts)]


def test_each_fallback_keeps_the_vlm_caption_and_records_why():
    stage = FuseCaptions(FuseCaptionsConfig(model="unused/model"))
    stage.llm = _Scripted(
        [
            "Alt-text: Eiffel Tower Paris 2019 stock photo\nSynthetic caption: a tall tower",
            "A dog.",
            'Here is the merged caption:\n\n"A golden retriever named Max on Brighton beach."',
        ]
    )
    out = stage(_table())
    assert out["fusion_status"].to_pylist() == [
        "fallback_echo",
        "fallback_short",
        "fused",
        "no_alt_text",
        "no_vlm_caption",
        None,
        None,
    ]
    assert out["caption_fused"].to_pylist() == [
        "a tall tower",
        "a red circle on blue",
        "A golden retriever named Max on Brighton beach.",
        "a dog",
        None,
        None,
        None,
    ]
    assert out["caption_fused_model"].to_pylist() == ["scripted"] * 3 + [None] * 4
    assert len(stage.llm.prompts) == 3 and "Alt-text: IMG_2041.jpg | Golden retriever" in stage.llm.prompts[2]


def test_config_checks():
    with pytest.raises(ValidationError, match=r"must contain \{vlm\}"):
        FuseCaptionsConfig(prompt="Merge {alt} please")
    with pytest.raises(ValidationError):
        FuseCaptionsConfig(temperature=0.2)
    assert FuseCaptions(FuseCaptionsConfig()).weights()[0].source == "hf://Qwen/Qwen2.5-1.5B-Instruct"
    if __import__("importlib.util").util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"backend: vllm needs the vllm package"):
            FuseCaptions(FuseCaptionsConfig(backend="vllm"))


# --- both stages in a pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from curate.demo.tiny_captioners import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("tiny-blip") / "tiny-blip")


def test_pipeline_recaptions_and_fuses_kept_rows_and_trains_on_the_fused_caption(
    tmp_path, world_server, tiny_blip, tiny_llm, cli
):
    world, server = world_server
    input_path = tmp_path / "world.parquet"
    import pyarrow.parquet as pq

    pq.write_table(world.input_table(server.url), input_path)
    stages = [
        {
            "stage": "download",
            "image_size": 64,
            "resize_mode": "center_crop",
            "allow_private": [server.host_port],
        },
        {"stage": "filter", "name": "quality_filter", "rules": ["orig_width >= 300"]},
        {
            "stage": "recaption",
            "model": str(tiny_blip),
            "max_new_tokens": 8,
            "torch_threads": 1,
            "device": "cpu",
        },
        {"stage": "fuse_captions", "model": str(tiny_llm), "max_new_tokens": 12, "device": "cpu"},
    ]
    pipe = write_pipeline(
        tmp_path / "p.yaml",
        input_path,
        tmp_path / "out",
        stages,
        input={"url_col": "url", "caption_col": "caption"},
        output={"train_caption": "fused"},
        shard_size=100,
    )
    r = cli("run", pipe, "-q")
    assert r.code == 0, r

    side = sidecars(tmp_path / "out")
    has_image = pc.and_(pc.equal(side["status"], "ok"), pc.is_valid(side["mime"]))
    kept = pc.and_(has_image, pc.is_null(side["drop_reason"])).to_pylist()
    dropped = pc.and_(has_image, pc.is_valid(side["drop_reason"])).to_pylist()
    assert sum(kept) > 30 and sum(dropped) > 30  # the filter dropped about half the world's images
    vlm, fused = side["caption_vlm"].to_pylist(), side["caption_fused"].to_pylist()
    status = side["fusion_status"].to_pylist()
    for i in range(side.num_rows):
        if kept[i]:
            assert vlm[i] and fused[i] and status[i] == "fused", i
            assert side["caption_vlm_model"][i].as_py() == "tiny-blip"
            assert side["caption_fused_model"][i].as_py() == "tiny-llm"
        else:  # failed downloads and the filter's drops cost no model time
            assert vlm[i] is None and fused[i] is None and status[i] is None, i

    samples = list(
        wds.WebDataset(
            sorted(str(p) for p in (tmp_path / "out/shards").glob("*.tar")),
            shardshuffle=False,
            empty_check=False,
        )
    )
    assert len(samples) == sum(kept)
    fused_of = dict(zip(side["uid"].to_pylist(), fused, strict=True))
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == fused_of[s["__key__"]] == meta["caption_fused"]
        assert meta["caption"] and meta["caption_vlm"] and meta["fusion_status"] == "fused"

    # What `curate demo` prints of it, labelled as the output of untrained models.
    from rich.console import Console

    from curate.demo.run import caption_sample, print_caption_sample

    sample = caption_sample(tmp_path / "out", rows=2)
    assert sample["fusion_status"] == {"fused": sum(kept)} and len(sample["sample"]) == 2
    console = Console(record=True, width=400)
    print_caption_sample(sample, console)
    text = console.export_text()
    assert text.count("TINY RANDOM, UNTRAINED") == 5  # the heading, and each vlm and fused caption
    assert f"alt-text: {sample['sample'][0]['caption']}" in text


def test_train_caption_fused_without_the_stage_fails_before_any_work(tmp_path, cli):
    from support.data import make_input

    stages = [{"stage": "synthetic_image"}]
    pipe = write_pipeline(
        tmp_path / "p.yaml",
        make_input(tmp_path / "in.parquet", 5),
        tmp_path / "out",
        stages,
        output={"train_caption": "fused"},
    )
    r = cli("validate", pipe)
    assert r.code == 2 and "output.train_caption" in r.err and "caption_fused" in r.err, r
    assert "fuse_captions" in r.err
    assert not (tmp_path / "out").exists()
