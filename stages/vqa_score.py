"""VQAScore of each image-caption pair: the probability that a vision-language model answers "Yes" to
'Does this figure show "<caption>"? Please answer yes or no.' (:mod:`curate.models.vqa`).

CLIPScore scores a caption as a bag of words; VQAScore reads it as a sentence, so it separates "a dog chasing
a cat" from "a cat chasing a dog" where CLIPScore cannot. It costs a VLM forward pass per pair (one answer
token, no generation beyond it), so it belongs after the cheap filters and dedup.

Writes ``vqa_score`` (0..1) and ``vqa_model`` for every kept row with an image; other rows and images that do
not decode get null. Any transformers VLM the ``recaption`` stage loads that answers questions: Qwen2-VL /
Qwen2.5-VL, LLaVA and other chat VLMs, BLIP-2, InstructBLIP. A score is data: the ``filter`` stage drops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.hub_model_stage import HubModelConfig, HubModelStage
from curate.kit.image_batches import iter_batches, rows_to_score, scatter
from curate.models.vqa import ANSWER, QUESTION

Family = Literal["auto", "blip2", "instructblip", "qwen2_vl", "llava", "chat"]


class VqaScoreConfig(HubModelConfig):
    model: str = Field(
        "Qwen/Qwen2-VL-2B-Instruct",
        description="hub id (resolved through the model directory, CURATE_MODEL_DIR) or a local model folder",
    )
    backend: Literal["hf"] = Field("hf", description="hf: transformers (the logits are read, not generated)")
    family: Family = Field("auto", description="how the model is asked; auto: from its config.json")
    question: str = Field(QUESTION, description="the question; {} is where the caption goes (VQAScore's)")
    answer: str = Field(ANSWER, description="the answer whose probability is the score; one token")
    max_new_tokens: int = Field(1, ge=1, le=1, description="one: the first answer position is read")
    decode_threads: int | None = Field(None, gt=0, description="CPU threads decoding images (default: cores)")

    @field_validator("question")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("the question must hold {} exactly once, where the caption goes")
        return value

    @field_validator("answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the answer must not be empty")
        return value


class VqaScore(HubModelStage):
    name = "vqa_score"
    Config = VqaScoreConfig
    columns = (
        Column(
            "vqa_score",
            pa.float32(),
            "vqa_score",
            'VQAScore: P("Yes") of a VLM asked if the image shows the caption',
        ),
        Column("vqa_model", pa.string(), "vqa_score", "the vision-language model that gave vqa_score"),
    )
    reads = ("image", "caption", "status", "drop_reason")
    writes = ("vqa_score", "vqa_model")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.5)
    role = "VQAScore model"

    config: VqaScoreConfig

    def prompt_tokens(self, upstream: Sequence[Stage]) -> tuple[int, int]:
        """The question with a caption, and the image's tokens (Qwen2-VL: one per 28x28 px patch)."""
        side = next(
            (getattr(s.config, "image_size", None) for s in upstream if getattr(s, "name", "") == "download"),
            None,
        )
        config, _ = self.model_config()
        if (config or {}).get("model_type", "") in ("qwen2_vl", "qwen2_5_vl"):
            return 64, math.ceil((side or 512) / 28) ** 2
        return 64, 0

    def setup(self) -> None:
        from curate.models.vqa import VqaScorer

        c = self.config
        folder, name = self.locate()
        self.scorer = VqaScorer.load(
            folder,
            name,
            family=c.family,
            question=c.question,
            answer=c.answer,
            device=c.device,
            precision=c.precision,
            threads=c.torch_threads,
            trust_remote_code=c.trust_remote_code,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        c, n = self.config, table.num_rows
        captions = table["caption"].to_pylist()
        threads = c.decode_threads or os.cpu_count() or 1
        scored, scores = [], []
        for batch_rows, images in iter_batches(table, rows_to_score(table), _same, c.batch_size, threads):
            ok = [(r, img) for r, img in zip(batch_rows, images, strict=True) if img is not None]
            if not ok:
                continue
            scores.append(self.scorer.score([img for _, img in ok], [captions[r] or "" for r, _ in ok]))
            scored += [r for r, _ in ok]
        values = np.concatenate(scores).tolist() if scores else []
        table = set_column(table, "vqa_score", scatter(n, scored, values))
        return set_column(table, "vqa_model", scatter(n, scored, [self.scorer.name] * len(scored)))


def _same(image):
    return image
