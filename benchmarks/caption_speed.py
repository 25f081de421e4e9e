"""Captions per second of the recaption and fuse_captions model paths, at real model sizes with random weights.

No weights can be downloaded where curate is developed, so the models are built from configs of the real
architectures' sizes (BLIP-2 OPT-2.7b, LLaVA-1.5-7b, Qwen2-VL-2B; Qwen2.5-1.5B-sized for fusion) with random
weights, in bf16 on a GPU, and run through the same code as the stages: :class:`curate.models.vlm.HfCaptioner`
and :class:`curate.models.llm.HfGenerator` (batched ``generate``, decode). Speed does not depend on the
weights, except through the caption length: every caption is forced to ``--new-tokens`` tokens (real captions
stop earlier), so the figure is for that length. The tokenizer is the demo's small one, so decoded text is
empty or noise; the model's vocabulary is the real one. ``tiny-*`` sizes run on a CPU, to check the script.

    python benchmarks/caption_speed.py --model blip2-opt-2.7b --batch-size 64 --images 1024 --new-tokens 20
    python benchmarks/caption_speed.py --model llava-1.5-7b --batch-size 32 --images 256 --new-tokens 60
    python benchmarks/caption_speed.py --model qwen2-vl-2b --batch-size 64 --images 512 --new-tokens 60
    python benchmarks/caption_speed.py --model fusion-1.5b --batch-size 128 --images 1024 --new-tokens 60
    python benchmarks/caption_speed.py --model tiny-blip --images 256          # CPU: does the script run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VLM_SIZES = {
    "blip2-opt-2.7b": "blip2",
    "llava-1.5-7b": "llava",
    "qwen2-vl-2b": "qwen2_vl",
    "tiny-blip": "blip",
    "tiny-qwen2-vl": "qwen2_vl",
}
LLM_SIZES = ("fusion-1.5b", "tiny-llm")


def _real_config(name: str, folder: Path, shallow: bool = False):
    """A fresh config of the real model's size, with the special token ids of the tiny model in ``folder``
    (whose processor and tokenizer the benchmark uses); ``shallow``: one layer per stack, real widths."""
    from transformers import AutoConfig, Blip2Config, LlamaConfig, LlavaConfig, Qwen2VLConfig

    tiny = AutoConfig.from_pretrained(folder)
    text = getattr(tiny, "text_config", tiny)
    ids = {k: getattr(text, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    def depth(n: int) -> int:
        return 1 if shallow else n

    if name == "blip2-opt-2.7b":
        return Blip2Config(
            vision_config={
                "hidden_size": 1408,
                "intermediate_size": 6144,
                "num_hidden_layers": depth(39),
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
            },
            qformer_config={
                "hidden_size": 768,
                "num_hidden_layers": depth(12),
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "encoder_hidden_size": 1408,
            },
            text_config={
                "model_type": "opt",
                "hidden_size": 2560,
                "ffn_dim": 10240,
                "num_hidden_layers": depth(32),
                "num_attention_heads": 32,
                "word_embed_proj_dim": 2560,
                "vocab_size": 50272,
                **ids,
            },
            num_query_tokens=32,
            image_token_index=tiny.image_token_index,
        )
    if name == "llava-1.5-7b":
        return LlavaConfig(
            vision_config={
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": depth(24),
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
            text_config={
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": depth(32),
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 32064,
                **ids,
            },
            image_token_index=tiny.image_token_index,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **ids,
        )
    if name == "qwen2-vl-2b":
        return Qwen2VLConfig(
            vision_config={
                "depth": depth(32),
                "embed_dim": 1280,
                "num_heads": 16,
                "hidden_size": 1536,
                "mlp_ratio": 4,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            text_config={
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": depth(28),
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "vocab_size": 151936,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                **ids,
            },
            image_token_id=tiny.image_token_id,
            tie_word_embeddings=True,
            video_token_id=tiny.video_token_id,
            vision_start_token_id=tiny.vision_start_token_id,
            vision_end_token_id=tiny.vision_end_token_id,
            **ids,
        )
    if name == "fusion-1.5b":  # Qwen2.5-1.5B's shape, as a Llama (the same compute but qkv biases)
        return LlamaConfig(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=depth(28),
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            **ids,
        )
    raise ValueError(name)


def _processor_for_size(name: str, processor) -> None:
    """Real image sizes: BLIP-2 224 px, LLaVA-1.5 336 px (576 image tokens); Qwen2-VL keeps its dynamic size."""
    if name == "blip2-opt-2.7b":
        processor.image_processor.size = {"height": 224, "width": 224}
        processor.num_query_tokens = 32
    elif name == "llava-1.5-7b":
        processor.image_processor.size = {"shortest_edge": 336}
        processor.image_processor.crop_size = {"height": 336, "width": 336}
        processor.patch_size = 14
    elif name == "qwen2-vl-2b":
        processor.image_processor.min_pixels = 56 * 56
        processor.image_processor.max_pixels = 28 * 28 * 1280


def _model(folder: Path, name: str, causal: bool, device, dtype, shallow: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
    if name.startswith("tiny"):
        return auto.from_pretrained(folder).to(device, dtype).eval()
    cfg = _real_config(name, folder, shallow)
    with torch.device(device):
        model = auto.from_config(cfg, dtype=dtype)
    return model.eval()


def main() -> None:
    import torch

    from curate.demo.tiny_captioners import make_tiny_llm, make_tiny_vlm
    from curate.models.device import pick_device, pick_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*VLM_SIZES, *LLM_SIZES], required=True)
    ap.add_argument("--images", type=int, default=256, help="captions to write (after one warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=30, help="every caption is forced to this length")
    ap.add_argument("--side", type=int, default=256, help="image side in pixels (what download stores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--shallow", action="store_true", help="one layer per stack: checks the script on a CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.side, args.side, 3), np.uint8)) for _ in range(16)]

    with tempfile.TemporaryDirectory() as tmp:
        causal = args.model in LLM_SIZES
        folder = Path(tmp) / "m"
        if causal:
            make_tiny_llm(folder)
        else:
            make_tiny_vlm(VLM_SIZES[args.model], folder)
        built = time.perf_counter()
        model = _model(folder, args.model, causal, device, dtype, args.shallow)
        model.generation_config.min_new_tokens = args.new_tokens  # every caption as long as asked
        params = sum(p.numel() for p in model.parameters())
        setup_s = time.perf_counter() - built
        if causal:
            from curate.models.llm import HfGenerator
            from curate.stages.fuse_captions import FuseCaptions, FuseCaptionsConfig

            gen = HfGenerator.load(folder, "bench", max_new_tokens=args.new_tokens, device=str(device.type))
            gen.model = model
            stage = FuseCaptions(FuseCaptionsConfig(model=str(folder)))
            stage.llm = gen
            alt = "IMG_2041.jpg | Golden retriever Max at Brighton beach, summer holiday, buy prints online"
            vlm = "a dog running on a sandy beach next to the sea under a blue sky with a few clouds"
            prompts = [stage.prompt_for(f"{alt} {i}", vlm) for i in range(args.images + args.batch_size)]
            gen.generate(prompts[: args.batch_size], args.batch_size)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            gen.generate(prompts[args.batch_size :], args.batch_size)
        else:
            from curate.models.vlm import HfCaptioner

            cap = HfCaptioner.load(folder, "bench", max_new_tokens=args.new_tokens, device=str(device.type))
            _processor_for_size(args.model, cap.processor)
            cap.model, cap.dtype = model, dtype
            batch = [images[i % len(images)] for i in range(args.batch_size)]
            cap.caption(batch)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(max(1, args.images // args.batch_size)):
                cap.caption(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    n = max(1, args.images // args.batch_size) * args.batch_size if not causal else args.images
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(
        f"{args.model}: {params / 1e6:,.1f} M parameters, {dtype}, {gpu}; batch {args.batch_size}, "
        f"{args.new_tokens} new tokens each, {args.side} px: {n / seconds:,.1f} captions/s "
        f"({n * args.new_tokens / seconds:,.0f} tokens/s; {n} in {seconds:.1f} s; model built in {setup_s:.1f} s)"
    )


if __name__ == "__main__":
    main()
