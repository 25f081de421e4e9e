"""Aesthetic score: LAION's improved aesthetic predictor (sac+logos+ava1, linear MSE), the rating behind
LAION-Aesthetics, on OpenAI CLIP ViT-L/14 image embeddings. Ratings run roughly 1..10.

Where the shard already holds an ``image_embedding`` from that same CLIP (``clip_model`` names it:
``clip_score`` with ``model: ViT-L-14, pretrained: openai``), the head runs on it and no image is decoded;
other rows are embedded here, by a CLIP loaded on first need.

Writes ``aesthetic_score`` for every kept row with an image; other rows and images that do not decode get
null. A score is data: this stage never drops a row; the ``filter`` stage does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import model_validator

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
from curate.kit.image_batches import scatter
from curate.models.weights import WeightsSpec


class AestheticConfig(ClipHeadConfig):
    @model_validator(mode="after")
    def _head_for_the_clip(self) -> AestheticConfig:
        check_default_head(self, "AESTHETIC_HEADS", "aesthetic")
        return self


class Aesthetic(Stage):
    name = "aesthetic"
    Config = AestheticConfig
    columns = (
        Column(
            "aesthetic_score",
            pa.float32(),
            "aesthetic",
            "LAION improved aesthetic predictor's rating of the image, roughly 1..10",
        ),
    )
    reads = ("image", "status", "drop_reason")  # and image_embedding, clip_model where the shard has them
    writes = ("aesthetic_score",)
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.25)

    config: AestheticConfig

    def __init__(self, config: AestheticConfig | None = None):
        super().__init__(config)
        require("aesthetic", "torch", "open_clip", "safetensors")

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        return head_resources(self.config, upstream)

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        return head_memory(self.config, device, upstream)

    def weights(self) -> list[WeightsSpec]:
        from curate.models.heads import AESTHETIC_HEADS

        return clip_head_weights(self.config, AESTHETIC_HEADS, "aesthetic")

    def setup(self) -> None:
        from curate.models.heads import AESTHETIC_HEADS, load_aesthetic_head

        self.scorer = ClipHeadScorer.load(self.config, AESTHETIC_HEADS, load_aesthetic_head, "aesthetic")

    def __call__(self, table: pa.Table) -> pa.Table:
        rows, scores = self.scorer.score(table)
        values = scatter(table.num_rows, rows, np.asarray(scores, np.float32).tolist())
        return set_column(table, "aesthetic_score", values)
