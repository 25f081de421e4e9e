"""Helpers for tests and benchmarks: generated inputs and test-only stages.

The stages live in the installed package (not in a test module) so that Ray workers and ``curate`` run in a
subprocess can import them. Importing this module registers them; pipelines of users never see them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curate.base import StrictModel
from curate.core.registry import register
from curate.core.schema import Column, declare
from curate.core.stage import GlobalStage, Stage, StageResources, drop

__all__ = ["make_input", "register_test_stages"]


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


CAPTION_CHARS = declare(
    Column("caption_chars", pa.int32(), "caption_chars", "test: caption length, by a model stage")
)


class SyntheticImageConfig(StrictModel):
    size: int = Field(16, gt=0)


class SyntheticImage(Stage):
    """Test stage: a small deterministic PNG per ok row (colour from the uid), with width and height."""

    name = "synthetic_image"
    Config = SyntheticImageConfig
    reads = ("uid", "status")
    writes = ("image", "width", "height")

    def __call__(self, table: pa.Table) -> pa.Table:
        from PIL import Image

        images, widths, heights = [], [], []
        for uid, status in zip(table["uid"].to_pylist(), table["status"].to_pylist(), strict=True):
            if status != "ok":
                images.append(None)
                widths.append(None)
                heights.append(None)
                continue
            w = self.config.size + int(uid[0], 16)  # sizes vary: filters on width have something to do
            h = self.config.size
            buf = io.BytesIO()
            Image.new("RGB", (w, h), tuple(bytes.fromhex(uid[:6]))).save(buf, format="PNG")
            images.append(buf.getvalue())
            widths.append(w)
            heights.append(h)
        return (
            table.append_column("image", pa.array(images, pa.binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
        )


class CaptionChars(Stage):
    """Test stage that behaves like a model stage: state built in ``setup()``, run as an actor under Ray."""

    name = "caption_chars"
    reads = ("caption",)
    writes = ("caption_chars",)
    resources = StageResources(cpus=0.5, uses_model=True)

    def setup(self) -> None:
        self.setup_pid = os.getpid()

    def __call__(self, table: pa.Table) -> pa.Table:
        if not hasattr(self, "setup_pid"):
            raise RuntimeError("setup() was not called before the stage ran")
        lengths = pc.utf8_length(pc.fill_null(table["caption"], ""))
        return table.append_column("caption_chars", pc.cast(lengths, pa.int32()))


class SleepConfig(StrictModel):
    seconds: float = Field(0.5, ge=0)


class Sleep(Stage):
    """Test stage: sleeps per shard, so that a test can kill a run midway."""

    name = "sleep"
    Config = SleepConfig

    def __call__(self, table: pa.Table) -> pa.Table:
        time.sleep(self.config.seconds)
        return table


class FailConfig(StrictModel):
    rows: list[int] = Field(description="input_index values whose shard fails")
    times: int = Field(1, ge=0, description="fail this many attempts, then succeed; counted in state_dir")
    state_dir: str


class Fail(Stage):
    """Test stage: raises on shards that hold one of ``rows``, for the first ``times`` attempts."""

    name = "fail"
    Config = FailConfig

    def __call__(self, table: pa.Table) -> pa.Table:
        hit = set(self.config.rows) & set(table["input_index"].to_pylist())
        if hit:
            counter = Path(self.config.state_dir) / f"attempts-{min(hit)}"
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < self.config.times:
                raise RuntimeError(f"planned failure {n + 1}/{self.config.times} for rows {sorted(hit)}")
        return table


class KeepLongestConfig(StrictModel):
    keep: int = Field(gt=0, description="how many of the longest kept captions, over the whole dataset")


class KeepLongest(GlobalStage):
    """Test global stage: keeps the ``keep`` longest captions of the whole dataset (ties by uid)."""

    name = "keep_longest"
    Config = KeepLongestConfig
    reads = ("caption", "uid")
    writes = ("drop_reason",)

    def fit(self, shards) -> None:
        from curate.core.schema import is_kept
        from curate.core.storage import filesystem, write_atomic

        rows = []
        for shard in shards:
            t = shards.read(shard, ["uid", "caption", "status", "drop_reason"])
            t = t.filter(is_kept(t))
            rows += [
                (-len(c or ""), u)
                for u, c in zip(t["uid"].to_pylist(), t["caption"].to_pylist(), strict=True)
            ]
        keep = [u for _, u in sorted(rows)[: self.config.keep]]
        fs, _ = filesystem(self.state_path)
        write_atomic(fs, f"{self.state_path}/keep.json", json.dumps(sorted(keep)).encode())

    def setup(self) -> None:
        from curate.core.storage import filesystem, read_json

        fs, _ = filesystem(self.state_path)
        self.keep = pa.array(read_json(fs, f"{self.state_path}/keep.json"), pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        return drop(table, pc.invert(pc.is_in(table["uid"], self.keep)), "not_longest")


class PlantedConfig(StrictModel):
    columns: list[str] = Field(min_length=1, description="declared columns to fill from input_<column>")


class Planted(Stage):
    """Test stage: copies input columns named ``input_<column>`` (the reader renames input columns that a
    stage declares) into the declared ``<column>``, cast to its type, on ok rows: planted embeddings,
    scores and hashes for testing the stages that read them."""

    name = "planted"
    Config = PlantedConfig

    config: PlantedConfig

    @property
    def reads(self) -> tuple[str, ...]:
        return ("status", *(f"input_{c}" for c in self.config.columns))

    @property
    def writes(self) -> tuple[str, ...]:
        return tuple(self.config.columns)

    def __call__(self, table: pa.Table) -> pa.Table:
        from curate.core.schema import COLUMNS

        ok = pc.equal(table["status"], "ok")
        for column in self.config.columns:
            source = table[f"input_{column}"]
            values = pc.if_else(ok, source, pa.nulls(table.num_rows, source.type))
            values = values.cast(COLUMNS[column].type)
            if column in table.column_names:
                table = table.set_column(table.schema.get_field_index(column), column, values)
            else:
                table = table.append_column(column, values)
        return table


TEST_STAGES = (SyntheticImage, CaptionChars, Sleep, Fail, KeepLongest, Planted)


def register_test_stages() -> None:
    for cls in TEST_STAGES:
        register(cls)


register_test_stages()


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
