"""Semantic duplicates: rows whose CLIP embeddings have a cosine similarity above a threshold, found with
SemDeDup's clusters (k-means, then every pair within a cluster) or an IVF range search.

Two backends do the same SemDeDup, because the GPU nodes that embed a corpus often have torch but not
faiss-gpu (hard to install, often absent), and a corpus of ten million embeddings is minutes of matrix
products on a CPU and seconds on a GPU:

- ``faiss``: ``faiss.Kmeans`` (on a GPU with faiss-gpu), assignment with a CPU ``IndexFlatIP``, and each
  cluster's pairs by numpy matrix products in a thread pool. The ``range`` method runs here only.
- ``torch``: spherical k-means, the nearest-``spill`` assignment (matmul + topk) and each cluster's exact
  pairs (blocked matmuls) in torch on ``torch_device``: CUDA on a GPU node, the CPU in tests. Comparisons
  are fp32 with TF32 off, so for the same clustering it finds the same pairs as the ``faiss`` backend.

:func:`choose_backend` turns the dedup stage's ``device`` (auto, cpu, cuda) into one of them.

Memory, per million vectors of dimension 512 (measured in ``benchmarks/dedup_scale.py``): the float16
vectors stay in a memory-mapped file (1 GB on disk, paged in as needed); k-means trains on at most
``max_points_per_centroid`` points per centroid (64 x 1000 x 2 KB = 128 MB for 1000 clusters); the cluster
assignment is 8 bytes a row; a cluster's similarity matrix is ``cluster_size**2 * 4`` bytes, cut into
blocks of ``block`` rows so a big cluster never needs more than ``block * cluster_size * 4``. The torch
backend keeps the vectors on the GPU when they fit in ``device_budget`` (half the free GPU memory by
default; uploaded in batches), else it uploads each cluster's rows as it compares them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from curate.kit.duplicates.pairs import KIND_SEMANTIC, Pairs

if TYPE_CHECKING:
    import torch

__all__ = ["Backend", "SemanticBackend", "choose_backend", "semantic_pairs"]

Backend = Literal["faiss", "torch"]
Report = Callable[[str, int, int], None]
_MATRIX_ELEMENTS = 2**26  # a rows x clusters score matrix of the torch backend: 256 MB of fp32


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - dev installs faiss-cpu
        raise ImportError("semantic dedup needs FAISS: pip install 'curate[dedup]' (or faiss-gpu)") from e
    return faiss


def _faiss_gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class SemanticBackend:
    """Where semantic dedup runs: ``torch`` on ``device``, or ``faiss`` (its k-means on a GPU when
    ``device`` is cuda, through faiss-gpu)."""

    backend: Backend
    device: Literal["cpu", "cuda"]

    @property
    def faiss_gpu(self) -> bool:
        return self.backend == "faiss" and self.device == "cuda"

    @property
    def label(self) -> str:
        """What the dedup summary records: ``torch-cuda``, ``faiss-gpu`` or ``faiss-cpu``."""
        if self.backend == "torch":
            return f"torch-{self.device}"
        return "faiss-gpu" if self.faiss_gpu else "faiss-cpu"


def choose_backend(device: str, method: str = "semdedup") -> SemanticBackend:
    """The backend for the dedup stage's ``device``.

    - ``cpu``: FAISS on the CPU.
    - ``auto``: torch on CUDA when torch sees a GPU; else FAISS with its k-means on the GPU when faiss-gpu
      sees one; else FAISS on the CPU.
    - ``cuda``: the same order as ``auto``, but an error when neither torch nor faiss sees a GPU.

    ``range`` is a FAISS CPU index whatever the device: ``auto`` and ``cpu`` run it there, and ``cuda``
    with ``range`` is an error rather than a silent run on the CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"dedup device {device!r}: use auto, cpu or cuda")
    if method == "range":
        if device == "cuda":
            raise RuntimeError(
                "semantic method 'range' runs on the CPU (a FAISS IVF index): use device auto or cpu, or "
                "method semdedup to compare on the GPU"
            )
        return SemanticBackend("faiss", "cpu")
    if device == "cpu":
        return SemanticBackend("faiss", "cpu")
    if _torch_sees_cuda():
        return SemanticBackend("torch", "cuda")
    if _faiss_gpus() > 0:
        return SemanticBackend("faiss", "cuda")
    if device == "cuda":
        raise RuntimeError(
            "dedup device 'cuda' needs a GPU that torch (with CUDA) or faiss-gpu sees; neither sees one"
        )
    return SemanticBackend("faiss", "cpu")


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
    backend: Backend = "faiss",
    torch_device: str = "cuda",
    device_budget: int | None = None,
    progress: Report | None = None,
) -> Pairs:
    """Pairs of ``rows`` whose (L2-normalised) vectors have cosine >= ``threshold``.

    ``vectors`` is ``(len(rows), d)``, any float dtype, and may be a ``np.memmap``: it is read in batches.

    - ``semdedup`` (Abbas et al., 2023): spherical k-means on a sample, every vector assigned to its
      nearest centroid in batches, then within each cluster every pair is compared exactly. With
      ``spill=1`` this is SemDeDup as published, and pairs split across two clusters are missed;
      ``spill=2`` (the default) also compares each vector within its second-nearest cluster, for about
      twice the work.
    - ``range``: an IVF index (float16 vectors) range-searched with ``nprobe`` lists per query: slower,
      finds pairs across cluster borders. Candidates are re-scored exactly from ``vectors``. FAISS only.

    ``backend`` ``faiss`` trains ``faiss.Kmeans`` (on a GPU when ``gpu``, which needs faiss-gpu) and
    compares on the CPU in ``threads`` threads; ``torch`` does all of SemDeDup on ``torch_device``, keeping
    the vectors there when they take at most ``device_budget`` bytes (default: half the free GPU memory on
    CUDA, 0 on the CPU, where they are read from ``vectors`` as needed).
    """
    if method not in ("semdedup", "range"):
        raise ValueError(f"unknown semantic dedup method {method!r}: use 'semdedup' or 'range'")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"unknown semantic dedup backend {backend!r}: use 'faiss' or 'torch'")
    if backend == "torch" and method == "range":
        raise ValueError("semantic method 'range' runs on FAISS only: use backend 'faiss'")
    n = len(rows)
    rows = np.asarray(rows, dtype=np.int64)
    if n < 2:
        return Pairs.empty()
    # Up to a few thousand vectors, comparing every pair is quicker than clustering them, and exact.
    k = clusters or (1 if n <= 4096 else round(np.sqrt(n)))
    k = min(k, n)
    spill = min(max(1, spill), k)
    report = progress or (lambda what, done, total: None)
    plan = _Plan(threshold, k, niter, max_points_per_centroid, spill, seed, batch, block)
    if backend == "torch":
        found = _torch_semdedup(vectors, plan, torch_device, device_budget, report)
    elif method == "semdedup":
        found = _faiss_semdedup(vectors, plan, gpu, threads, report)
    else:
        found = _faiss_range(vectors, plan, nprobe, threads, report)
    # Local positions -> the caller's row numbers, smaller first.
    a, b = rows[found.a], rows[found.b]
    return Pairs(np.minimum(a, b), np.maximum(a, b), found.kind, found.similarity.astype(np.float32)).unique()


@dataclass(frozen=True)
class _Plan:
    """What every backend takes from ``semantic_pairs``' arguments."""

    threshold: float
    k: int
    niter: int
    max_points_per_centroid: int
    spill: int
    seed: int
    batch: int
    block: int

    def train_rows(self, n: int) -> np.ndarray:
        return _sample(n, self.k * self.max_points_per_centroid, self.seed)


def _cluster_groups(assign: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each cluster's (members, guests) from ``assign`` ``(n, spill)``, nearest cluster first.

    Each vector is a member of its nearest cluster, and a guest of the next ``spill - 1``: pairs are
    compared between a cluster's members and its members and guests, so a pair split by a border is still
    found when one of the two spills over it. Clusters without two rows or without a member are skipped.
    """
    n, spill = assign.shape
    rows_of = np.repeat(np.arange(n), spill)
    cluster_of = assign.reshape(-1)
    guest = np.tile(np.arange(spill) > 0, n)
    order = np.lexsort((rows_of, cluster_of))
    cuts = np.flatnonzero(np.diff(cluster_of[order])) + 1
    return [
        (rows_of[g][~guest[g]], rows_of[g][guest[g]])
        for g in np.split(order, cuts)
        if len(g) > 1 and (~guest[g]).any()
    ]


# --- the FAISS backend ----------------------------------------------------------------------------


def _faiss_semdedup(
    vectors: np.ndarray, plan: _Plan, gpu: bool, threads: int | None, report: Report
) -> Pairs:
    n = len(vectors)
    if plan.k == 1:
        return _within(vectors, np.arange(n), np.zeros(0, np.int64), plan.threshold, plan.block)
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    d = vectors.shape[1]
    km = faiss.Kmeans(
        d,
        plan.k,
        niter=plan.niter,
        seed=plan.seed,
        spherical=True,
        gpu=gpu,
        max_points_per_centroid=plan.max_points_per_centroid,
        verbose=False,
    )
    km.train(_as_float32(vectors[plan.train_rows(n)]))
    centroids = faiss.IndexFlatIP(d)
    centroids.add(km.centroids)
    assign = np.empty((n, plan.spill), np.int64)
    for start in range(0, n, plan.batch):
        x = _as_float32(vectors[start : start + plan.batch])
        _, nearest = centroids.search(x, plan.spill)
        assign[start : start + len(x)] = nearest
        report("assign", min(start + plan.batch, n), n)
    groups = _cluster_groups(assign)
    done = [0]

    def one(group: tuple[np.ndarray, np.ndarray]) -> Pairs:
        out = _within(vectors, group[0], group[1], plan.threshold, plan.block)
        done[0] += 1
        report("clusters", done[0], len(groups))
        return out

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        return Pairs.concat(list(pool.map(one, groups)))


def _faiss_range(vectors: np.ndarray, plan: _Plan, nprobe: int, threads: int | None, report: Report) -> Pairs:
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    n, d = vectors.shape
    nlist = plan.k
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = plan.seed
    index.cp.niter = plan.niter
    index.cp.max_points_per_centroid = plan.max_points_per_centroid
    index.train(_as_float32(vectors[plan.train_rows(n)]))
    for start in range(0, n, plan.batch):
        index.add(_as_float32(vectors[start : start + plan.batch]))
    index.nprobe = min(nprobe, nlist)
    margin = 2e-3  # float16 storage moves a cosine by up to ~1e-3: search a little wider, re-score exactly
    parts = []
    for start in range(0, n, plan.batch):
        x = _as_float32(vectors[start : start + plan.batch])
        lims, _, ids = index.range_search(x, plan.threshold - margin)
        q = np.repeat(np.arange(start, start + len(x)), np.diff(lims).astype(np.int64))
        keep = ids > q
        q, ids = q[keep], ids[keep].astype(np.int64)
        if len(q):
            sims = np.einsum("ij,ij->i", _as_float32(vectors[q]), _as_float32(vectors[ids]))
            close = sims >= plan.threshold
            parts.append(
                Pairs(q[close], ids[close], np.full(close.sum(), KIND_SEMANTIC, np.int8), sims[close])
            )
        report("search", min(start + plan.batch, n), n)
    return Pairs.concat(parts)


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


# --- the torch backend ----------------------------------------------------------------------------


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 matrix products without TF32 while the torch backend runs: its pairs must be the CPU's."""
    import torch

    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(was)


class _TorchVectors:
    """The vectors as the torch backend reads them, as fp32 on its device: all on the device when they fit
    in ``budget`` bytes (uploaded ``batch`` rows at a time, kept in their own float16 or float32), else
    read from the host array and uploaded per request."""

    def __init__(self, vectors: np.ndarray, device: torch.device, budget: int | None, batch: int):
        import torch

        self.host = vectors
        self.device = device
        self.dtype = np.float16 if vectors.dtype == np.float16 else np.float32
        if budget is None:
            budget = int(torch.cuda.mem_get_info(device)[0] // 2) if device.type == "cuda" else 0
        n, d = vectors.shape
        self.resident: torch.Tensor | None = None
        if n * d * np.dtype(self.dtype).itemsize <= budget:
            store = torch.empty((n, d), dtype=_torch_dtype(self.dtype), device=device)
            for start in range(0, n, batch):
                store[start : start + batch] = self._upload(vectors[start : start + batch])
            self.resident = store

    def __len__(self) -> int:
        return len(self.host)

    def _upload(self, part: np.ndarray) -> torch.Tensor:
        import torch

        host = np.ascontiguousarray(part, dtype=self.dtype)
        if not host.flags.writeable:  # a slice of a read-only memmap: torch wants memory it may write
            host = host.copy()
        return torch.from_numpy(host).to(self.device)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        part = self.resident[start:stop] if self.resident is not None else self._upload(self.host[start:stop])
        return part.float()

    def take(self, positions: np.ndarray) -> torch.Tensor:
        if self.resident is None:
            return self._upload(self.host[positions]).float()
        import torch

        return self.resident[torch.from_numpy(positions).to(self.device)].float()


def _torch_dtype(dtype: Any) -> torch.dtype:
    import torch

    return torch.float16 if dtype == np.float16 else torch.float32


def _torch_semdedup(
    vectors: np.ndarray, plan: _Plan, device: str, budget: int | None, report: Report
) -> Pairs:
    import torch

    dev = torch.device(device)
    n = len(vectors)
    with _exact_fp32(), torch.inference_mode():
        source = _TorchVectors(vectors, dev, budget, plan.batch)
        if plan.k == 1:
            return _within_torch(source, np.arange(n), np.zeros(0, np.int64), plan.threshold, plan.block)
        train = torch.from_numpy(_as_float32(vectors[plan.train_rows(n)])).to(dev)
        centroids = _kmeans_torch(train, plan.k, plan.niter, plan.seed)
        assign = _assign_torch(source, centroids, plan.spill, plan.batch, report)
        groups = _cluster_groups(assign)
        parts = []
        for done, (members, guests) in enumerate(groups, 1):
            parts.append(_within_torch(source, members, guests, plan.threshold, plan.block))
            report("clusters", done, len(groups))
    return Pairs.concat(parts)


def _step(k: int, batch: int) -> int:
    """Rows per score matrix of ``k`` columns: at most ``batch``, and at most 256 MB of fp32."""
    return max(1, min(batch, _MATRIX_ELEMENTS // max(k, 1)))


def _kmeans_torch(x: torch.Tensor, k: int, niter: int, seed: int) -> torch.Tensor:
    """Spherical k-means of the rows of ``x``: ``k`` unit centroids after ``niter`` rounds.

    As ``faiss.Kmeans(spherical=True)``: the start is ``k`` training points drawn with ``seed`` (numpy's
    generator, so every device draws the same), each round assigns by the largest inner product and sets
    each centroid to its points' normalised mean. A cluster left empty restarts at the training point
    that is worst served (FAISS splits a big cluster instead). Sums go through a one-hot matrix product,
    which is deterministic on a GPU where ``index_add_`` is not.
    """
    import torch

    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    start = np.random.default_rng(seed).choice(len(x), size=k, replace=False)
    centroids = x[torch.from_numpy(start).to(x.device)].clone()
    step = _step(k, len(x))
    for _ in range(niter):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, device=x.device)
        best = torch.empty(len(x), device=x.device)
        for lo in range(0, len(x), step):
            part = x[lo : lo + step]
            score, nearest = (part @ centroids.T).max(dim=1)
            best[lo : lo + step] = score
            onehot = torch.zeros((len(part), k), device=x.device)
            onehot[torch.arange(len(part), device=x.device), nearest] = 1.0
            sums += onehot.T @ part
            counts += onehot.sum(dim=0)
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            worst = torch.topk(best, len(empty), largest=False).indices
            centroids[empty] = x[worst]
    return centroids


def _assign_torch(
    source: _TorchVectors, centroids: torch.Tensor, spill: int, batch: int, report: Report
) -> np.ndarray:
    """The ``spill`` nearest centroids of every vector, nearest first: ``(n, spill)`` int64."""
    n = len(source)
    assign = np.empty((n, spill), np.int64)
    step = _step(len(centroids), batch)
    for start in range(0, n, step):
        stop = min(start + step, n)
        nearest = (source.slice(start, stop) @ centroids.T).topk(spill, dim=1).indices
        assign[start:stop] = nearest.cpu().numpy()
        report("assign", stop, n)
    return assign


def _within_torch(
    source: _TorchVectors, members: np.ndarray, guests: np.ndarray, threshold: float, block: int
) -> Pairs:
    """:func:`_within` in torch: the same pairs, fp32, in blocks of ``block`` member rows. A block is
    compared only with the rows from its own first row on: the member pairs before it were found by the
    blocks above."""
    import torch

    members = np.sort(members)
    everyone = np.concatenate([members, np.sort(guests)])
    x = source.take(everyone)
    m = len(members)
    parts = []
    for start in range(0, m, block):
        stop = min(start + block, m)
        sims = x[start:stop] @ x[start:].T
        i = torch.arange(start, stop, device=x.device)[:, None]
        j = torch.arange(start, len(everyone), device=x.device)[None, :]
        keep = (sims >= threshold) & ((j > i) | (j >= m))  # member pairs once; member-guest pairs all
        bi, bj = torch.nonzero(keep, as_tuple=True)
        if len(bi):
            sim = sims[bi, bj].cpu().numpy()
            a, b = bi.cpu().numpy() + start, bj.cpu().numpy() + start
            parts.append(Pairs(everyone[a], everyone[b], np.full(len(a), KIND_SEMANTIC, np.int8), sim))
    return Pairs.concat(parts)
