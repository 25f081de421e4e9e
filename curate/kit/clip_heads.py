"""Running a LAION head on CLIP image embeddings, as the ``nsfw`` (``laion_clip``) and ``aesthetic`` stages do.

Where the shard already holds an ``image_embedding`` from the head's own CLIP (``clip_model`` names it), the
head runs on it and no image is decoded; other rows are embedded by a CLIP loaded on first need. The label
matched is the one ``clip_score`` writes for the same weights, " (stand-in)" included where they are one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.base import MIB, MemoryNeed, StrictModel
from curate.core.stage import StageResources
from curate.kit.image_batches import decode_rgb, iter_batches, rows_to_score
from curate.models.device import Device, Precision
from curate.models.weights import WeightsSpec, resolve

log = logging.getLogger(__name__)


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
        from curate.models.clip import resolved_clip_label

        self.head = head
        self.config = c
        # What clip_score records for the same weights, so that its embeddings are reused, stand-ins too.
        self.label = resolved_clip_label(c.clip_model, c.clip_pretrained)
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
        except Exception:  # noqa: S112 - any image that fails to decode: try the next one
            continue
    return False


def reuses_embeddings(c: ClipHeadConfig, upstream: Sequence[Any]) -> bool:
    """Whether an earlier stage writes the image embeddings of this head's CLIP (``clip_score`` with
    ``embeddings: true`` and the same model), so the head never loads a CLIP of its own."""
    from curate.models.clip import clip_label

    mine = clip_label(c.clip_model, c.clip_pretrained)
    return any(
        getattr(s, "name", None) == "clip_score"
        and getattr(s.config, "embeddings", False)
        and clip_label(s.config.model, s.config.pretrained) == mine
        for s in upstream
    )


def head_resources(c: ClipHeadConfig, upstream: Sequence[Any]) -> StageResources:
    """A head on stored embeddings is cheap on CPUs; one that runs its own CLIP takes a GPU share."""
    return StageResources(
        cpus=1, uses_model=True, gpus_if_any=0.0 if reuses_embeddings(c, upstream) else 0.25
    )


def head_memory(c: ClipHeadConfig, device: str, upstream: Sequence[Any]) -> MemoryNeed:
    """The head (well under a million parameters), and the CLIP when no earlier stage writes its embeddings."""
    from curate.models.footprint import PROCESS_BASE

    head = MemoryNeed(PROCESS_BASE + 16 * MIB, 0, ("LAION head on stored CLIP embeddings: under 16 MiB",))
    if reuses_embeddings(c, upstream):
        return head
    from curate.models.clip import clip_memory

    return clip_memory(c.clip_model, c.clip_pretrained, device, c.batch_size, c.precision) + MemoryNeed(
        16 * MIB, 0, ("and the LAION head",)
    )
