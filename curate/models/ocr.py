"""Text overlay: the fraction of an image's area that RapidOCR's text detector covers. Knows nothing of shards.

Only the detector runs (PP-OCRv4 det, an ONNX model shipped inside the ``rapidocr-onnxruntime`` wheel): no
angle classifier, no recognition, so an image costs one small segmentation pass. The detector returns one
quadrilateral per text line, in pixels of the image it was given; their union is rasterised into a mask, so
overlapping boxes count once.

On large flat shapes (a plain disc, a square) the detector reports squat, nearly square boxes, while a text
line of more than a few letters is long: boxes whose long side is under ``min_aspect`` times their short
side are left out (``min_aspect=1`` keeps every box). The cost is a word of three letters or fewer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TextAreaModel", "aspect", "text_area"]

# Below this many pixels on the short side the detector sees nothing that reads as text.
_MIN_SIDE = 32


@dataclass
class TextAreaModel:
    detector: Any  # rapidocr_onnxruntime.ch_ppocr_det.TextDetector
    min_aspect: float = 1.5

    @classmethod
    def load(cls, threads: int | None = 1, max_side: int = 960, min_aspect: float = 1.5) -> TextAreaModel:
        """The detector with ``threads`` onnxruntime intra-op threads (None: onnxruntime's default, one per
        core). An image is detected at its own size, shrunk only where its long side passes ``max_side``:
        enlarging small web images makes flat shapes look like text."""
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import read_yaml
        from rapidocr_onnxruntime.utils.parse_parameters import update_model_path

        det = update_model_path(read_yaml(DEFAULT_CFG_PATH))["Det"]
        det.update(
            intra_op_num_threads=threads or -1,
            inter_op_num_threads=1,
            use_cuda=False,
            use_dml=False,
            limit_type="max",
            limit_side_len=max_side,
        )
        detector = TextDetector(det)
        # rapidocr gives its loggers a DEBUG stream handler of their own; keep only real problems.
        for name in ("OrtInferSession", "RapidOCR"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return cls(detector, min_aspect)

    def boxes(self, rgb: np.ndarray) -> np.ndarray:
        """Text-line quadrilaterals of an RGB uint8 image, squat ones left out: [n, 4, 2] (x, y) pixel
        corners, clockwise from the top left."""
        boxes, _ = self.detector(np.ascontiguousarray(rgb[:, :, ::-1]))  # the detector takes BGR, as cv2
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4, 2)
        return boxes[aspect(boxes) >= self.min_aspect]

    def text_area(self, rgb: np.ndarray) -> float:
        """The fraction of the image covered by detected text, in [0, 1]."""
        h, w = rgb.shape[:2]
        if min(h, w) < _MIN_SIDE:
            rgb = _pad(rgb, _MIN_SIDE)
        return text_area(self.boxes(rgb), w, h)


def text_area(boxes: np.ndarray, width: int, height: int) -> float:
    """The union of ``boxes`` ([n, 4, 2] pixel corners) as a fraction of a ``width`` x ``height`` image."""
    if len(boxes) == 0 or width <= 0 or height <= 0:
        return 0.0
    mask = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for quad in boxes:
        draw.polygon([(float(x), float(y)) for x, y in quad], fill=1)
    return float(np.count_nonzero(np.asarray(mask))) / (width * height)


def aspect(boxes: np.ndarray) -> np.ndarray:
    """Long side over short side of each quadrilateral ([n, 4, 2], corners in order)."""
    a = np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=-1)
    b = np.linalg.norm(boxes[:, 3] - boxes[:, 0], axis=-1)
    return np.maximum(a, b) / np.maximum(np.minimum(a, b), 1e-6)


def _pad(rgb: np.ndarray, side: int) -> np.ndarray:
    """A thin image padded (bottom, right) with its edge colour to at least ``side`` on each side: the
    network needs a few pixels of context; boxes stay in the original image's coordinates."""
    h, w = rgb.shape[:2]
    return np.pad(rgb, ((0, max(0, side - h)), (0, max(0, side - w)), (0, 0)), mode="edge")
