"""One command, one GPU: how fast curate's GPU work runs, measured with stand-in (random) weights of the real
architectures and without Ray, so that a bare GPU machine with torch gives every figure in a few minutes.

    python benchmarks/gpu_suite.py --out results.json      # one H100: every part capped, inside 10 minutes
    python benchmarks/gpu_suite.py --smoke --out s.json    # every part at tiny sizes on the CPU, seconds
    python benchmarks/gpu_suite.py --wheels                # the wheels a bare GPU machine needs, and the command

Parts (``--parts`` picks; every size is an argument, the defaults are below):

- ``clip``: open_clip ViT-B-32 and ViT-L-14 through curate's ``ClipModel`` (``pretrained: random``), images/s
  with the decode: a few hundred synthetic photo-like JPEGs of 256-512 px, decoded in a thread pool by
  ``curate.kit.image_batches.iter_batches`` into the model's preprocess, then ``encode_images`` under bf16
  autocast; and the model alone on prepared batches, to show which side bounds it.
- ``vlm``: recaptioning with Qwen2-VL-2B-Instruct's architecture (its published config; random bf16 weights
  built on the GPU): images/s and generated tokens/s at batch 32 of 256 px JPEGs (decode and the image
  processor included), 77 new tokens. A random model hardly ever emits EOS, and the figure must not depend
  on when it would: every caption is forced to exactly 77 new tokens (``min_new_tokens = max_new_tokens``).
- ``dedup``: semantic dedup of 10M x 768 float16 unit vectors (topics, plus 1% near copies of other rows at
  cosine 0.98 to 0.995), made on the GPU, through ``semantic_pairs``' torch backend: seconds, pairs found,
  and the planted pairs found.
- ``unet``: the trainer's UNet (``train/model.py`` ``build_unet``) at its ``sd`` preset, Stable Diffusion 1.x
  sizes, on 256 px images (32x32x4 latents, cross-attention 768, the pooled text): training steps/s and
  images/s of the trainer's step (noise, forward under bf16 autocast, min-SNR loss, backward, clipping,
  AdamW, EMA) at the largest batch from ``--unet-batch`` down that fits. The frozen VAE and text encoder are
  not timed: latents and text states are random.

Every part reports its seconds and its peak GPU memory; a part whose package is missing is skipped with the
reason; a part past its time cap (``--clip-seconds 90``, ``--vlm-seconds 90``, ``--dedup-seconds 240``,
``--unet-seconds 60``, and ``--budget 540`` for the whole suite) stops and says so; the JSON holds the device
name, torch's version and every figure.

A bare GPU machine (Python 3.12 with torch, transformers, timm, numpy, pyarrow, pillow, pyyaml, typer,
rich, fsspec, safetensors, but not pydantic, open_clip_torch, ftfy or diffusers) gets the missing packages
as nine wheels carried in ``.whl/``: pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions, open-clip-torch, ftfy, wcwidth and diffusers at uv.lock's versions, 11.0 MiB together
(diffusers 6.1, pydantic-core 2.2, open-clip-torch 1.5; pydantic-core and wcwidth are the only binary ones)::

    python benchmarks/gpu_suite.py --wheels     # prints the pip download command (versions from uv.lock)

and runs, in the repository root (``.whl`` carried)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && python3 benchmarks/gpu_suite.py --out $OUT/gpu_suite.json

The suite imports only what a part needs (no Ray, webdataset or FAISS), and finds the trainer in ``train/``
when curate is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("clip", "vlm", "dedup", "unet")

# What a bare GPU machine lacks of what the parts import: pydantic (curate.base, the trainer's config) and
# its own needs, open_clip and ftfy (the CLIP tokenizer), diffusers (the UNet). typing-extensions: pydantic
# needs >= 4.16, newer than some images hold.
WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "open-clip-torch",
    "ftfy",
    "wcwidth",
    "diffusers",
)
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site:. && python3 benchmarks/gpu_suite.py --out $OUT/gpu_suite.json"
)

# Sizes: a GPU run's, and the smoke run's (tiny, on the CPU). An argument given on the command line wins.
FULL: dict[str, Any] = {
    "clip_models": "ViT-B-32,ViT-L-14",
    "clip_images": 384,
    "clip_batch": 256,
    "clip_window": 10.0,
    "clip_seconds": 90.0,
    "vlm_batch": 32,
    "vlm_size": 256,
    "vlm_new_tokens": 77,
    "vlm_batches": 4,
    "vlm_seconds": 90.0,
    "dedup_n": 10_000_000,
    "dedup_dim": 768,
    "dedup_topics": 10_000,
    "dedup_dup_share": 0.01,
    "dedup_threshold": 0.95,
    "dedup_seconds": 240.0,
    "unet_preset": "sd",
    "unet_resolution": 256,
    "unet_batch": 64,
    "unet_steps": 20,
    "unet_seconds": 60.0,
}
SMOKE: dict[str, Any] = {
    "clip_models": "gpu-suite-tiny-ViT",
    "clip_images": 12,
    "clip_batch": 6,
    "clip_window": 0.2,
    "clip_seconds": 60.0,
    "vlm_batch": 2,
    "vlm_size": 56,
    "vlm_new_tokens": 4,
    "vlm_batches": 1,
    "vlm_seconds": 30.0,
    "dedup_n": 20_000,
    "dedup_dim": 64,
    "dedup_topics": 50,
    "dedup_dup_share": 0.02,
    "dedup_threshold": 0.95,
    "dedup_seconds": 60.0,
    "unet_preset": "tiny",
    "unet_resolution": 64,
    "unet_batch": 2,
    "unet_steps": 2,
    "unet_seconds": 20.0,
}


# The smoke run's CLIP: a 1.6 M-parameter ViT registered with open_clip under this name, so that it loads
# through ClipModel like ViT-B-32 does, in a fraction of the time.
TINY_CLIP = "gpu-suite-tiny-ViT"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class OutOfTime(Exception):
    """A part ran past its cap."""


# --- the command ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: checks the code, measures nothing"
    )
    ap.add_argument("--wheels", action="store_true", help="print the wheels to carry and the device command")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite; parts share it")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="image decode threads")
    ap.add_argument("--seed", type=int, default=0)
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    args = ap.parse_args(argv)
    for key in FULL:
        if getattr(args, key) is None:
            setattr(args, key, (SMOKE if args.smoke else FULL)[key])
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wheels:
        print(wheel_commands())
        return 0
    results = run_suite(args)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if any(p["status"] == "failed" for p in results["parts"].values()) else 0


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if args.smoke:  # the figures mean nothing, and a busy small machine runs small ops fastest on one thread
        torch.set_num_threads(1)
        args.threads = min(args.threads, 2)
    try:
        return _run_parts(args, dev, cuda, started)
    finally:
        torch.set_num_threads(threads)


def _run_parts(args: argparse.Namespace, dev: Any, cuda: bool, started: float) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {
        "suite": "gpu_suite",
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "decode_threads": args.threads,
        "parts": {},
    }
    runners: dict[str, Callable[[argparse.Namespace, Any, float], dict[str, Any]]] = {
        "clip": part_clip,
        "vlm": part_vlm,
        "dedup": part_dedup,
        "unet": part_unet,
    }
    for name in args.parts:
        left = args.budget - (time.perf_counter() - started)
        cap = min(float(getattr(args, f"{name}_seconds")), left - 10)
        results["parts"][name] = run_part(runners[name], args, dev, cap)
        print(
            f"{name}: {results['parts'][name]['status']} in {results['parts'][name]['seconds']:.1f}s",
            flush=True,
        )
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def run_part(
    part: Callable[[argparse.Namespace, Any, float], dict[str, Any]],
    args: argparse.Namespace,
    dev: Any,
    cap: float,
) -> dict[str, Any]:
    """One part, with its status (ok, skipped, timed out, failed), seconds and peak GPU memory."""
    import torch

    start = time.perf_counter()
    if cap <= 0:
        return {"status": "skipped", "reason": "the suite's --budget is spent", "seconds": 0.0}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        out = {"status": "ok", **part(args, dev, cap)}
    except ImportError as e:
        out = {"status": "skipped", "reason": f"a package is missing: {e}"}
    except OutOfTime as e:
        out = {"status": "timed out", "reason": str(e)}
    except Exception as e:  # one broken part must not lose the others' figures
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["peak_gpu_memory_gib"] = (
        round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    )
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(results: dict[str, Any]) -> str:
    """The figures, one a line: part, figure, value."""
    lines = [
        f"{results['device']}, torch {results['torch']}, python {results['python']}"
        + (" (SMOKE: tiny sizes on the CPU, not a benchmark)" if results["smoke"] else ""),
        f"{'part':<7}{'figure':<44}{'value':>14}",
    ]

    def rows(prefix: str, d: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for key, value in d.items():
            if isinstance(value, dict):
                yield from rows(f"{prefix}{key} ", value)
            else:
                yield f"{prefix}{key}", value

    for name, part in results["parts"].items():
        for figure, value in rows("", part):
            shown = (
                f"{value:,.2f}"
                if isinstance(value, float)
                else f"{value:,}"
                if isinstance(value, int)
                else str(value)
            )
            lines.append(f"{name:<7}{figure:<44}{shown:>14}")
    return "\n".join(lines)


# --- what several parts share ---------------------------------------------------------------------


def synchronize(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def photo_jpeg(seed: int, width: int, height: int) -> bytes:
    """A smooth random colour field with fine grain, as JPEG: varied like a photo, cheap to make."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    grain = rng.integers(-8, 9, (height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(coarse, np.int16) + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_jpegs(count: int, low: int, high: int, seed: int, threads: int) -> list[bytes]:
    """``count`` JPEGs with sides drawn from ``low..high`` px (``low == high``: square)."""
    rng = np.random.default_rng(seed)
    sides = rng.integers(low, high + 1, (count, 2))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda k: photo_jpeg(seed * 100_003 + k, *map(int, sides[k])), range(count)))


def image_table(jpegs: list[bytes]):
    import pyarrow as pa

    return pa.table({"image": pa.array(jpegs, pa.binary())})


# --- clip ------------------------------------------------------------------------------------------


def part_clip(args: argparse.Namespace, dev: Any, cap: float) -> dict[str, Any]:
    open_clip = importlib.import_module("open_clip")
    from curate.kit.image_batches import iter_batches
    from curate.models.clip import ClipModel

    low, high = (64, 96) if args.smoke else (256, 512)
    jpegs = synthetic_jpegs(args.clip_images, low, high, args.seed, args.threads)
    table_ = image_table(jpegs)
    indices = list(range(len(jpegs)))
    models = [m for m in args.clip_models.split(",") if m]
    if TINY_CLIP in models:
        register_tiny_clip(open_clip)
    deadline = time.perf_counter() + cap
    out: dict[str, Any] = {"jpegs": len(jpegs), "jpeg_px": f"{low}-{high}", "batch": args.clip_batch}
    for k, name in enumerate(models):
        # Two timed windows a model, and its load and warm-up besides: a quarter of its share of the cap each.
        window = min(args.clip_window, (deadline - time.perf_counter()) / (4 * (len(models) - k)))
        if window <= 0:
            raise OutOfTime(f"no time left for {name}")
        clip = ClipModel.load(name, "random", device=str(dev), precision="auto", threads=None)

        def one_pass(clip: ClipModel = clip) -> int:
            done = 0
            for _, items in iter_batches(table_, indices, clip.preprocess, args.clip_batch, args.threads):
                done += len(clip.encode_images([x for x in items if x is not None]))
            return done

        one_pass()  # warm-up: kernels chosen, threads started
        with_decode = rate(one_pass, window)
        batch = [clip.preprocess(img) for img in _decoded(jpegs[: args.clip_batch])]
        model_only = rate(lambda clip=clip, batch=batch: len(clip.encode_images(batch)), window)
        out[name] = {
            "images_per_s": with_decode,
            "model_images_per_s": model_only,
            "precision": str(clip.dtype).removeprefix("torch."),
            "params_m": round(sum(p.numel() for p in clip.model.parameters()) / 1e6, 1),
        }
        del clip, batch
        gc.collect()
    return out


def register_tiny_clip(open_clip: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(TINY_CLIP_CFG))
        open_clip.add_model_config(path)


def _decoded(jpegs: list[bytes]) -> list[Any]:
    from curate.kit.image_batches import decode_rgb

    return [decode_rgb(b) for b in jpegs]


def rate(step: Callable[[], int], window: float) -> float:
    """Items per second of repeated ``step()`` calls (each returns its items) over at least one call and
    about ``window`` seconds."""
    done, start = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - start
        if elapsed >= window:
            return round(done / elapsed, 1)


# --- vlm -------------------------------------------------------------------------------------------


def qwen2_vl_2b_config(smoke: bool) -> dict[str, Any]:
    """Qwen2-VL-2B-Instruct's published config.json (curate's stand-in copy when it has one); the smoke run's
    shrinks every width and depth and keeps the vocabulary and the special tokens."""
    published: dict[str, Any] | None = None
    with contextlib.suppress(ImportError):
        from curate.models.stand_in import published_config  # type: ignore[import-not-found]

        published = published_config("Qwen/Qwen2-VL-2B-Instruct")
    config = published or {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": 1536,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }
    config = copy.deepcopy(config)
    if smoke:
        text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
        text |= {"max_window_layers": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
        config.update(text)
        if isinstance(config.get("text_config"), dict):  # the nested layout of newer configs
            config["text_config"].update(text)
        config["vision_config"].update(depth=2, embed_dim=32, num_heads=2, hidden_size=64)
    return config


def part_vlm(args: argparse.Namespace, dev: Any, cap: float) -> dict[str, Any]:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from curate.kit.image_batches import iter_batches

    raw = qwen2_vl_2b_config(args.smoke)
    config = Qwen2VLConfig(**raw)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(dev):  # random weights made where they run: no CPU init of 2B parameters
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = raw["eos_token_id"]
    model.generation_config.pad_token_id = raw["bos_token_id"]
    processor = Qwen2VLImageProcessor()
    jpegs = synthetic_jpegs(args.vlm_batch, args.vlm_size, args.vlm_size, args.seed + 1, args.threads)
    table_ = image_table(jpegs)
    merge = raw["vision_config"]["spatial_merge_size"] ** 2
    rng = np.random.default_rng(args.seed)
    # The chat template's layout: system and user header, the image, the instruction, the assistant header.
    before, after = rng.integers(0, 150_000, 14).tolist(), rng.integers(0, 150_000, 26).tolist()
    prompt_tokens = [0]

    def one_batch() -> int:
        images = [
            img
            for _, items in iter_batches(
                table_, list(range(len(jpegs))), lambda im: im, len(jpegs), args.threads
            )
            for img in items
        ]
        inputs = processor(images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        ids = [
            [
                *before,
                raw["vision_start_token_id"],
                *[raw["image_token_id"]] * (int(g.prod()) // merge),
                raw["vision_end_token_id"],
                *after,
            ]
            for g in grid
        ]
        input_ids = torch.tensor(ids, device=dev)
        prompt_tokens[0] = input_ids.shape[1]
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=inputs["pixel_values"].to(dev, dtype),
                image_grid_thw=grid.to(dev),
                max_new_tokens=args.vlm_new_tokens,
                min_new_tokens=args.vlm_new_tokens,  # forced: a random model's EOS would decide the figure
                do_sample=False,
            )
        synchronize(dev)
        new = out.shape[1] - input_ids.shape[1]
        if new != args.vlm_new_tokens:
            raise RuntimeError(f"generated {new} new tokens, not the {args.vlm_new_tokens} forced")
        return len(images)

    start = time.perf_counter()
    one_batch()  # warm-up
    warm = time.perf_counter() - start
    deadline, batches, images = time.perf_counter() + cap - warm, 0, 0
    start = time.perf_counter()
    while batches < args.vlm_batches:
        if batches and time.perf_counter() + warm > deadline:
            break
        images += one_batch()
        batches += 1
    elapsed = time.perf_counter() - start
    return {
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "config": "Qwen2-VL-2B-Instruct" + (" (shrunk for the smoke run)" if args.smoke else ""),
        "precision": str(dtype).removeprefix("torch."),
        "batch": args.vlm_batch,
        "image_px": args.vlm_size,
        "prompt_tokens": prompt_tokens[0],
        "new_tokens": args.vlm_new_tokens,
        "timed_batches": batches,
        "images_per_s": round(images / elapsed, 2),
        "tokens_per_s": round(images * args.vlm_new_tokens / elapsed, 1),
    }


# --- dedup -----------------------------------------------------------------------------------------


def make_vectors(
    n: int, dim: int, topics: int, dup_share: float, seed: int, dev: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, dim)`` float16 unit vectors on the host, made on ``dev`` a million at a time, and the planted
    pairs ``(source, copy)``: the last ``dup_share`` of the rows are near copies of distinct earlier rows
    (noise 0.1 to 0.2: cosine 0.98 to 0.995). The rest lie around ``topics`` centres at cosines ~0.3 to
    0.6 within a topic, as CLIP embeddings cluster by subject."""
    import torch

    g = torch.Generator(dev).manual_seed(seed)
    centres = torch.randn((topics, dim), generator=g, device=dev)
    centres /= centres.norm(dim=1, keepdim=True)
    spread = 0.9 + 0.7 * torch.rand(topics, generator=g, device=dev)
    host = np.empty((n, dim), np.float16)
    n_dup = int(n * dup_share)
    n_base = n - n_dup
    chunk = 1 << 20
    for start in range(0, n_base, chunk):
        m = min(chunk, n_base - start)
        topic = torch.randint(0, topics, (m,), generator=g, device=dev)
        x = centres[topic] + spread[topic, None] * torch.randn((m, dim), generator=g, device=dev) / dim**0.5
        host[start : start + m] = (x / x.norm(dim=1, keepdim=True)).half().cpu().numpy()
    sources = torch.randperm(n_base, generator=g, device=dev)[:n_dup].cpu().numpy()
    for start in range(0, n_dup, chunk):
        src = sources[start : start + chunk]
        base = torch.from_numpy(host[src]).to(dev).float()
        noise = 0.1 + 0.1 * torch.rand((len(src), 1), generator=g, device=dev)
        x = base + noise * torch.randn(base.shape, generator=g, device=dev) / dim**0.5
        host[n_base + start : n_base + start + len(src)] = (
            (x / x.norm(dim=1, keepdim=True)).half().cpu().numpy()
        )
    planted = np.stack([sources, np.arange(n_base, n)], axis=1).astype(np.int64)
    return host, planted


def pair_cosines(vectors: np.ndarray, pairs: np.ndarray, dev: Any) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(pairs), 1 << 20):
        p = pairs[start : start + (1 << 20)]
        a = torch.from_numpy(vectors[p[:, 0]]).to(dev).float()
        b = torch.from_numpy(vectors[p[:, 1]]).to(dev).float()
        out.append((a * b).sum(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def part_dedup(args: argparse.Namespace, dev: Any, cap: float) -> dict[str, Any]:
    from curate.kit.duplicates.semantic import SemanticBackend, semantic_pairs

    start = time.perf_counter()
    vectors, planted = make_vectors(
        args.dedup_n, args.dedup_dim, args.dedup_topics, args.dedup_dup_share, args.seed, dev
    )
    made = time.perf_counter() - start
    deadline = start + cap

    def progress(what: str, done: int, total: int) -> None:
        if time.perf_counter() > deadline:
            raise OutOfTime(f"semantic_pairs past the {cap:.0f} s cap at {what} {done:,}/{total:,}")

    threshold = args.dedup_threshold
    start = time.perf_counter()
    pairs = semantic_pairs(
        vectors, np.arange(len(vectors)), threshold, backend="torch", torch_device=str(dev), progress=progress
    )
    seconds = time.perf_counter() - start
    n = len(vectors)
    found = np.isin(planted[:, 0] * n + planted[:, 1], pairs.a * n + pairs.b)
    cosine = pair_cosines(vectors, planted, dev)
    above = cosine >= threshold
    clear = cosine >= threshold + 0.01  # float16 rounding cannot move these across the threshold
    return {
        "backend": SemanticBackend("torch", dev.type).label,
        "vectors": n,
        "dim": args.dedup_dim,
        "dtype": "float16",
        "threshold": threshold,
        "make_seconds": round(made, 2),
        "dedup_seconds": round(seconds, 2),
        "vectors_per_s": round(n / seconds),
        "pairs_found": len(pairs),
        "planted_pairs": len(planted),
        "planted_above_threshold": int(above.sum()),
        "planted_found": int(found.sum()),
        "planted_recall": round(float(found[above].mean()) if above.any() else 0.0, 5),
        "planted_recall_clear": round(float(found[clear].mean()) if clear.any() else 0.0, 5),
    }


# --- unet ------------------------------------------------------------------------------------------


def trainer_module(name: str) -> Any:
    """``curate.train.<name>``: installed, or from ``train/`` of this source tree (pyproject maps it to
    ``curate.train``, which a bare ``PYTHONPATH=.`` does not)."""
    try:
        return importlib.import_module(f"curate.train.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("curate.train", f"curate.train.{name}"):
            raise
    import curate

    spec = importlib.util.spec_from_file_location(
        "curate.train", ROOT / "train" / "__init__.py", submodule_search_locations=[str(ROOT / "train")]
    )
    assert spec is not None and spec.loader is not None  # the file is in this tree
    package = importlib.util.module_from_spec(spec)
    sys.modules["curate.train"] = package
    spec.loader.exec_module(package)
    curate.train = package  # type: ignore[attr-defined]
    return importlib.import_module(f"curate.train.{name}")


def part_unet(args: argparse.Namespace, dev: Any, cap: float) -> dict[str, Any]:
    import torch

    importlib.import_module("diffusers")
    batch, deadline = args.unet_batch, time.perf_counter() + cap
    while True:
        try:
            return unet_steps(args, dev, batch, deadline)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        batch //= 2  # the largest batch that fits; out of the handler, so the failed step's tensors are free
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def unet_steps(args: argparse.Namespace, dev: Any, batch: int, deadline: float) -> dict[str, Any]:
    """The trainer's step (train/trainer.py ``loss`` and ``run``) on random latents and text states."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    config, model = trainer_module("config"), trainer_module("model")
    cfg = config.ModelConfig(unet=config.UNetConfig(preset=args.unet_preset))
    optim = config.OptimConfig()
    latent, channels, cross, text_len = args.unet_resolution // 8, 4, 768, 77  # SD's VAE and CLIP ViT-L text
    torch.manual_seed(args.seed)
    with torch.device(dev):
        denoiser = model.Denoiser(model.build_unet(cfg, channels, latent, cross, cross), None)
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    opt = torch.optim.AdamW(
        denoiser.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    noise_schedule = DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction,
        clip_sample=False,
    )
    alphas_all = noise_schedule.alphas_cumprod.to(dev)
    null = model.Text(torch.randn(1, text_len, cross, device=dev), torch.randn(1, cross, device=dev))
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def step() -> int:
        x0 = torch.randn(batch, channels, latent, latent, device=dev)
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.train_timesteps, (batch,), device=dev)
        drop = torch.rand(batch, device=dev) < optim.cfg_dropout
        text = model.Text(
            torch.randn(batch, text_len, cross, device=dev), torch.randn(batch, cross, device=dev)
        )
        noisy = noise_schedule.add_noise(x0, noise, t)
        denoiser.train()
        with autocast:
            pred = denoiser(noisy, t, text, null, None, drop, None)
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        alphas = alphas_all[t]
        snr = alphas / (1 - alphas)
        loss = (per_sample * torch.clamp(snr, max=optim.snr_gamma) / snr).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                e.lerp_(p.detach(), 1 - optim.ema_decay)
        return batch

    for _ in range(2):  # warm-up: kernels chosen, the optimiser's state made
        step()
    synchronize(dev)
    steps, start = 0, time.perf_counter()
    while steps < args.unet_steps and (steps == 0 or time.perf_counter() < deadline):
        step()
        steps += 1
    synchronize(dev)
    elapsed = time.perf_counter() - start
    return {
        "preset": args.unet_preset,
        "params_m": round(sum(p.numel() for p in denoiser.parameters()) / 1e6, 1),
        "image_px": args.unet_resolution,
        "latent": f"{channels}x{latent}x{latent}",
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "batch": batch,
        "timed_steps": steps,
        "steps_per_s": round(steps / elapsed, 3),
        "images_per_s": round(steps * batch / elapsed, 1),
    }


# --- the wheels a bare GPU machine needs ------------------------------------------------------------


def locked_versions(names: tuple[str, ...], lock: Path = ROOT / "uv.lock") -> dict[str, str]:
    import tomllib

    packages = tomllib.loads(lock.read_text())["package"]
    found = {p["name"]: p["version"] for p in packages if p["name"] in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"uv.lock has no {', '.join(missing)}")
    return found


def wheel_commands() -> str:
    versions = locked_versions(WHEELS)
    platforms = " ".join(f"--platform {p}" for p in _PLATFORMS)
    lines = [
        "# Here, in the repository root (the wheels stay out of git):",
        "echo /.whl/ >> .git/info/exclude",
        f"python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"{platforms} -d .whl " + " ".join(f"{name}=={versions[name]}" for name in WHEELS),
        "# There (carry .whl), in the repository root:",
        DEVICE_COMMAND,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
