"""Exact duplicates: rows with the same digest (sha256 of the image bytes), grouped under the best-ranked."""

from __future__ import annotations

import numpy as np

__all__ = ["exact_groups"]


def exact_groups(digests: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row, the best-ranked row with the same digest (itself when it is the best or alone).
    Rows whose digest is None get themselves."""
    n = len(digests)
    rep = np.arange(n)
    valid = np.array([d is not None for d in digests], bool)
    idx = np.flatnonzero(valid)
    if not len(idx):
        return rep
    _, inverse = np.unique(digests[idx].astype(str), return_inverse=True)
    order = np.lexsort((rank[idx], inverse))  # by group, best rank first
    groups, rows = inverse[order], idx[order]
    starts = np.ones(len(rows), bool)
    starts[1:] = groups[1:] != groups[:-1]
    best = rows[starts][np.cumsum(starts) - 1]
    rep[rows] = best
    return rep
