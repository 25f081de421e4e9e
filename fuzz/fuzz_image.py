# ruff: noqa: S101 - a fuzz harness states its invariants as asserts
"""Fuzz curate.kit.imaging.process: downloaded bytes to a stored image, over a few option combinations.

Invariant: process() never raises; the status is one of the taxonomy's image statuses; an ``ok`` result
carries non-empty image bytes that Pillow opens in the asked encoding, with the reported width and height,
sized as the resize mode says; every other status carries no image.

Input layout: byte 0 and byte 1 choose the options (see ``options``), the rest is the downloaded body.
Run: ``python fuzz/fuzz_image.py fuzz/corpus/image`` (``make fuzz`` does it with the right flags).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import warnings

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["PIL", "curate"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from PIL import Image

    from curate.kit.imaging import ImageOptions, Processed, process

    Image.init()  # every Pillow plugin, instrumented (Image.open would load them later, uninstrumented)

STATUSES = {
    "ok",
    "not_an_image",
    "unsupported_format",
    "decode_error",
    "too_many_pixels",
    "too_small",
    "bad_aspect_ratio",
}
MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODES = ("jpg", "png", "webp", "original")
RESAMPLES = ("area", "lanczos", "bicubic")
SIZES = (1, 7, 32, 64)
ALL_FORMATS = ("jpeg", "png", "webp", "gif", "bmp", "tiff")
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MAX_PIXELS = 4_000_000  # small: a fuzzed header must not make one input take seconds


def options(b0: int, b1: int) -> ImageOptions:
    """The options from two bytes. ``original`` goes with ``resize_mode: no`` only, as DownloadConfig says."""
    encode = ENCODES[(b0 // 5) % 4]
    return ImageOptions(
        image_size=SIZES[(b1 // 3) % 4],
        resize_mode="no" if encode == "original" else MODES[b0 % 5],
        resize_only_if_bigger=bool(b0 & 0x80),
        resample=RESAMPLES[b1 % 3],
        min_image_size=(0, 0, 4, 16)[(b1 >> 4) & 3],
        max_aspect_ratio=(None, None, 2.0, 1.0)[(b1 >> 6) & 3],
        max_pixels=MAX_PIXELS,
        formats=ALL_FORMATS if not b0 & 0x40 else ("jpeg", "png", "webp", "gif"),
        encode_format=encode,
        encode_quality=75,
    )


def check(data: bytes, opt: ImageOptions, p: Processed) -> None:
    """Raise AssertionError when ``p`` breaks the invariant."""
    assert isinstance(p, Processed), type(p)
    assert p.status in STATUSES, p.status
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    if p.status != "ok":
        assert p.image is None, p.status
        assert p.error, f"{p.status} without an error message"
        return
    assert isinstance(p.image, bytes) and p.image, "ok without image bytes"
    assert p.orig_width and p.orig_height and p.orig_width > 0 and p.orig_height > 0
    assert p.orig_width * p.orig_height <= opt.max_pixels
    assert p.phash and len(p.phash) == 16 and p.phash_mirror and len(p.phash_mirror) == 16
    if opt.encode_format == "original":
        assert p.image == data
        assert (p.width, p.height) == (p.orig_width, p.orig_height)
        return
    with Image.open(io.BytesIO(p.image)) as img:
        assert img.format == PIL_FORMAT[opt.encode_format], (img.format, opt.encode_format)
        assert img.size == (p.width, p.height), (img.size, p.width, p.height)
        img.load()
    w, h = p.width, p.height
    ew, eh = expected_size(p.orig_width, p.orig_height, opt)
    assert abs(w - ew) <= 1 and abs(h - eh) <= 1, ((w, h), (ew, eh), (p.orig_width, p.orig_height), opt)


def expected_size(ow: int, oh: int, opt: ImageOptions) -> tuple[float, float]:
    """The stored size the module docstring promises for an ``ow`` x ``oh`` image (up to rounding)."""
    s = opt.image_size
    if opt.resize_mode == "no":
        return ow, oh
    side = min(ow, oh) if opt.resize_mode in ("keep_ratio", "center_crop") else max(ow, oh)
    scale = s / side
    if opt.resize_only_if_bigger:
        scale = min(scale, 1.0)
    if opt.resize_mode == "center_crop":
        crop = s / scale
        return max(1, min(ow, crop) * scale), max(1, min(oh, crop) * scale)
    w, h = max(1, ow * scale), max(1, oh * scale)
    if opt.resize_mode == "border":
        return max(w, s), max(h, s)
    return w, h


def test_one_input(data: bytes) -> Processed | None:
    if len(data) < 2:
        return None
    opt = options(data[0], data[1])
    body = data[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings about odd files are not findings
        p = process(body, opt)
    check(body, opt, p)
    return p


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
