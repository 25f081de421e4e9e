"""Perceptual hashes of images and the Hamming arithmetic on them.

``phash`` is the DCT hash of imagehash (and of pHash.org, simplified): the image in grey, shrunk to 32x32,
its 2-D DCT-II, the top-left 8x8 block of low frequencies, one bit per coefficient: above the block's median
or not. Re-encoding, resizing and mild colour changes move few bits; a crop, a flip or another picture moves
many. The hash is stored as 16 hex digits (``phash`` column) and compared as ``uint64``.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from PIL import Image

__all__ = ["HashIndex", "chunk_bounds", "hamming", "hex_to_uint64", "phash", "phashes", "popcount64"]

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


# --- multi-index hashing -----------------------------------------------------------------------------


def chunk_bounds(max_distance: int) -> list[tuple[int, int]]:
    """The bit ranges ``[lo, hi)`` of multi-index hashing for ``max_distance``: 64 bits cut into
    ``max_distance + 1`` chunks. By the pigeonhole principle two hashes within the distance agree on at least
    one whole chunk, so only hashes that share a chunk value need comparing."""
    bounds = np.linspace(0, 64, max_distance + 2).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def chunk_values(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits ``[lo, hi)`` of each ``uint64``."""
    return (np.asarray(hashes, np.uint64) >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)


class HashIndex:
    """A fixed set of 64-bit hashes (a blocklist, an evaluation set), queried for the nearest one within
    ``max_distance`` bits: multi-index hashing, one sorted table per chunk (:func:`chunk_bounds`), exact.

    Memory: the hashes and, per chunk, their sorted chunk values and order (24 bytes a hash a chunk). A query
    compares against the hashes that share one of its chunk values: few for varied hashes, many for a chunk
    value that many hashes share (flat images), so keep ``max_distance`` small (4 or less on millions)."""

    def __init__(self, hashes: np.ndarray, max_distance: int = 0):
        self.hashes = np.asarray(hashes, np.uint64)
        self.max_distance = max_distance
        self._tables = []
        for lo, hi in chunk_bounds(max_distance):
            key = chunk_values(self.hashes, lo, hi)
            order = np.argsort(key, kind="stable")
            self._tables.append((lo, hi, key[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def nearest(self, queries: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """For each query: the position of the closest hash within ``max_distance`` (-1 when none; ties go
        to the first position) and its distance (-1 when none)."""
        q = np.asarray(queries, np.uint64)
        best = np.full(len(q), -1, np.int64)
        dist = np.full(len(q), 65, np.int32)
        for start in range(0, len(q), batch):
            qb = q[start : start + batch]
            for lo, hi, keys, order in self._tables:
                qk = chunk_values(qb, lo, hi)
                left = np.searchsorted(keys, qk, "left")
                counts = np.searchsorted(keys, qk, "right") - left
                total = int(counts.sum())
                if not total:
                    continue
                qi = np.repeat(np.arange(len(qb)), counts)
                offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                cand = order[np.repeat(left, counts) + offsets]
                d = hamming(qb[qi], self.hashes[cand])
                close = d <= self.max_distance
                qi, cand, d = qi[close], cand[close], d[close]
                if not len(qi):
                    continue
                first = np.lexsort((cand, d, qi))  # per query: smallest distance, then position
                qi, cand, d = qi[first], cand[first], d[first]
                head = np.ones(len(qi), bool)
                head[1:] = qi[1:] != qi[:-1]
                qi, cand, d = qi[head], cand[head], d[head]
                rows = qi + start
                better = (d < dist[rows]) | ((d == dist[rows]) & (cand < best[rows]))
                best[rows[better]], dist[rows[better]] = cand[better], d[better]
        dist[best < 0] = -1
        return best, dist
