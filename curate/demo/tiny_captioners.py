"""Tiny, randomly initialised captioners and LLMs, for the demo and the tests: nothing here was trained.

No VLM or LLM weights can be downloaded where curate is tested, so the ``recaption`` and ``fuse_captions``
stages are tested (and demonstrated) with models built from their transformers configs at 40 to 100 thousand
parameters, saved with ``save_pretrained`` and loaded back through the same ``from_pretrained`` path as real
weights. Their tokenizer is real: a WordPiece vocabulary trained here, offline, with the ``tokenizers``
library on the sample world's captions and the default prompts. What they write is fluent only by accident:
random words from that vocabulary. The path (processor, batching, generate, decode, clean, fall back) is what
they prove, not caption quality.

Each ``make_tiny_*`` writes a folder that ``AutoProcessor`` (or ``AutoTokenizer``) and
``AutoModelForImageTextToText`` (or ``AutoModelForCausalLM``) load, exactly like a hub snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "TINY_VOCAB_TEXTS",
    "build_tokenizer",
    "make_tiny_blip",
    "make_tiny_blip2",
    "make_tiny_florence2",
    "make_tiny_llava",
    "make_tiny_llm",
    "make_tiny_qwen2_vl",
    "make_tiny_vlm",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
EXTRA_SPECIAL = [IMAGE, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *EXTRA_SPECIAL]

# A chat template in the ChatML layout that Qwen models use: string content, or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts (an image becomes Qwen2-VL's vision tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA-1.5's layout: "USER: <image>\n<prompt> ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ message['role'] | upper + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Besides the world's captions and the default prompts, what the tokenizer should know as words.
TINY_VOCAB_TEXTS = (
    "a picture of",
    "a photo of a dog on a beach, the Eiffel Tower in Paris, stock photo, 2019, New York",
    "Merged caption: USER: ASSISTANT: system user assistant",
)


def _world_texts(scenes: int = 400) -> list[str]:
    """Captions of the sample world's scenes (drawn from its own scene generator, without images)."""
    import numpy as np

    from curate.demo.server import SAMPLE_JPEG_CAPTION
    from curate.demo.world import _random_scene

    rng = np.random.default_rng([0, 99])
    return sorted({_random_scene(rng).caption for _ in range(scenes)} | {SAMPLE_JPEG_CAPTION})


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 400, bert_template: bool = False):
    """A fast tokenizer trained on ``texts`` (default: the sample world's captions and the prompts).

    WordPiece over words and punctuation, so that what a random model writes decodes as words. With
    ``bert_template`` every encoding is wrapped as ``<s> ... </s>``, as BLIP's BERT tokenizer does with
    [CLS] and [SEP] (BLIP's generate replaces the first token by BOS and drops the last).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from curate.models.vlm import DEFAULT_PROMPTS
        from curate.stages.fuse_captions import DEFAULT_PROMPT, DEFAULT_SYSTEM_PROMPT

        texts = [*_world_texts(), *TINY_VOCAB_TEXTS, *DEFAULT_PROMPTS.values(), DEFAULT_SYSTEM_PROMPT]
        texts += [DEFAULT_PROMPT.replace("{alt}", "").replace("{vlm}", "")]
    alphabet = [chr(c) for c in range(33, 127)]
    # Every character inside a word too ("##j"), so that no word of printable ASCII becomes <unk>.
    corpus = [*texts, " ".join("x" + c for c in alphabet if c.isalnum())]
    tok = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    if bert_template:
        bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=EXTRA_SPECIAL,
    )
    return fast


def _own(tokenizer, bert_template: bool = False):
    """A copy of ``tokenizer`` for one model (builders set its chat template), or a new one."""
    import copy

    return copy.deepcopy(tokenizer) if tokenizer is not None else build_tokenizer(bert_template=bert_template)


def _ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save(folder: str | os.PathLike, model, processor) -> Path:
    import torch

    # An untrained model often writes special tokens (<unk>, </s> first: an empty caption once decoded).
    # Their output rows are zeroed (and their bias made very negative) so that it writes words, always
    # max_new_tokens of them.
    tok = getattr(processor, "tokenizer", processor)
    head = next(
        h
        for m in model.modules()
        if hasattr(m, "get_output_embeddings") and (h := m.get_output_embeddings()) is not None
    )
    with torch.no_grad():
        head.weight[tok.all_special_ids] = 0.0
        if getattr(head, "bias", None) is not None:
            head.bias[tok.all_special_ids] = -1e4
    from curate.models.vlm import quiet_progress

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# Small but not degenerate: with transformers' default initialiser range (0.02) the image barely reaches a
# tiny decoder and every image gets the same caption; at 0.1 different images get different captions.
_INIT = 0.1


def make_tiny_blip(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """BLIP (``BlipForConditionalGeneration``): a ViT encoder and a BERT decoder, 32 px images."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _own(tokenizer, bert_template=True)
    ids = _ids(tok)
    config = BlipConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "sep_token_id": ids["eos_token_id"],
            "initializer_range": _INIT,
            **ids,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": _INIT,
        },
        projection_dim=32,
        initializer_range=_INIT,
    )
    _seeded(seed)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    return _save(folder, model, processor)


def _llama_text(tok, **extra) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "initializer_range": _INIT,
        **_ids(tok),
        **extra,
    }


def make_tiny_llava(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a projector and a Llama decoder."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _own(tokenizer)
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": 32,
            "initializer_range": _INIT,
        },
        text_config=_llama_text(tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=_INIT,
        **_ids(tok),
    )
    _seeded(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
    )
    return _save(folder, model, processor)


def make_tiny_qwen2_vl(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic-resolution vision tokens (images resized to
    between 56x56 and 112x112 px here) and a Qwen2 decoder with multimodal rotary positions."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _own(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    config = Qwen2VLConfig(
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": _INIT,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "initializer_range": _INIT,
            **_ids(tok),
        },
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        **_ids(tok),
    )
    _seeded(seed)
    model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    return _save(folder, model, processor)


def tiny_opt_config(tok) -> dict:
    """The OPT decoder of the tiny BLIP-2 (and of the tests' tiny InstructBLIP), over tokenizer ``tok``."""
    return {
        "model_type": "opt",
        "vocab_size": len(tok),
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 256,
        "init_std": _INIT,
        **_ids(tok),
    }


def make_tiny_blip2(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """BLIP-2 (``Blip2ForConditionalGeneration``): a ViT, a Q-Former with 4 query tokens, an OPT decoder."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tok = _own(tokenizer)
    queries = 4
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": _INIT,
        },
        qformer_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "pad_token_id": tok.pad_token_id,
            "initializer_range": _INIT,
        },
        text_config=tiny_opt_config(tok),
        num_query_tokens=queries,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        initializer_range=_INIT,
    )
    _seeded(seed)
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        num_query_tokens=queries,
    )
    return _save(folder, model, processor)


def make_tiny_florence2(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """Florence-2 (``Florence2ForConditionalGeneration``, transformers' own port): a DaViT vision tower and a
    BART encoder-decoder, prompted with task tokens (``<MORE_DETAILED_CAPTION>``), 64 px images."""
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        PreTrainedTokenizerFast,
    )

    base = _own(tokenizer)
    # Florence-2's processor finds its image token on the tokenizer, by name.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
    )
    ids = _ids(tok)
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [8, 16, 16, 32],
            "num_heads": [1, 2, 2, 2],
            "num_groups": [1, 2, 2, 2],
            "window_size": 2,
            "projection_dim": 32,
            "max_position_embeddings": 8,
            "max_temporal_embeddings": 4,
            "drop_path_rate": 0.0,
            "initializer_range": 0.5,
        },
        text_config={
            "model_type": "bart",
            "vocab_size": len(tok),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "init_std": 0.3,  # at BART's 0.02 (or 0.1) this tiny decoder writes the same for every image
            "decoder_start_token_id": ids["eos_token_id"],
            "forced_bos_token_id": None,
            **ids,
        },
        image_token_id=tok.image_token_id,
        initializer_range=_INIT,
    )
    _seeded(seed)
    model = Florence2ForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"height": 64, "width": 64},
        do_center_crop=False,
        image_seq_length=5,  # 2x2 patches + 1
    )
    return _save(folder, model, Florence2Processor(image_processor=image_processor, tokenizer=tok))


def make_tiny_llm(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """A causal LM (``LlamaForCausalLM``, 2 layers) with a ChatML chat template, for ``fuse_captions``.

    Llama, not Qwen2: transformers 5 loads a qwen2 model's tokenizer as its own byte-level BPE class
    whatever tokenizer.json holds, which would not read this WordPiece vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _own(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=True,
        **_ids(tok),
    )
    _seeded(seed)
    model = LlamaForCausalLM(config)
    return _save(folder, model, tok)


FAMILIES: dict[str, Callable[..., Path]] = {
    "blip": make_tiny_blip,
    "blip2": make_tiny_blip2,
    "florence2": make_tiny_florence2,
    "llava": make_tiny_llava,
    "qwen2_vl": make_tiny_qwen2_vl,
}


def make_tiny_vlm(family: str, folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """The tiny captioner of ``family`` (one of :data:`FAMILIES`) in ``folder``; ``tokenizer`` (from
    :func:`build_tokenizer`, with ``bert_template`` for blip) saves training one per model."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny model for {family!r}; one of {', '.join(FAMILIES)}")
    return FAMILIES[family](folder, seed, tokenizer)
