"""FAISS for the retrieval index: which factory fits a collection in a memory budget, making and training
one, searching it (with exact re-scoring for lossy codes), and tuning ``nprobe`` to a target recall.

Everything here works on vectors in memory (or memory-mapped) and knows nothing of runs or index folders.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from curate.base import RetrievalIndexError

__all__ = [
    "FLAT_MAX",
    "RERANK",
    "TARGET_RECALL",
    "add_in_batches",
    "auto_factory",
    "load_faiss",
    "new_index",
    "parse_size",
    "rerank_factor",
    "search",
    "tune",
]

TARGET_RECALL = 0.95
RERANK = 10
FLAT_MAX = 20_000  # below this many vectors exact search is about as fast as any index, and exact


def load_faiss() -> Any:
    """The ``faiss`` module, or an error that names the extra to install."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - dev installs faiss-cpu
        raise RetrievalIndexError(
            "the retrieval index needs FAISS: pip install 'curate[dedup]' (or faiss-gpu)"
        ) from e
    return faiss


def parse_size(text: str | int) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1e9"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise RetrievalIndexError(f"memory budget {text!r}: use a size such as 4GB or 512MB")
    unit = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    if m.group(3).startswith("i"):
        unit = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * unit)


# --- choosing and making a factory --------------------------------------------------------------------


def auto_factory(n: int, dim: int, memory_budget: int) -> str:
    """A FAISS factory string for ``n`` vectors of ``dim`` in ``memory_budget`` bytes, as autofaiss chooses:
    exact ``Flat`` for small collections; beyond, an inverted file with ~4 sqrt(n) lists (an HNSW coarse
    quantizer when there are many), storing vectors as float32, 8-bit scalars or product-quantized codes,
    whichever is the most precise that fits the budget."""
    if n <= FLAT_MAX and n * dim * 4 <= memory_budget:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(nlist, 2**16, n // 39))  # FAISS wants >= 39 training points per list
    coarse = f"IVF{nlist}_HNSW32" if nlist > 4096 else f"IVF{nlist}"
    overhead = n * 8 + nlist * dim * 4 * 2  # ids + centroids (and the HNSW graph, roughly)
    for code, per_vector in (("Flat", dim * 4), ("SQ8", dim)):
        if n * per_vector + overhead <= memory_budget:
            return f"{coarse},{code}"
    for m in (64, 48, 32, 16, 8):  # PQ sub-quantizers of 8 bits: m bytes a vector
        if dim % m == 0 and n * m + overhead <= memory_budget:
            return f"{coarse},PQ{m}"
    raise RetrievalIndexError(
        f"{n:,} vectors of dimension {dim} do not fit in a memory budget of {memory_budget:,} bytes even as "
        "8-byte codes: raise --memory"
    )


def new_index(vectors: np.ndarray, factory: str, seed: int = 0, say: Callable[[str], None] | None = None):
    """An empty inner-product FAISS index made by ``factory`` and trained on (a sample of) ``vectors``:
    at most 64 points per inverted list, as FAISS's k-means needs no more, or 100,000 for other codes."""
    faiss = load_faiss()
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrievalIndexError(
            f"FAISS cannot make factory {factory!r}: {str(e).strip().splitlines()[-1]}"
        ) from e
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        limit = max(64 * ivf.nlist, 10_000) if ivf is not None else 100_000
        train = vectors
        if len(train) > limit:
            train = train[np.sort(np.random.default_rng(seed).choice(len(train), limit, replace=False))]
        if say:
            say(f"training {factory} on {len(train):,} vectors")
        try:
            index.train(np.ascontiguousarray(train, np.float32))
        except RuntimeError as e:  # e.g. fewer vectors than lists: say which factory, and what to do
            raise RetrievalIndexError(
                f"FAISS cannot train {factory!r} on {len(train):,} vectors: "
                f"{str(e).strip().splitlines()[-1]}; use a smaller factory or --factory auto"
            ) from e
    return index


def add_in_batches(index: Any, vectors: np.ndarray, batch: int = 65536) -> None:
    """Add float16 (or any) vectors to ``index`` as float32, a batch at a time."""
    for start in range(0, len(vectors), batch):
        index.add(np.ascontiguousarray(vectors[start : start + batch], np.float32))


# --- searching ----------------------------------------------------------------------------------------


def _gather(parts: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (sorted global row numbers) of the parts, as float32."""
    out, offset = [], 0
    for part in parts:
        mine = rows[(rows >= offset) & (rows < offset + len(part))] - offset
        out.append(np.asarray(part[mine], np.float32))
        offset += len(part)
    return np.ascontiguousarray(np.concatenate(out))


def rerank_factor(factory: str) -> int:
    """Candidates per wanted result that are re-scored exactly from the stored float16 embeddings: none for
    an index that keeps float32 vectors (``Flat``, ``IVF...,Flat``), RERANK for lossy codes (SQ, PQ)."""
    return 0 if factory.split(",")[-1] == "Flat" else RERANK


def search(index, parts: list[np.ndarray], queries: np.ndarray, k: int, rerank: int = 0) -> tuple:
    """``(scores, ids)`` of the top ``k`` per query, best first; with ``rerank``, ``k * rerank`` candidates
    from the index are re-scored by the exact inner product with their stored embeddings."""
    k = max(1, min(int(k), index.ntotal))
    if not rerank:
        return index.search(queries, k)
    _, cand = index.search(queries, min(index.ntotal, k * rerank))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(cand):
        row = np.unique(row[row >= 0])  # sorted, as _gather wants
        exact = _gather(parts, row) @ queries[i]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[i, : len(top)], ids[i, : len(top)] = exact[top], row[top]
    return scores, ids


# --- measuring recall ---------------------------------------------------------------------------------


def _exact_topk(all_vectors: list[np.ndarray], queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top ``k`` by inner product, over the parts in order, a block at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for part in all_vectors:
        for start in range(0, len(part), 65536):
            block = np.asarray(part[start : start + 65536], np.float32)
            s = queries @ block.T
            i = np.broadcast_to(np.arange(offset + start, offset + start + len(block)), s.shape)
            s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        offset += len(part)
    return best_i


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, truth.size)


def tune(index, factory: str, parts: list[np.ndarray], sample: int, seed: int, k: int = 10) -> dict[str, Any]:
    """Measure recall@k against exact search with ``sample`` of the indexed vectors as queries (as autofaiss
    does); for an inverted file, raise nprobe from 1 until recall reaches TARGET_RECALL or stops improving,
    and keep the first nprobe that does. ``Flat`` is exact and not measured."""
    faiss = load_faiss()
    n = index.ntotal
    k = min(k, n)
    if factory == "Flat":
        return {"recall_at_10": 1.0, "queries": 0, "params": "", "exact": True}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    queries = _gather(parts, rows)
    truth = _exact_topk(parts, queries, k)
    ivf = faiss.try_extract_index_ivf(index)
    space = faiss.ParameterSpace()

    def measure(params: str) -> dict[str, Any]:
        if params:
            space.set_index_parameters(index, params)
        start = time.perf_counter()
        _, found = search(index, parts, queries, k, rerank_factor(factory))
        ms = (time.perf_counter() - start) * 1000 / len(queries)
        return {
            "recall_at_10": round(_recall(found, truth), 4),
            "queries": len(queries),
            "params": params,
            "ms_per_query": round(ms, 3),
            "exact": False,
            "target": TARGET_RECALL,
            "rerank": rerank_factor(factory),
        }

    if ivf is None:
        return measure("")
    best, nprobe = None, 1
    while True:
        params = f"nprobe={nprobe}"
        if "HNSW" in factory:
            params += f",quantizer_efSearch={max(64, 2 * nprobe)}"
        got = measure(params)
        if best is not None and got["recall_at_10"] < best["recall_at_10"] + 0.002:
            break  # no better with more lists: the codes limit it (PQ), keep the cheaper nprobe
        best = got
        if got["recall_at_10"] >= TARGET_RECALL or nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    space.set_index_parameters(index, best["params"])
    return best
