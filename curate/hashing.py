"""Perceptual hashes of images and the Hamming arithmetic on them.

``phash`` is the DCT hash of imagehash (and of pHash.org, simplified): the image in grey, shrunk to 32x32,
its 2-D DCT-II, the top-left 8x8 block of low frequencies, one bit per coefficient: above the block's median
or not. Re-encoding, resizing and mild colour changes move few bits; a crop, a flip or another picture moves
many. The hash is stored as 16 hex digits (``phash`` column) and compared as ``uint64``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

__all__ = ["hamming", "hex_to_uint64", "phash", "phashes", "popcount64"]

_SIDE, _LOW = 32, 8


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """DCT-II as a matrix: ``M @ x`` is ``scipy.fftpack.dct(x)`` (type 2, unnormalised) for a column ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


def phash(img: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of ``img`` as 16 lower-case hex digits (bit 63 = coefficient (0,0))."""
    return phashes(img)[0]


def phashes(img: Image.Image) -> tuple[str, str]:
    """``phash`` of the image and of its mirror image, from one DCT.

    Mirroring left to right multiplies the DCT coefficient of horizontal frequency ``v`` by ``(-1)**v``, so
    the mirror's hash costs nothing more. Comparing one image's hash with another's mirror hash finds flipped
    copies, as Facebook's PDQ does with its dihedral hashes.
    """
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    pixels = np.asarray(grey, dtype=np.float64)
    m = _dct_matrix(_SIDE)
    low = (m @ pixels @ m.T)[:_LOW, :_LOW]
    mirrored = low * np.where(np.arange(_LOW) % 2, -1.0, 1.0)[None, :]
    return _bits(low), _bits(mirrored)


def _bits(low: np.ndarray) -> str:
    bits = (low > np.median(low)).ravel()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def hex_to_uint64(values: list[str | None] | np.ndarray) -> np.ndarray:
    """Hex hashes as ``uint64``; None is not allowed (filter nulls first)."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each ``uint64``."""
    x = np.asarray(x, dtype=np.uint64)
    flat = np.ascontiguousarray(x.reshape(-1))
    return _BYTE_POPCOUNT[flat.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int32)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance of two ``uint64`` arrays (broadcast)."""
    return popcount64(np.bitwise_xor(a, b))
