"""CLIP image-text similarity with open_clip: the LAION-5B and DataComp filter.

Writes ``clip_score``, the cosine of the L2-normalised image and caption embeddings, for every kept row with
an image; other rows get null and are passed through untouched. With ``embeddings: true`` (the default) it
also writes ``image_embedding`` (float16) for dedup, the NSFW and aesthetic heads and the retrieval index
to reuse, and with ``text_embeddings: true`` ``text_embedding``. ``clip_model`` records which model scored
the row. A score is data: this stage never drops a row; the ``filter`` stage does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.base import MemoryNeed, StrictModel
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.image_batches import iter_batches, rows_to_score, scatter
from curate.models.device import Device, Precision
from curate.models.weights import WeightsSpec

EMBEDDING = pa.list_(pa.float16())


class ClipScoreConfig(StrictModel):
    model: str = Field("ViT-L-14", description="open_clip architecture, or local-dir:<folder>")
    pretrained: str = Field(
        "datacomp_xl_s13b_b90k",
        description="open_clip pretrained tag, a weights file, a checkpoint folder, or 'random' (speed tests)",
    )
    embeddings: bool = Field(True, description="write image_embedding (float16)")
    text_embeddings: bool = Field(False, description="write text_embedding (float16)")
    batch_size: int = Field(64, gt=0)
    device: Device = "auto"
    precision: Precision = Field("auto", description="auto: bf16 (fp16) on a GPU, fp32 on a CPU")
    decode_threads: int | None = Field(None, gt=0, description="CPU threads decoding images (default: cores)")
    torch_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")


class ClipScore(Stage):
    name = "clip_score"
    Config = ClipScoreConfig
    columns = (
        Column("clip_score", pa.float32(), "clip_score", "cosine of the CLIP image and caption embeddings"),
        Column(
            "clip_model",
            pa.string(),
            "clip_score",
            "the CLIP model that scored the row: architecture/weights",
        ),
        Column(
            "image_embedding", EMBEDDING, "clip_score", "L2-normalised CLIP image embedding", in_json=False
        ),
        Column(
            "text_embedding", EMBEDDING, "clip_score", "L2-normalised CLIP caption embedding", in_json=False
        ),
    )
    reads = ("image", "caption", "status", "drop_reason")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.25)

    config: ClipScoreConfig

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        from curate.models.clip import clip_memory

        c = self.config
        return clip_memory(c.model, c.pretrained, device, c.batch_size, c.precision)

    @property
    def writes(self) -> tuple[str, ...]:
        cols = ["clip_score", "clip_model"]
        cols += ["image_embedding"] if self.config.embeddings else []
        cols += ["text_embedding"] if self.config.text_embeddings else []
        return tuple(cols)

    def weights(self) -> list[WeightsSpec]:
        from curate.models.clip import clip_weights

        return clip_weights(self.config.model, self.config.pretrained)

    def setup(self) -> None:
        from curate.models.clip import ClipModel

        c = self.config
        self.clip = ClipModel.load(c.model, c.pretrained, c.device, c.precision, c.torch_threads)
        self.label = self.clip.name

    def __call__(self, table: pa.Table) -> pa.Table:
        c, n = self.config, table.num_rows
        rows = rows_to_score(table)
        captions = table["caption"].to_pylist()
        scored, scores, img_emb, txt_emb = [], [], [], []
        threads = c.decode_threads or os.cpu_count() or 1
        for batch_rows, tensors in iter_batches(table, rows, self.clip.preprocess, c.batch_size, threads):
            ok = [(r, t) for r, t in zip(batch_rows, tensors, strict=True) if t is not None]
            if not ok:
                continue
            image = self.clip.encode_images([t for _, t in ok])
            text = self.clip.encode_texts([captions[r] or "" for r, _ in ok])
            scored += [r for r, _ in ok]
            scores.append(np.sum(image * text, axis=1))
            img_emb.append(image)
            txt_emb.append(text)
        score_values = np.concatenate(scores).tolist() if scores else []
        table = set_column(table, "clip_score", scatter(n, scored, score_values))
        table = set_column(table, "clip_model", scatter(n, scored, [self.label] * len(scored)))
        if c.embeddings:
            table = set_column(table, "image_embedding", _embedding_column(n, scored, img_emb))
        if c.text_embeddings:
            table = set_column(table, "text_embedding", _embedding_column(n, scored, txt_emb))
        return table


def _embedding_column(n: int, rows: list[int], parts: list[np.ndarray]) -> pa.Array:
    """A list<float16> column with the embeddings at ``rows`` and null elsewhere, built without Python floats."""
    if not rows:
        return pa.nulls(n, EMBEDDING)
    emb = np.concatenate(parts).astype(np.float16)
    dim = emb.shape[1]
    full = np.zeros((n, dim), np.float16)
    full[rows] = emb
    valid = np.zeros(n, bool)
    valid[rows] = True
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    values = pa.array(full.reshape(-1), pa.float16())
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~valid))
