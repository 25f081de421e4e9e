"""Perceptual duplicates: rows whose 64-bit perceptual hashes (pHash) are within a Hamming distance."""

from __future__ import annotations

import numpy as np

from curate.kit.duplicates.pairs import KIND_PERCEPTUAL, Pairs
from curate.kit.hashing import chunk_bounds, chunk_values, hamming

__all__ = ["perceptual_pairs"]


def perceptual_pairs(hashes: np.ndarray, rows: np.ndarray, max_distance: int) -> Pairs:
    """Pairs of ``rows`` whose 64-bit hashes differ in at most ``max_distance`` bits. A row may own several
    hashes (its mirror hash too): a pair is reported once, at its smallest distance.

    Exact, by the pigeonhole principle (multi-index hashing): cut the 64 bits into ``max_distance + 1``
    chunks; two hashes within the distance agree on at least one whole chunk. So only rows that share a
    chunk value are compared. The work grows with the size of the buckets, which is small for varied
    images and large for many near-identical ones (which are then duplicates anyway).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        return Pairs.empty()
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    found_d: list[np.ndarray] = []
    for lo, hi in chunk_bounds(max_distance):
        key = chunk_values(hashes, lo, hi)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        cuts = np.flatnonzero(np.diff(sk)) + 1
        for group in np.split(order, cuts):
            if len(group) < 2:
                continue
            i, j = np.triu_indices(len(group), 1)
            d = hamming(hashes[group[i]], hashes[group[j]])
            close = d <= max_distance
            close &= rows[group[i]] != rows[group[j]]  # a row's hash and its own mirror hash
            if close.any():
                a, b = rows[group[i][close]], rows[group[j][close]]
                found_a.append(np.minimum(a, b))
                found_b.append(np.maximum(a, b))
                found_d.append(d[close])
    if not found_a:
        return Pairs.empty()
    d = np.concatenate(found_d)
    pairs = Pairs(
        np.concatenate(found_a),
        np.concatenate(found_b),
        np.full(len(d), KIND_PERCEPTUAL, np.int8),
        (1 - d / 64).astype(np.float32),
    )
    return pairs.unique()
