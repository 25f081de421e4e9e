"""Watermarks and text overlays: three detectors, each switched on or off, each writing its own score.

- ``laion`` -> ``watermark_score``: LAION's watermark detector (EfficientNet-B3), P(visible watermark). Its
  weights resolve as every model's do (``laion_weights``, else the model directory, else a download); when
  there are none, ``setup()`` raises :class:`~curate.models.weights.ModelNotFound`, never a silent no-op.
- ``text`` -> ``text_area``: the fraction of the image covered by text lines that RapidOCR's detector finds
  (weights inside the ``rapidocr-onnxruntime`` wheel). Squat boxes, shorter than ``text_min_aspect`` times
  their height, are left out: on flat shapes the detector reports such blobs, while a text line of a few
  letters is long.
- ``ai_watermark`` -> ``ai_watermark``: the invisible watermark Stable Diffusion's reference code embeds:
  the fraction of decoded bits that agree with a known mark (0.5 is chance, ~1.0 marked). Null for images
  under 256x256 pixels, which cannot carry the mark. It survives only on images stored without resizing
  and without chroma subsampling (see :mod:`curate.models.ai_watermark`).

Scores go to every kept row with an image that decodes; other rows get null. A score is data: this stage
never drops a row; the ``filter`` stage does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.base import MIB, ConfigError, MemoryNeed, StrictModel
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.image_batches import iter_batches, rows_to_score, scatter
from curate.models.device import Device, Precision
from curate.models.weights import WeightsSpec

# What each detector imports, to fail when the stage is built rather than on the first shard.
_NEEDS = {
    "laion": ("torch", "torchvision", "timm"),
    "text": ("rapidocr_onnxruntime", "onnxruntime", "cv2"),
    "ai_watermark": ("cv2",),
}


# RapidOCR's detector at a 960 px long side: its model and working set, host memory.
OCR_WORKING = 400 * MIB


class WatermarkConfig(StrictModel):
    laion: bool = Field(True, description="write watermark_score with LAION's watermark detector")
    text: bool = Field(True, description="write text_area with RapidOCR's text detector")
    ai_watermark: bool = Field(True, description="write ai_watermark: Stable Diffusion's invisible mark")
    laion_weights: str | None = Field(
        None, description="LAION detector weights (.pt/.pth/.safetensors); default: the model directory"
    )
    laion_arch: str = Field(
        "efficientnet_b3", description="timm backbone of the LAION detector (LAION's efficientnet_b3a)"
    )
    text_max_side: int = Field(
        960, ge=32, description="text detection runs at the image's size, shrunk to this long side"
    )
    text_min_aspect: float = Field(
        1.5, ge=1.0, description="count a text box only when its long side is this many times its short"
    )
    batch_size: int = Field(32, gt=0)
    device: Device = "auto"
    precision: Precision = Field("auto", description="auto: bf16 (fp16) on a GPU, fp32 on a CPU")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for decoding, text detection and torch "
        "(default: $OMP_NUM_THREADS, which Ray sets to the task's cpus, else the cores; torch's own when unset)",
    )


class Watermark(Stage):
    name = "watermark"
    Config = WatermarkConfig
    columns = (
        Column(
            "watermark_score", pa.float32(), "watermark", "P(visible watermark), LAION's watermark detector"
        ),
        Column(
            "text_area", pa.float32(), "watermark", "fraction of the image covered by detected text lines"
        ),
        Column(
            "ai_watermark",
            pa.float32(),
            "watermark",
            "agreement of the decoded invisible watermark with Stable Diffusion's marks (0.5 chance, 1 marked)",
        ),
    )
    reads = ("image", "status", "drop_reason")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.25)

    config: WatermarkConfig

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        # Only LAION's detector runs on a GPU; text detection and the invisible mark run on CPUs.
        return self.resources if self.config.laion else StageResources(cpus=1, uses_model=True)

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        from curate.models.footprint import PROCESS_BASE, image_model_need, timm_params

        c = self.config
        need = MemoryNeed(PROCESS_BASE)
        if c.laion:
            # LAION's head on the backbone's features: 1536-625-256-2.
            params = timm_params(c.laion_arch) + 1536 * 625 + 625 * 256 + 256 * 2
            need = image_model_need(
                params, device, c.batch_size, kind="cnn", precision=c.precision, name=c.laion_arch
            )
        if c.text:
            # RapidOCR's detector in onnxruntime, at up to text_max_side px (measured: benchmarks/flagship.py).
            need = need + MemoryNeed(
                int(OCR_WORKING * (c.text_max_side / 960) ** 2), 0, ("RapidOCR text detector",)
            )
        return need

    def __init__(self, config: WatermarkConfig | None = None):
        super().__init__(config)
        missing = [
            f"{module} (for {switch}: true)"
            for switch, modules in _NEEDS.items()
            if getattr(self.config, switch)
            for module in modules
            if importlib.util.find_spec(module) is None
        ]
        if missing:
            raise ConfigError(
                f"stage 'watermark' needs {', '.join(missing)}: pip install 'curate[score]', "
                "or switch the detector off"
            )

    @property
    def writes(self) -> tuple[str, ...]:
        c = self.config
        return tuple(
            col
            for on, col in (
                (c.laion, "watermark_score"),
                (c.text, "text_area"),
                (c.ai_watermark, "ai_watermark"),
            )
            if on
        )

    def weights(self) -> list[WeightsSpec]:
        from curate.models.watermark import LAION_WATERMARK

        return [LAION_WATERMARK] if self.config.laion and not self.config.laion_weights else []

    def setup(self) -> None:
        c = self.config
        threads = c.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        self._threads = threads
        self.laion_model = self.text_model = self.ai_model = None
        if c.laion:
            from curate.models.watermark import WatermarkModel

            # torch's thread count is process-wide: set only when asked, as clip_score does.
            self.laion_model = WatermarkModel.load(
                c.laion_weights, c.laion_arch, c.device, c.precision, c.threads
            )
        if c.text:
            from curate.models.ocr import TextAreaModel

            self.text_model = TextAreaModel.load(threads, c.text_max_side, c.text_min_aspect)
        if c.ai_watermark:
            from curate.models.ai_watermark import AiWatermarkDetector

            self.ai_model = AiWatermarkDetector()

    def _prepare(self, img):
        """A decoded RGB image -> (the LAION tensor or None, the RGB array or None), in a decode thread."""
        tensor = self.laion_model.preprocess(img) if self.laion_model is not None else None
        rgb = np.asarray(img) if self.text_model is not None or self.ai_model is not None else None
        return tensor, rgb

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        rows = rows_to_score(table)
        scored: list[int] = []
        laion: list[np.ndarray] = []
        text: list[float] = []
        ai: list[float | None] = []
        batches = iter_batches(table, rows, self._prepare, self.config.batch_size, self._threads)
        for batch_rows, items in batches:
            ok = [(r, item) for r, item in zip(batch_rows, items, strict=True) if item is not None]
            if not ok:
                continue
            scored += [r for r, _ in ok]
            if self.laion_model is not None:
                laion.append(self.laion_model.score([tensor for _, (tensor, _) in ok]))
            if self.text_model is not None:
                text += [self.text_model.text_area(rgb) for _, (_, rgb) in ok]
            if self.ai_model is not None:
                ai += [self.ai_model.score(rgb) for _, (_, rgb) in ok]
        if self.laion_model is not None:
            values = np.concatenate(laion).tolist() if laion else []
            table = set_column(table, "watermark_score", scatter(n, scored, values))
        if self.text_model is not None:
            table = set_column(table, "text_area", scatter(n, scored, text))
        if self.ai_model is not None:
            table = set_column(table, "ai_watermark", scatter(n, scored, ai))
        return table
