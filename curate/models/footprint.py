"""What a model needs in memory, known before any weights load: the numbers the plan is made of.

A model stage's worker holds, at its peak:

- the process itself: Python, torch and the model library imported (``PROCESS_BASE``, measured);
- the weights: parameters x bytes per parameter in the dtype the device runs (fp32 on a CPU, bf16 or fp16 on
  a GPU). Parameters are counted without reading any weights: from the safetensors headers of weights that
  are already here, else by building the architecture on torch's ``meta`` device from its config (open_clip's
  own config, timm's, a transformers config.json from the model folder or the published one kept in
  ``curate/models/stand_in_configs/``);
- a working set that grows with the batch: activations, the KV cache of generation, decoded images. Its
  per-item constants were measured at real size with stand-in weights (``benchmarks/flagship.py``,
  figures in benchmarks/RESULTS.md) on the CPU in fp32; on a GPU they are scaled by the dtype's bytes.

Where a worker runs on a GPU, the weights and the working set are GPU memory; the host still holds the
process and, while the model loads, one copy of the weights in their dtype (``from_pretrained`` reads them
into host memory before they move).

Nothing here imports torch, open_clip or transformers until a count is asked for, and counts are cached.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Any

from curate.base import MIB, MemoryNeed, fmt_bytes

__all__ = [
    "PROCESS_BASE",
    "TASK_BASE",
    "bytes_per_param",
    "generator_need",
    "hf_params",
    "image_model_need",
    "machine_memory",
    "open_clip_folder_params",
    "open_clip_params",
    "safetensors_params",
    "timm_params",
]

# RSS of a worker process with pyarrow, torch and the model libraries imported, before any weights: measured
# by benchmarks/flagship.py (0.64 to 0.85 GiB across the stages on Linux, x86-64).
PROCESS_BASE = 900 * MIB
# A process that runs no model (download, filters): Python, pyarrow, numpy, PIL.
TASK_BASE = 300 * MIB


def bytes_per_param(device: str, precision: str = "auto") -> int:
    """What a parameter (and an activation) takes in the dtype :func:`curate.models.device.pick_dtype`
    chooses: fp32 on a CPU unless asked otherwise, bf16 or fp16 on a GPU."""
    if precision in ("bf16", "fp16"):
        return 2
    if precision == "fp32":
        return 4
    return 2 if device == "cuda" else 4


# --- counting parameters without loading weights ----------------------------------------------------


def safetensors_params(path: str | os.PathLike) -> int | None:
    """Parameters in a ``.safetensors`` file, or in every one of a folder, from their headers alone; None
    when there is none."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix == ".safetensors" and f.is_file()]
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=64)
def open_clip_params(arch: str) -> tuple[int, dict[str, Any]]:
    """(parameters, vision tower settings) of an open_clip architecture, built on the meta device."""
    import logging

    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"open_clip has no architecture {arch!r}")
    logging.getLogger().disabled, was = True, logging.getLogger().disabled
    try:
        net = open_clip.create_model(arch, pretrained=None, device="meta")
    finally:
        logging.getLogger().disabled = was
    return _count(net), _vision_settings(cfg)


def open_clip_folder_params(folder: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """The same for a checkpoint folder with ``open_clip_config.json`` (weights counted from their headers
    where they are safetensors)."""
    cfg = json.loads((Path(folder) / "open_clip_config.json").read_text())["model_cfg"]
    params = safetensors_params(folder)
    if params is None:
        import open_clip

        params = _count(open_clip.CLIP(**cfg).to("meta")) if "vision_cfg" in cfg else 0
    return params, _vision_settings(cfg)


def _vision_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    v = cfg.get("vision_cfg", {})
    t = cfg.get("text_cfg", {})
    return {
        "image_size": v.get("image_size", 224),
        "patch_size": v.get("patch_size", 16),
        "width": v.get("width", 768),
        "layers": v.get("layers", 12),
        "text_width": t.get("width", 512),
        "text_layers": t.get("layers", 12),
        "context_length": t.get("context_length", 77),
        "timm": bool(v.get("timm_model_name")),
    }


@functools.lru_cache(maxsize=16)
def timm_params(arch: str, num_classes: int = 2) -> int:
    import timm
    import torch

    with torch.device("meta"):
        return _count(timm.create_model(arch, pretrained=False, num_classes=num_classes))


def hf_params(config: dict[str, Any]) -> int:
    """Parameters of a transformers model from its ``config.json`` contents, built on the meta device."""
    return _hf_params(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _hf_params(config_json: str) -> int:
    import torch
    import transformers

    config = json.loads(config_json)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    names = config.get("architectures") or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    with torch.device("meta"):
        net = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    return _count(net)


# --- working sets -----------------------------------------------------------------------------------

# Working set at real size, fp32 on a CPU, measured with stand-in weights (benchmarks/flagship.py; RESULTS.md):
# the peak while scoring, above the loaded model, at two batch sizes: a fixed part and a part per image
# (preprocessed tensors, activations; text encoding for a CLIP). ViT-L/14 at 224 px: 270 MiB at batch 8,
# 581 MiB at batch 32. Other ViTs scale by tokens x width; on a GPU by the dtype's bytes.
IMAGE_WORKING = {
    "vit": 13 * MIB,  # per image, ViT-L/14 at 224 px
    "cnn": 15 * MIB,  # per image, EfficientNet-B3 at 256 px
}
IMAGE_WORKING_FIXED = 170 * MIB
# What generation holds beyond the sum of the KV cache, the prefill's activations and the logits (the
# allocator's slack, attention's temporaries), as a factor on that sum. Measured at real size with stand-ins
# (benchmarks/flagship.py): Qwen2-VL-2B at batch 32 in fp32 on a CPU held 1.96 GiB while generating, where
# the sum gives 2.0; a quarter on top for what one measurement cannot show.
GENERATION_ALLOWANCE = 1.25
# A decoded image in flight (RGB array and its PIL copy), per decode thread's queue slot.
DECODED_IMAGE = 1 * MIB


def image_model_need(
    params: int,
    device: str,
    batch: int,
    *,
    kind: str = "vit",
    vision: dict[str, Any] | None = None,
    precision: str = "auto",
    name: str = "model",
    checkpoint_bytes: int | None = None,
) -> MemoryNeed:
    """An image model (a CLIP, a CNN classifier) run on batches of ``batch`` images.

    Loading holds the model and the checkpoint's state dict at once (``checkpoint_bytes``, default fp32: what
    open_clip and timm files hold), which on a CPU can be more than scoring holds; on a GPU the model is
    built on the host first, so the host holds both before they move."""
    b = bytes_per_param(device, precision)
    checkpoint = params * 4 if checkpoint_bytes is None else checkpoint_bytes
    weights = params * b
    per_item = IMAGE_WORKING[kind]
    if kind == "vit" and vision:
        tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        per_item *= (tokens * vision["width"]) / (257 * 1024)  # relative to ViT-L/14 at 224 px
    working = int((IMAGE_WORKING_FIXED + batch * per_item) * b / 4)
    decoded = batch * DECODED_IMAGE  # images decode on the host either way
    parts = (
        f"{name}: {params / 1e6:.0f}M params x {b} B = {fmt_bytes(weights)}",
        f"working set for a batch of {batch}: {fmt_bytes(working + decoded)}",
        f"while loading, the checkpoint too: {fmt_bytes(checkpoint)}",
    )
    if device == "cuda":
        # Built in fp32 on the host, filled from the checkpoint, then moved: the host keeps only the process.
        loading = params * 4 + checkpoint + decoded
        return MemoryNeed(PROCESS_BASE + loading, weights + working, parts, loading, working)
    extra = max(working + decoded, checkpoint)
    return MemoryNeed(PROCESS_BASE + weights + extra, 0, parts, extra)


def generator_need(
    config: dict[str, Any] | None,
    params: int,
    device: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    *,
    image_tokens: int = 0,
    precision: str = "auto",
    name: str = "model",
    checkpoint_bytes: int | None = None,
) -> MemoryNeed:
    """A causal language model (or a VLM's decoder) generating ``new_tokens`` for ``batch`` prompts of about
    ``prompt_tokens`` tokens (``image_tokens`` of them from an image, for a VLM): weights, the KV cache, the
    prefill's activations and the last position's logits, with a measured allowance on top
    (``GENERATION_ALLOWANCE``). ``from_pretrained`` holds the checkpoint (bf16 by default, as published)
    beside the model it fills, so loading in fp32 on a CPU peaks at both."""
    b = bytes_per_param(device, precision)
    checkpoint = params * 2 if checkpoint_bytes is None else checkpoint_bytes
    weights = params * b
    text = (config or {}).get("text_config") or config or {}
    layers = text.get("num_hidden_layers", 24)
    hidden = text.get("hidden_size", 2048)
    heads = text.get("num_attention_heads", 16)
    kv_heads = text.get("num_key_value_heads", heads)
    inter = text.get("intermediate_size", 4 * hidden)
    vocab = text.get("vocab_size", 32000)
    head_dim = text.get("head_dim") or hidden // heads
    seq = prompt_tokens + image_tokens + new_tokens
    kv = 2 * layers * kv_heads * head_dim * seq * batch * b
    prefill = batch * (prompt_tokens + image_tokens) * (4 * hidden + 2 * inter) * b
    scores = batch * heads * (prompt_tokens + image_tokens) ** 2 * b
    logits = 2 * batch * vocab * 4
    vision = 0
    if image_tokens and (config or {}).get("vision_config"):
        v = config["vision_config"]
        width = v.get("embed_dim") or v.get("hidden_size", 1024)
        patches = image_tokens * v.get("spatial_merge_size", 1) ** 2
        vision = batch * patches * width * 12 * b + batch * v.get("num_heads", 16) * patches**2 * b
    working = int((kv + prefill + scores + logits + vision) * GENERATION_ALLOWANCE)
    decoded = batch * DECODED_IMAGE if image_tokens else 0
    parts = (
        f"{name}: {params / 1e9:.2f}B params x {b} B = {fmt_bytes(weights)}",
        f"generation for a batch of {batch} ({prompt_tokens + image_tokens} prompt + {new_tokens} new "
        f"tokens): KV cache {fmt_bytes(kv)}, activations {fmt_bytes(prefill + scores + logits + vision)}, "
        f"x{GENERATION_ALLOWANCE:g} as measured",
        f"while loading, the checkpoint too: {fmt_bytes(checkpoint)}",
    )
    if device == "cuda":
        # from_pretrained reads the weights into host memory (beside the mapped checkpoint) before they move.
        loading = weights + checkpoint + decoded
        return MemoryNeed(PROCESS_BASE + loading, weights + working, parts, loading, working)
    extra = max(working + decoded, checkpoint)
    return MemoryNeed(PROCESS_BASE + weights + extra, 0, parts, extra)


# --- this machine -----------------------------------------------------------------------------------


def machine_memory() -> int | None:
    """Bytes of memory a process here can use: the smaller of MemAvailable and the cgroup's limit (a
    container's), or None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            text = Path(limit).read_text().strip()
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 1 << 60:
            found.append(max(0, int(text) - used))
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)
