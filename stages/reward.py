"""Human-preference reward: how much people would prefer each image for its caption, by a reward model
trained on their choices (PickScore, HPS v2, ImageReward; :mod:`curate.models.reward`).

Compress & Align curates with such a model after CLIP filtering and dedup; the aesthetic head rates the
image alone and CLIPScore only their match, where a reward model scores the pair as a person would.

Writes ``reward_score`` (the family's own scale: PickScore ~15..25, HPS v2 ~0.2..0.35, ImageReward ~-2..2)
and ``reward_model`` (``<family>/<model>``) for every kept row with an image; other rows and images that do
not decode get null. A score is data: this stage never drops a row; the ``filter`` stage does
(``reward_score >= ...``), and dedup's ``keep`` can order by it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.base import MemoryNeed, StrictModel
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.image_batches import iter_batches, rows_to_score, scatter
from curate.models.device import Device, Precision
from curate.models.weights import WeightsSpec


class RewardConfig(StrictModel):
    family: str = Field("pickscore", description="pickscore, hpsv2 or imagereward (curate.models.reward)")
    model: str | None = Field(
        None,
        description="pickscore: hub id or folder (yuvalkirstain/PickScore_v1); hpsv2: v2.0, v2.1 or a "
        "checkpoint file (v2.1); imagereward: ImageReward-v1.0 or an ImageReward.pt with its "
        "med_config.json beside it (ImageReward-v1.0)",
    )
    processor: str | None = Field(
        None,
        description="pickscore: processor hub id or folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for "
        "PickScore_v1, else the model's folder); imagereward: BERT's vocab.txt or its folder",
    )
    architecture: str = Field("ViT-H-14", description="hpsv2: the open_clip architecture of the checkpoint")
    batch_size: int = Field(32, gt=0)
    device: Device = "auto"
    precision: Precision = Field("auto", description="auto: bf16 (fp16) on a GPU, fp32 on a CPU")
    decode_threads: int | None = Field(None, gt=0, description="CPU threads decoding images (default: cores)")
    torch_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from curate.models.reward import FAMILIES

        if value not in FAMILIES:
            raise ValueError(f"no reward family {value!r}; one of {', '.join(sorted(FAMILIES))}")
        return value


class Reward(Stage):
    name = "reward"
    Config = RewardConfig
    columns = (
        Column(
            "reward_score", pa.float32(), "reward", "human-preference reward of the image for its caption"
        ),
        Column("reward_model", pa.string(), "reward", "the reward model that scored the row: family/model"),
    )
    reads = ("image", "caption", "status", "drop_reason")
    writes = ("reward_score", "reward_model")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.25)

    config: RewardConfig

    @property
    def source(self):
        from curate.models.reward import RewardSource

        c = self.config
        return RewardSource(c.family, c.model, c.processor, c.architecture)

    @property
    def adapter(self):
        from curate.models.reward import family

        return family(self.config.family)

    def weights(self) -> list[WeightsSpec]:
        return self.adapter.weights(self.source)

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        c = self.config
        return self.adapter.memory(self.source, device, c.batch_size, c.precision)

    def setup(self) -> None:
        c = self.config
        self.model = self.adapter.load(self.source, c.device, c.precision, c.torch_threads)

    def __call__(self, table: pa.Table) -> pa.Table:
        c, n = self.config, table.num_rows
        captions = table["caption"].to_pylist()
        threads = c.decode_threads or os.cpu_count() or 1
        scored, scores = [], []
        for batch_rows, tensors in iter_batches(
            table, rows_to_score(table), self.model.preprocess, c.batch_size, threads
        ):
            ok = [(r, t) for r, t in zip(batch_rows, tensors, strict=True) if t is not None]
            if not ok:
                continue
            scores.append(self.model.score([t for _, t in ok], [captions[r] or "" for r, _ in ok]))
            scored += [r for r, _ in ok]
        values = np.concatenate(scores).tolist() if scores else []
        table = set_column(table, "reward_score", scatter(n, scored, values))
        return set_column(table, "reward_model", scatter(n, scored, [self.model.name] * len(scored)))
