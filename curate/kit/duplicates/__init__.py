"""Duplicate finding: exact (sha256), perceptual (pHash Hamming distance) and semantic (FAISS, or torch
on a GPU, on CLIP embeddings), and the one rule that turns their pairs into decisions.

Everything here works on row numbers ``0..n-1`` of the rows a dedup considers, with a ``rank`` per row from
the keep rule (0 = the row to keep first). Finders return candidate pairs; :func:`resolve` walks the rows
in rank order and drops a row when a better-ranked row it pairs with is still kept, so that every dropped
row points to a row that is kept, and the same pairs give the same decisions on every run.

    pairs.py       Pairs: what every finder returns; the kinds
    exact.py       exact_groups: the same digest
    perceptual.py  perceptual_pairs: pHashes within a Hamming distance (multi-index hashing)
    semantic.py    semantic_pairs: CLIP embeddings above a cosine (FAISS, or torch on a GPU), choose_backend
    decisions.py   keep_rank and resolve: from pairs to Decisions
"""

from __future__ import annotations

from curate.kit.duplicates.decisions import Decisions, keep_rank, resolve
from curate.kit.duplicates.exact import exact_groups
from curate.kit.duplicates.pairs import KIND_NAMES, KIND_PERCEPTUAL, KIND_SEMANTIC, Pairs
from curate.kit.duplicates.perceptual import perceptual_pairs
from curate.kit.duplicates.semantic import SemanticBackend, choose_backend, semantic_pairs

__all__ = [
    "KIND_NAMES",
    "KIND_PERCEPTUAL",
    "KIND_SEMANTIC",
    "Decisions",
    "Pairs",
    "SemanticBackend",
    "choose_backend",
    "exact_groups",
    "keep_rank",
    "perceptual_pairs",
    "resolve",
    "semantic_pairs",
]
