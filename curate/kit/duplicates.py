"""Duplicate finding: exact (sha256), perceptual (pHash Hamming distance) and semantic (FAISS on CLIP
embeddings), and the one rule that turns their pairs into decisions.

Everything here works on row numbers ``0..n-1`` of the rows a dedup considers, with a ``rank`` per row from
the keep rule (0 = the row to keep first). Finders return candidate pairs; :func:`resolve` walks the rows
in rank order and drops a row when a better-ranked row it pairs with is still kept, so that every dropped
row points to a row that is kept, and the same pairs give the same decisions on every run.

Memory, per million vectors of dimension 512 (measured in ``benchmarks/dedup_scale.py``): the float16
vectors stay in a memory-mapped file (1 GB on disk, paged in as needed); k-means trains on at most
``max_points_per_centroid`` points per centroid (64 x 1000 x 2 KB = 128 MB for 1000 clusters); the cluster
assignment is 8 bytes a row; a cluster's similarity matrix is ``cluster_size**2 * 4`` bytes, cut into
blocks of ``block`` rows so a big cluster never needs more than ``block * cluster_size * 4``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from curate.kit.hashing import chunk_bounds, chunk_values, hamming

__all__ = [
    "KIND_PERCEPTUAL",
    "KIND_SEMANTIC",
    "Pairs",
    "exact_groups",
    "keep_rank",
    "perceptual_pairs",
    "resolve",
    "semantic_pairs",
]

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


# --- ranks and exact groups ----------------------------------------------------------------------------


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


# --- perceptual ---------------------------------------------------------------------------------------


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


# --- semantic -----------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - dev installs faiss-cpu
        raise ImportError("semantic dedup needs FAISS: pip install 'curate[dedup]' (or faiss-gpu)") from e
    return faiss


def use_gpu(device: str) -> bool:
    """Whether FAISS should run on a GPU: ``auto`` when faiss-gpu sees one, ``cuda`` always, ``cpu`` never."""
    if device == "cpu":
        return False
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise RuntimeError("dedup device 'cuda' needs faiss-gpu and a visible GPU; faiss sees none")
    return gpus > 0


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a deterministic sample (all rows when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def semantic_pairs(
    vectors: np.ndarray,
    rows: np.ndarray,
    threshold: float,
    *,
    method: str = "semdedup",
    clusters: int | None = None,
    niter: int = 20,
    max_points_per_centroid: int = 64,
    nprobe: int = 8,
    spill: int = 2,
    seed: int = 0,
    batch: int = 65536,
    block: int = 4096,
    gpu: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Pairs:
    """Pairs of ``rows`` whose (L2-normalised) vectors have cosine >= ``threshold``.

    ``vectors`` is ``(len(rows), d)``, any float dtype, and may be a ``np.memmap``: it is read in batches.

    - ``semdedup`` (Abbas et al., 2023): spherical k-means (``faiss.Kmeans``) on a sample, every vector
      assigned to its nearest centroid in batches, then within each cluster every pair is compared exactly.
      With ``spill=1`` this is SemDeDup as published, and pairs split across two clusters are missed;
      ``spill=2`` (the default) also compares each vector within its second-nearest cluster, for about
      twice the work.
    - ``range``: an IVF index (float16 vectors) range-searched with ``nprobe`` lists per query: slower,
      finds pairs across cluster borders. Candidates are re-scored exactly from ``vectors``.
    """
    faiss = _faiss()
    n = len(rows)
    rows = np.asarray(rows, dtype=np.int64)
    if n < 2:
        return Pairs.empty()
    d = vectors.shape[1]
    # Up to a few thousand vectors, comparing every pair is quicker than clustering them, and exact.
    k = clusters or (1 if n <= 4096 else round(np.sqrt(n)))
    k = min(k, n)
    train_rows = _sample(n, k * max_points_per_centroid, seed)
    train = _as_float32(vectors[train_rows])
    if threads:
        faiss.omp_set_num_threads(threads)
    report = progress or (lambda what, done, total: None)

    if method == "semdedup" and k == 1:
        found = _within(vectors, np.arange(n), np.zeros(0, np.int64), threshold, block)
    elif method == "semdedup":
        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed,
            spherical=True,
            gpu=gpu,
            max_points_per_centroid=max_points_per_centroid,
            verbose=False,
        )
        km.train(train)
        centroids = faiss.IndexFlatIP(d)
        centroids.add(km.centroids)
        spill = min(max(1, spill), k)
        assign = np.empty((n, spill), np.int64)
        for start in range(0, n, batch):
            x = _as_float32(vectors[start : start + batch])
            _, nearest = centroids.search(x, spill)
            assign[start : start + len(x)] = nearest
            report("assign", min(start + batch, n), n)
        # Each vector is a member of its nearest cluster, and a guest of the next ``spill - 1``: pairs are
        # compared between a cluster's members and its members and guests, so a pair split by a border
        # is still found when one of the two spills over it.
        rows_of = np.repeat(np.arange(n), spill)
        cluster_of = assign.reshape(-1)
        guest = np.tile(np.arange(spill) > 0, n)
        order = np.lexsort((rows_of, cluster_of))
        cuts = np.flatnonzero(np.diff(cluster_of[order])) + 1
        groups = [
            (rows_of[g][~guest[g]], rows_of[g][guest[g]])
            for g in np.split(order, cuts)
            if len(g) > 1 and (~guest[g]).any()
        ]
        done = [0]

        def one(group: tuple[np.ndarray, np.ndarray]) -> Pairs:
            out = _within(vectors, group[0], group[1], threshold, block)
            done[0] += 1
            report("clusters", done[0], len(groups))
            return out

        workers = threads or os.cpu_count() or 1
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, groups))
        found = Pairs.concat(parts)
    elif method == "range":
        nlist = k
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = seed
        index.cp.niter = niter
        index.cp.max_points_per_centroid = max_points_per_centroid
        index.train(train)
        for start in range(0, n, batch):
            index.add(_as_float32(vectors[start : start + batch]))
        index.nprobe = min(nprobe, nlist)
        margin = (
            2e-3  # float16 storage moves a cosine by up to ~1e-3: search a little wider, re-score exactly
        )
        parts = []
        for start in range(0, n, batch):
            x = _as_float32(vectors[start : start + batch])
            lims, _, ids = index.range_search(x, threshold - margin)
            q = np.repeat(np.arange(start, start + len(x)), np.diff(lims).astype(np.int64))
            keep = ids > q
            q, ids = q[keep], ids[keep].astype(np.int64)
            if len(q):
                sims = np.einsum("ij,ij->i", _as_float32(vectors[q]), _as_float32(vectors[ids]))
                close = sims >= threshold
                parts.append(
                    Pairs(q[close], ids[close], np.full(close.sum(), KIND_SEMANTIC, np.int8), sims[close])
                )
            report("search", min(start + batch, n), n)
        found = Pairs.concat(parts)
    else:
        raise ValueError(f"unknown semantic dedup method {method!r}: use 'semdedup' or 'range'")
    # Local positions -> the caller's row numbers, smaller first.
    a, b = rows[found.a], rows[found.b]
    return Pairs(np.minimum(a, b), np.maximum(a, b), found.kind, found.similarity.astype(np.float32)).unique()


def _within(
    vectors: np.ndarray, members: np.ndarray, guests: np.ndarray, threshold: float, block: int
) -> Pairs:
    """Every pair of one cluster (positions into ``vectors``) with cosine >= threshold: members with
    members, members with guests."""
    members = np.sort(members)
    everyone = np.concatenate([members, np.sort(guests)])
    x = _as_float32(vectors[everyone])
    m = len(members)
    parts = []
    for start in range(0, m, block):
        sims = x[start : min(start + block, m)] @ x.T
        i, j = np.nonzero(sims >= threshold)
        i = i + start
        keep = (j > i) | (j >= m)  # member pairs once; member-guest pairs all
        i, j = i[keep], j[keep]
        if len(i):
            parts.append(
                Pairs(
                    everyone[i],
                    everyone[j],
                    np.full(len(i), KIND_SEMANTIC, np.int8),
                    sims[i - start, j].astype(np.float32),
                )
            )
    return Pairs.concat(parts)


# --- decisions ----------------------------------------------------------------------------------------


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
