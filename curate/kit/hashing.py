"""Perceptual hashes of images and the Hamming arithmetic on them.

``phash`` is imagehash's ``phash`` bit for bit (and pHash.org's DCT hash, simplified): the image converted to
grey by Pillow, shrunk to 32x32 with Lanczos, its 2-D DCT-II, the top-left 8x8 block of low frequencies, one
bit per coefficient: above the block's median or not; the hex string is imagehash's ``str()`` of it. So a
pHash list made with imagehash from the original files matches (the download stage hashes the original, not
the stored copy). Re-encoding, resizing and mild colour changes move few bits; a crop, a flip or another
picture moves many. Stored as 16 hex digits (``phash`` column), compared as ``uint64``.

``pdq_hash`` is Meta's PDQ (256 bits and a quality from 0 to 100) through the ``pdqhash`` package, which
compiles Meta's reference C++ (the ``pdq`` extra); its hex string is the reference's (word 15 first).
:class:`PdqIndex` matches PDQ hashes within a Hamming distance (31 is Meta's recommended threshold), and
:func:`pdq_dihedral` gives the eight rotations and flips PDQ defines.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from PIL import Image

__all__ = [
    "HashIndex",
    "PdqIndex",
    "chunk_bounds",
    "hamming",
    "hex_to_uint64",
    "pdq_dihedral",
    "pdq_hash",
    "phash",
    "phashes",
    "popcount64",
]

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
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)  # exactly as imagehash
    pixels = np.asarray(grey, dtype=np.float64)
    m = _dct_matrix(_SIDE)
    low = (m @ pixels @ m.T)[:_LOW, :_LOW]
    mirrored = low * np.where(np.arange(_LOW) % 2, -1.0, 1.0)[None, :]
    return _bits(low), _bits(mirrored)


def _bits(low: np.ndarray) -> str:
    bits = (low > np.median(low)).ravel()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def _pdqhash():
    try:
        import pdqhash
    except ImportError as e:
        raise ImportError("PDQ hashes need the pdqhash package: pip install 'curate[pdq]'") from e
    return pdqhash


def _pdq_hex(bits: np.ndarray) -> str:
    # pdqhash's vector runs from bit 255 down to bit 0: packed big-endian it is the reference's hex.
    return np.packbits(np.asarray(bits, np.uint8)).tobytes().hex()


def _pdq_pixels(img: Image.Image) -> np.ndarray:
    # As Meta's own Python signal does (threatexchange's pdq_from_bytes): the decoded file at full size, as
    # RGB, no EXIF rotation.
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), np.uint8))


def pdq_hash(img: Image.Image) -> tuple[str, int]:
    """Meta's PDQ hash of an image, as 64 hex digits, and its quality (0-100; below 50 the hash says little:
    flat or tiny images)."""
    bits, quality = _pdqhash().compute(_pdq_pixels(img))
    return _pdq_hex(bits), int(quality)


def pdq_dihedral(img: Image.Image) -> tuple[list[str], int]:
    """The PDQ hashes of the eight dihedral transforms of ``img`` from one DCT, in pdqhash's order (the
    original, rotated 90, 180, 270, flipped vertically, horizontally, rotated 90 and flipped each way), and
    the quality."""
    hashes, quality = _pdqhash().compute_dihedral(_pdq_pixels(img))
    return [_pdq_hex(h) for h in hashes], int(quality)


def pdq_words(values: list[str]) -> np.ndarray:
    """64-hex-digit PDQ hashes as an ``[n, 4]`` array of ``uint64``."""
    raw = b"".join(bytes.fromhex(v) for v in values)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 4)


class PdqIndex:
    """A fixed list of PDQ hashes, queried for the nearest within ``max_distance`` bits, exactly.

    Brute force over 256-bit words in blocks: a shard of 10,000 rows against a list of 100,000 hashes is a
    few seconds of CPU. The lists this is for (takedown and child-safety lists) are that size; a list of
    millions would want FAISS's binary indexes."""

    def __init__(self, hashes: list[str], max_distance: int = 31):
        self.words = pdq_words(hashes) if hashes else np.zeros((0, 4), np.uint64)
        self.max_distance = max_distance

    def __len__(self) -> int:
        return len(self.words)

    def nearest(self, queries: list[str], block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """For each query: the position of the closest listed hash within ``max_distance`` (-1 when none;
        ties go to the first) and its distance (-1 when none)."""
        q = pdq_words(queries) if queries else np.zeros((0, 4), np.uint64)
        best = np.full(len(q), -1, np.int64)
        dist = np.full(len(q), -1, np.int32)
        if not len(self.words) or not len(q):
            return best, dist
        step = max(1, block // max(len(self.words), 1))
        for start in range(0, len(q), step):
            qb = q[start : start + step]
            d = popcount64(qb[:, None, :] ^ self.words[None, :, :]).sum(axis=-1)
            pos = d.argmin(axis=1)
            near = d[np.arange(len(qb)), pos]
            hit = near <= self.max_distance
            best[start : start + len(qb)][hit] = pos[hit]
            dist[start : start + len(qb)][hit] = near[hit]
        return best, dist


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
