"""Generated data and models for tests and benchmarks: LAION-style inputs and a tiny open_clip model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["TINY_CLIP_CFG", "make_input", "make_tiny_clip"]


def make_input(path: str | os.PathLike, rows: int, *, seed: int = 0, bad_every: int = 0) -> Path:
    """A LAION-style parquet (``URL``, ``TEXT``, ``similarity``) of ``rows`` rows.

    With ``bad_every=k``, every k-th row has a problem: a null URL, an ftp URL, an empty caption or a repeat
    of the row before, in turn.
    """
    urls, captions, sims = [], [], []
    words = ["red", "small", "old", "bright", "wooden", "stone", "blue", "quiet", "tall", "round"]
    things = ["house", "boat", "dog", "tree", "cup", "bridge", "chair", "lamp", "bird", "car"]
    for i in range(rows):
        h = int(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), 16)
        urls.append(f"http://images.example.com/{seed}/{i:07d}.jpg")
        captions.append(f"a {words[h % 10]} {things[(h >> 8) % 10]} number {i}" + " extra" * ((h >> 16) % 4))
        sims.append(round(((h >> 24) % 1000) / 1000, 3))
        if bad_every and i % bad_every == bad_every - 1:
            kind = (i // bad_every) % 4
            if kind == 0:
                urls[-1] = None
            elif kind == 1:
                urls[-1] = f"ftp://images.example.com/{i}.jpg"
            elif kind == 2:
                captions[-1] = ""
            elif i > 0:
                urls[-1], captions[-1] = urls[-2], captions[-2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"URL": urls, "TEXT": captions, "similarity": sims}), path, row_group_size=1000)
    return path


# --- tiny models, saved and loaded through the real loading code -------------------------------------

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised 1.6 M-parameter open_clip model saved as a hub-style folder
    (``open_clip_config.json`` + ``open_clip_model.safetensors``), which loads with ``local-dir:<folder>``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    config = {
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder
