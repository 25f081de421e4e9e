"""From pairs to decisions: the keep order of the rows, and the one walk in that order that drops a row only
for a better-ranked row that is kept, so every dropped row points to a kept one and the same pairs give the
same decisions on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.kit.duplicates.pairs import Pairs

__all__ = ["Decisions", "keep_rank", "resolve"]


def keep_rank(keys: list[tuple[np.ndarray, bool]], uid: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each row's place in the keep order: by each key (values, descending?) in turn, nulls (NaN) last,
    then by uid, then by position (two input rows may share a uid). Returns ranks ``0..n-1``."""
    n = len(uid)
    sort_keys: list[np.ndarray] = [position, uid]
    for values, descending in reversed(keys):
        v = np.asarray(values, dtype=np.float64)
        missing = np.isnan(v)
        v = np.where(missing, 0.0, -v if descending else v)
        sort_keys += [v, missing]  # lexsort: the last key is the primary one
    order = np.lexsort(sort_keys)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank


@dataclass
class Decisions:
    """Per row: ``dup_of`` (row number of the kept row it duplicates, -1 when kept), ``kind`` (-1 when
    kept) and ``similarity``."""

    dup_of: np.ndarray
    kind: np.ndarray
    similarity: np.ndarray


def resolve(n: int, rank: np.ndarray, pairs: Pairs, candidates: np.ndarray | None = None) -> Decisions:
    """Walk the rows in rank order; drop a row when one of its pairs is a better-ranked row that is kept,
    pointing to the best such partner: the first kind (perceptual before semantic), then the highest
    similarity, then the best rank. A row never drops because of a row that is itself dropped, so every
    dropped row points to a kept one. ``candidates`` limits the rows that may be dropped (default: all)."""
    dup_of = np.full(n, -1, np.int64)
    kind = np.full(n, -1, np.int8)
    similarity = np.full(n, np.nan, np.float32)
    if not len(pairs):
        return Decisions(dup_of, kind, similarity)
    # Both directions, then by row: each row's partners in one slice.
    src = np.concatenate([pairs.a, pairs.b])
    dst = np.concatenate([pairs.b, pairs.a])
    k = np.concatenate([pairs.kind, pairs.kind])
    s = np.concatenate([pairs.similarity, pairs.similarity])
    better = rank[dst] < rank[src]
    src, dst, k, s = src[better], dst[better], k[better], s[better]
    # Within a row: preferred partner first.
    order = np.lexsort((rank[dst], -s, k, src))
    src, dst, k, s = src[order], dst[order], k[order], s[order]
    rows, starts = np.unique(src, return_index=True)
    ends = np.append(starts[1:], len(src))
    allowed = None if candidates is None else set(candidates.tolist())
    for r in np.argsort(rank[rows], kind="stable"):
        row = rows[r]
        if allowed is not None and row not in allowed:
            continue
        lo, hi = starts[r], ends[r]
        partners = dst[lo:hi]
        kept = dup_of[partners] == -1
        if kept.any():
            first = lo + int(np.argmax(kept))
            dup_of[row], kind[row], similarity[row] = dst[first], k[first], s[first]
    return Decisions(dup_of, kind, similarity)
