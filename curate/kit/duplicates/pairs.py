"""Candidate duplicate pairs, as every finder returns them: row numbers ``a < b``, a kind and a similarity.

The kinds' order is their precedence when a row pairs with a better-ranked row in both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KIND_NAMES", "KIND_PERCEPTUAL", "KIND_SEMANTIC", "Pairs"]

KIND_PERCEPTUAL, KIND_SEMANTIC = 0, 1  # the order is the precedence when a row pairs with both
KIND_NAMES = ("perceptual", "semantic")


@dataclass
class Pairs:
    """Candidate pairs ``(a[k], b[k])`` with ``a < b`` as row numbers, their kind and similarity
    (cosine for semantic pairs; ``1 - hamming / 64`` for perceptual ones)."""

    a: np.ndarray
    b: np.ndarray
    kind: np.ndarray
    similarity: np.ndarray

    @classmethod
    def empty(cls) -> Pairs:
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.float32)
        )

    @classmethod
    def concat(cls, parts: list[Pairs]) -> Pairs:
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("a", "b", "kind", "similarity"))
        )

    def __len__(self) -> int:
        return len(self.a)

    def unique(self) -> Pairs:
        """One entry per (a, b, kind), the highest similarity; sorted, so the order is deterministic."""
        if not len(self):
            return self
        order = np.lexsort((-self.similarity, self.kind, self.b, self.a))
        a, b, k, s = self.a[order], self.b[order], self.kind[order], self.similarity[order]
        first = np.ones(len(a), bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (k[1:] != k[:-1])
        return Pairs(a[first], b[first], k[first], s[first])
