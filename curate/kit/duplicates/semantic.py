"""Semantic duplicates: rows whose CLIP embeddings have a cosine similarity above a threshold, found with
FAISS (SemDeDup's clusters, or an IVF range search).

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

import numpy as np

from curate.kit.duplicates.pairs import KIND_SEMANTIC, Pairs

__all__ = ["semantic_pairs", "use_gpu"]


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
