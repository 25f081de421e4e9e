"""The invisible watermark that Stable Diffusion's reference code embeds in what it generates. Knows nothing
of shards.

SD 1.x/2.x (CompVis and Stability scripts) embed the bytes ``b"StableDiffusionV1"`` (136 bits) and SDXL
(Stability's and diffusers' pipelines) a fixed 48-bit pattern, both with invisible-watermark's ``dwtDct``
method: the U (chroma) plane goes through a one-level Haar DWT, the approximation band is cut into 4x4
blocks, and block ``k`` carries bit ``k mod n`` in the remainder of its largest AC coefficient modulo 36.

A score is the fraction of decoded bits that agree with a known mark, the best over the marks: about 0.5 on
an unmarked image (chance), near 1.0 on a marked one. The mark is positional and lives in the chroma planes,
so it survives lossless storage and JPEG without chroma subsampling, is weakened by 4:2:0 JPEG (Pillow's
default) and is erased by resizing or cropping; an image of fewer than 256x256 pixels cannot carry it (the
encoder refuses such images) and gets no score.

The decoding is invisible-watermark's ``EmbedMaxDct.decode`` in array form: the per-block bits do not depend
on the mark's length, so one pass over the blocks serves every mark (``decode_bits`` gives the bits
``WatermarkDecoder("bits", n).decode(bgr, "dwtDct")`` gives; the tests hold the two equal).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MARKS", "MIN_PIXELS", "AiWatermarkDetector", "block_bits", "decode_bits"]

# diffusers' StableDiffusionXLWatermarker: WATERMARK_MESSAGE and its bits, most significant first.
_SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110

MARKS: dict[str, np.ndarray] = {
    "stable_diffusion_v1": np.unpackbits(np.frombuffer(b"StableDiffusionV1", np.uint8)).astype(bool),
    "sdxl": np.array([int(b) for b in bin(_SDXL_MESSAGE)[2:]], bool),
}
MIN_PIXELS = 256 * 256  # invisible-watermark refuses to encode (and decode) smaller images

# EmbedMaxDct's defaults, as every SD release calls it. Its loops visit channels 0 and 1 only, so Y (scale 0)
# is left alone and U alone carries the mark; V's scale is never read.
_SCALES = (0, 36, 36)
_BLOCK = 4
_HAAR = 0.7071067811865476  # pywt.Wavelet("haar").dec_lo, both taps


def block_bits(bgr: np.ndarray) -> list[np.ndarray]:
    """The bit each 4x4 block of each marked channel reads as, blocks in row-major order: one boolean
    array per channel (only U, as the library reads it). ``bgr`` is an [h, w, 3] uint8 array in OpenCV's
    channel order."""
    import cv2

    rows, cols = bgr.shape[:2]
    yuv = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV)
    out = []
    for channel in range(2):  # as EmbedMaxDct: the third scale (V) is never used
        scale = _SCALES[channel]
        if scale <= 0:
            continue
        approx = _haar_approx(yuv[: rows // 4 * 4, : cols // 4 * 4, channel])
        r, c = approx.shape[0] // _BLOCK, approx.shape[1] // _BLOCK
        blocks = approx[: r * _BLOCK, : c * _BLOCK].reshape(r, _BLOCK, c, _BLOCK).transpose(0, 2, 1, 3)
        blocks = np.abs(blocks.reshape(r * c, _BLOCK * _BLOCK))
        largest_ac = blocks[np.arange(r * c), np.argmax(blocks[:, 1:], axis=1) + 1]
        out.append((largest_ac % scale) > 0.5 * scale)
    return out


def _haar_approx(plane: np.ndarray) -> np.ndarray:
    """The approximation band of ``pywt.dwt2(plane, "haar")`` for even sides, with the same float64
    operations in the same order, so bit for bit the same values (the tests check), at a tenth of the time."""
    x = plane.astype(np.float64)
    rows = x[0::2] * _HAAR + x[1::2] * _HAAR
    return rows[:, 0::2] * _HAAR + rows[:, 1::2] * _HAAR


def decode_bits(bgr: np.ndarray, n_bits: int, blocks: list[np.ndarray] | None = None) -> np.ndarray:
    """The ``n_bits`` bits a dwtDct mark of that length decodes to: a majority vote over the blocks that
    carry each bit. ``blocks`` reuses :func:`block_bits` of the same image."""
    blocks = block_bits(bgr) if blocks is None else blocks
    votes = np.zeros(n_bits)
    counts = np.zeros(n_bits)
    for bits in blocks:
        slot = np.arange(len(bits)) % n_bits
        votes += np.bincount(slot, weights=bits, minlength=n_bits)
        counts += np.bincount(slot, minlength=n_bits)
    with np.errstate(invalid="ignore"):
        return votes / counts * 255 > 127  # the library's rounding of the mean vote


class AiWatermarkDetector:
    """Scores RGB images for the Stable Diffusion marks in ``MARKS``.

    Both channel orders are tried: the reference code hands the encoder BGR arrays, but code that handed it
    RGB (some SDXL ports did) leaves the mark in the other order.
    """

    def __init__(self, marks: dict[str, np.ndarray] | None = None):
        self.marks = dict(MARKS if marks is None else marks)

    def agreement(self, rgb: np.ndarray) -> dict[str, float] | None:
        """For each mark, the best fraction of its bits decoded from ``rgb`` (either channel order); None
        for an image too small to carry a mark."""
        h, w = rgb.shape[:2]
        if h * w < MIN_PIXELS:
            return None
        best = dict.fromkeys(self.marks, 0.0)
        for order in (rgb[:, :, ::-1], rgb):  # BGR as the reference code embeds, then RGB
            blocks = block_bits(order)
            for name, mark in self.marks.items():
                agree = float(np.mean(decode_bits(order, len(mark), blocks) == mark))
                best[name] = max(best[name], agree)
        return best

    def score(self, rgb: np.ndarray) -> float | None:
        """The best agreement over the marks, in [0, 1]; None for an image too small to carry a mark."""
        agreement = self.agreement(rgb)
        return None if agreement is None else max(agreement.values())
