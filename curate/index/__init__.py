"""The retrieval index: FAISS over the kept samples' CLIP image embeddings, read from a run's sidecars (no
recompute), and the :class:`Retriever` that generation code queries.

An index folder holds::

    index.json                 what it is: factory, dimension, count, source runs, CLIP model, expected recall
    index.<generation>.faiss   the FAISS index (inner product on L2-normalised vectors = cosine)
    metadata/NNNNN.parquet     one part per build/append: id, uid, caption, url, source, shard, clip_score, ...
    embeddings/NNNNN.npy       the same rows' float16 embeddings, row-aligned with the metadata part

``index.json`` is written last and names the FAISS file and the parts it covers, so an append killed midway
leaves the index as it was. FAISS ids are row numbers ``0..count-1`` over the parts in order (the uid map).

Memory: a build holds its runs' float16 embeddings (1 GB per million at d=512; briefly twice, to train)
plus the FAISS index, which the auto factory fits in ``memory_budget``; an append holds the new run's. A
:class:`Retriever` holds the FAISS index and the metadata, and memory-maps the embeddings, which lossy codes
(SQ, PQ) read to re-score ``RERANK`` x k candidates exactly.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.base import RetrievalIndexError
from curate.core.storage import filesystem

__all__ = [
    "Neighbor",
    "Retriever",
    "add_to_index",
    "auto_factory",
    "build_index",
    "parse_size",
    "remove_from_index",
    "rerank_factor",
    "search",
]

FORMAT = 1
EXTRA_CAPTIONS = ("caption_vlm", "caption_fused")
TARGET_RECALL = 0.95
RERANK = 10
FLAT_MAX = 20_000  # below this many vectors exact search is about as fast as any index, and exact


def _faiss():
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


# --- choosing a factory -------------------------------------------------------------------------------


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


# --- reading runs -------------------------------------------------------------------------------------


@dataclass
class RunRows:
    """The kept rows of one run that carry an embedding."""

    source: dict[str, Any]  # path, name, fingerprint, model, pretrained
    meta: pa.Table
    vectors: np.ndarray  # [n, d] float16
    skipped: dict[str, int] = field(default_factory=dict)


def _clip_stage(info: dict[str, Any], path: str) -> dict[str, Any]:
    stages = [s for s in info.get("config", {}).get("stages", []) if s.get("stage") == "clip_score"]
    if not stages:
        raise RetrievalIndexError(
            f"{path}: the run has no clip_score stage, so no image embeddings to index: add clip_score "
            "(embeddings: true) to the pipeline"
        )
    if not stages[-1].get("embeddings", True):
        raise RetrievalIndexError(
            f"{path}: clip_score ran with embeddings: false; run it with embeddings: true"
        )
    return stages[-1]


def read_run(path: str, progress: Callable[[str], None] | None = None) -> RunRows:
    """The kept samples of a finished (or partly finished) run with their embeddings, from the sidecars."""
    fs, root = filesystem(path)
    if not fs.exists(f"{root}/run.json"):
        raise RetrievalIndexError(f"{path} holds no run.json: not a curate output folder")
    with fs.open(f"{root}/run.json", "rb") as f:
        info = json.load(f)
    stage = _clip_stage(info, path)
    # A shard counts once its stats file exists: it is written last, the completion marker.
    shards = sorted(
        p.rsplit("/", 1)[-1][: -len("_stats.json")] for p in fs.glob(f"{root}/shards/*_stats.json")
    )
    if not shards:
        raise RetrievalIndexError(f"{path}: no finished shards (shards/*_stats.json): nothing to index yet")
    absolute = str(Path(path).resolve()) if "://" not in path else path
    model = str(stage.get("model"))
    if model.startswith("local-dir:") and Path(model[len("local-dir:") :]).is_dir():
        # run.json keeps the path as written, often relative to where the run started: pin it down
        model = f"local-dir:{Path(model[len('local-dir:') :]).resolve()}"
    source = {
        "path": absolute,
        "name": info.get("name"),
        "fingerprint": info.get("fingerprint"),
        "model": model,
        "pretrained": stage.get("pretrained"),
    }
    metas, vectors = [], []
    skipped = {"dropped": 0, "no_embedding": 0}
    for shard in shards:
        with fs.open(f"{root}/shards/{shard}.parquet", "rb") as f:
            schema = pq.read_schema(f)
            wanted = ["uid", "url", "caption", "status", "drop_reason", "clip_score", "image_embedding"]
            wanted += [c for c in EXTRA_CAPTIONS if c in schema.names]
            if "image_embedding" not in schema.names:
                raise RetrievalIndexError(
                    f"{path}: shard {shard} has no image_embedding column: run clip_score with embeddings: true"
                )
            f.seek(0)
            table = pq.read_table(f, columns=[c for c in wanted if c in schema.names])
        ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
        kept = table.filter(pc.and_(ok, pc.is_null(table["drop_reason"])))
        skipped["dropped"] += table.num_rows - kept.num_rows
        has = kept.filter(pc.is_valid(kept["image_embedding"]))
        skipped["no_embedding"] += kept.num_rows - has.num_rows
        if not has.num_rows:
            continue
        flat = pc.list_flatten(has["image_embedding"]).to_numpy()
        vectors.append(flat.reshape(has.num_rows, -1).astype(np.float16, copy=False))
        extra = {
            c: has[c] if c in has.column_names else pa.nulls(has.num_rows, pa.string())
            for c in EXTRA_CAPTIONS
        }
        metas.append(
            pa.table(
                {
                    "uid": has["uid"],
                    "caption": has["caption"],
                    "url": has["url"],
                    "shard": pa.array([shard] * has.num_rows, pa.string()),
                    "clip_score": has["clip_score"].cast(pa.float32()),
                    **extra,
                }
            )
        )
        if progress:
            progress(f"read shard {shard}: {has.num_rows:,} kept samples with embeddings")
    if not metas:
        raise RetrievalIndexError(
            f"{path}: no kept sample has an image embedding ({skipped['dropped']:,} dropped, "
            f"{skipped['no_embedding']:,} kept without one): nothing to index"
        )
    dims = {v.shape[1] for v in vectors}
    if len(dims) > 1:
        raise RetrievalIndexError(f"{path}: shards hold embeddings of different dimensions {sorted(dims)}")
    return RunRows(source, pa.concat_tables(metas), np.concatenate(vectors), skipped)


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["model"] != b["model"]:
        return False
    return str(a["model"]).startswith("local-dir:") or a["pretrained"] == b["pretrained"]


def _model_text(s: dict[str, Any]) -> str:
    return s["model"] if str(s["model"]).startswith("local-dir:") else f"{s['model']} ({s['pretrained']})"


# --- building and appending ---------------------------------------------------------------------------


def _unique_new(rows: RunRows, seen: set[str]) -> RunRows:
    """Drop rows whose uid is already indexed (or repeats within the run): the first one stays."""
    uids = rows.meta["uid"].to_pylist()
    keep = []
    for i, u in enumerate(uids):
        if u not in seen:
            seen.add(u)
            keep.append(i)
    repeated = len(uids) - len(keep)
    if repeated:
        idx = pa.array(keep, pa.int64())
        rows = RunRows(rows.source, rows.meta.take(idx), rows.vectors[keep], rows.skipped)
    rows.skipped["already_indexed"] = repeated
    return rows


def _write_part(folder: Path, part: int, rows: RunRows, first_id: int, source: int) -> dict[str, Any]:
    n = rows.meta.num_rows
    meta = rows.meta.add_column(0, "id", pa.array(np.arange(first_id, first_id + n), pa.int64()))
    meta = meta.append_column("source", pa.array([source] * n, pa.int32()))
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    name = f"{part:05d}"
    tmp = folder / "metadata" / f"{name}.parquet.tmp"
    pq.write_table(meta, tmp, compression="zstd")
    tmp.replace(folder / "metadata" / f"{name}.parquet")
    with open(folder / "embeddings" / f"{name}.npy.tmp", "wb") as f:
        np.save(f, np.ascontiguousarray(rows.vectors, np.float16))
    (folder / "embeddings" / f"{name}.npy.tmp").replace(folder / "embeddings" / f"{name}.npy")
    return {"metadata": f"metadata/{name}.parquet", "embeddings": f"embeddings/{name}.npy", "count": n}


def _add_batches(index, vectors: np.ndarray, batch: int = 65536) -> None:
    for start in range(0, len(vectors), batch):
        index.add(np.ascontiguousarray(vectors[start : start + batch], np.float32))


def new_index(vectors: np.ndarray, factory: str, seed: int = 0, say: Callable[[str], None] | None = None):
    """An empty inner-product FAISS index made by ``factory`` and trained on (a sample of) ``vectors``:
    at most 64 points per inverted list, as FAISS's k-means needs no more, or 100,000 for other codes."""
    faiss = _faiss()
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


def tune(index, factory: str, parts: list[np.ndarray], sample: int, seed: int, k: int = 10) -> dict[str, Any]:
    """Measure recall@k against exact search with ``sample`` of the indexed vectors as queries (as autofaiss
    does); for an inverted file, raise nprobe from 1 until recall reaches TARGET_RECALL or stops improving,
    and keep the first nprobe that does. ``Flat`` is exact and not measured."""
    faiss = _faiss()
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


def _save_index(folder: Path, index, generation: int) -> str:
    faiss = _faiss()
    name = f"index.{generation}.faiss"
    faiss.write_index(index, str(folder / f"{name}.tmp"))
    (folder / f"{name}.tmp").replace(folder / name)
    return name


def _write_json(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / "index.json")


def build_index(
    outputs: list[str],
    index_path: str | Path,
    factory: str = "auto",
    memory_budget: int | str = "4GB",
    recall_sample: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build an index over the kept samples of ``outputs`` (one or more runs made with the same CLIP) into
    ``index_path``, replacing what is there. Returns the written ``index.json``."""
    faiss = _faiss()
    say = progress or (lambda msg: None)
    folder = Path(index_path)
    if (folder.exists() and any(folder.iterdir())) and not (folder / "index.json").exists():
        raise RetrievalIndexError(f"{folder} exists and is not an index folder: give another --index")
    runs = [read_run(str(o), say) for o in outputs]
    for r in runs[1:]:
        _check_compatible(runs[0].source, runs[0].vectors.shape[1], r, str(r.source["path"]))
    seen: set[str] = set()
    runs = [_unique_new(r, seen) for r in runs]
    dim = runs[0].vectors.shape[1]
    n = sum(len(r.vectors) for r in runs)
    budget = parse_size(memory_budget)
    chosen = auto_factory(n, dim, budget) if factory == "auto" else factory
    index = new_index(np.concatenate([r.vectors for r in runs]), chosen, seed, say)
    # Start afresh: old parts and FAISS files go only once the new index.json is in place.
    old = (
        set(folder.glob("index.*.faiss")) | set(folder.glob("metadata/*")) | set(folder.glob("embeddings/*"))
    )
    previous = _read_json(folder) if (folder / "index.json").exists() else {}
    old_generation, next_part = previous.get("generation", 0), previous.get("next_part", 0)
    folder.mkdir(parents=True, exist_ok=True)
    parts, first = [], 0
    for i, r in enumerate(runs):
        if not len(r.vectors):
            continue
        say(f"adding {len(r.vectors):,} vectors from {r.source['path']}")
        _add_batches(index, r.vectors)
        parts.append(_write_part(folder, next_part, r, first, i))  # never the name of an old part
        next_part += 1
        parts[-1]["source"] = i
        first += len(r.vectors)
    sources = [{**r.source, "added": r.meta.num_rows, "skipped": r.skipped} for r in runs]
    if chosen != "Flat":
        say(f"measuring recall@10 against exact search on up to {recall_sample:,} queries")
    recall = tune(
        index,
        chosen,
        [np.load(folder / p["embeddings"], mmap_mode="r", allow_pickle=False) for p in parts],
        recall_sample,
        seed,
    )
    if recall.get("params"):
        faiss.ParameterSpace().set_index_parameters(index, recall["params"])
    generation = old_generation + 1
    info = {
        "format": FORMAT,
        "generation": generation,
        "next_part": next_part,
        "faiss_file": _save_index(folder, index, generation),
        "factory": chosen,
        "factory_requested": factory,
        "memory_budget": budget,
        "metric": "inner_product",
        "dimension": dim,
        "count": int(index.ntotal),
        "clip": {"model": runs[0].source["model"], "pretrained": runs[0].source["pretrained"]},
        "sources": sources,
        "parts": parts,
        "expected_recall": recall,
        "search_params": recall.get("params", ""),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(folder, info)
    keep = (
        {folder / info["faiss_file"]}
        | {folder / p["metadata"] for p in parts}
        | {folder / p["embeddings"] for p in parts}
    )
    for p in old - keep:
        p.unlink(missing_ok=True)
    return info


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / "index.json"
    if not path.exists():
        raise RetrievalIndexError(
            f"{folder} holds no index.json: not an index folder (build one with curate index build)"
        )
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise RetrievalIndexError(
            f"{folder}: index format {info.get('format')!r}, this curate reads {FORMAT}: rebuild it"
        )
    return info


def _check_compatible(clip: dict[str, Any], dim: int, rows: RunRows, path: str) -> None:
    if not _same_model(clip, rows.source):
        raise RetrievalIndexError(
            f"{path} was embedded with {_model_text(rows.source)}, the index with {_model_text(clip)}: "
            "embeddings of different CLIP models cannot share an index; build a separate one"
        )
    if rows.vectors.shape[1] != dim:
        raise RetrievalIndexError(
            f"{path} has embeddings of dimension {rows.vectors.shape[1]}, the index {dim}"
        )


def add_to_index(
    index_path: str | Path,
    output: str,
    progress: Callable[[str], None] | None = None,
    recall_sample: int = 1000,
) -> dict[str, Any]:
    """Append the kept samples of another run to an index, without retraining or rebuilding: the new vectors
    go into the trained index, a new metadata/embeddings part is written, and recall is measured again."""
    faiss = _faiss()
    say = progress or (lambda msg: None)
    folder = Path(index_path)
    info = _read_json(folder)
    rows = read_run(output, say)
    _check_compatible(info["clip"], info["dimension"], rows, output)
    seen: set[str] = set()
    for p in info["parts"]:
        seen.update(pq.read_table(folder / p["metadata"], columns=["uid"])["uid"].to_pylist())
    rows = _unique_new(rows, seen)
    source = len(info["sources"])
    info["sources"].append({**rows.source, "added": rows.meta.num_rows, "skipped": rows.skipped})
    if len(rows.vectors):
        index = faiss.read_index(str(folder / info["faiss_file"]))
        say(f"adding {len(rows.vectors):,} vectors from {rows.source['path']}")
        _add_batches(index, rows.vectors)
        part = _write_part(folder, info["next_part"], rows, info["count"], source)
        info["next_part"] += 1
        part["source"] = source
        info["parts"].append(part)
        parts = [np.load(folder / p["embeddings"], mmap_mode="r", allow_pickle=False) for p in info["parts"]]
        info["expected_recall"] = tune(index, info["factory"], parts, recall_sample, 0)
        info["search_params"] = info["expected_recall"].get("params", "")
        old = folder / info["faiss_file"]
        info["generation"] += 1
        info["faiss_file"] = _save_index(folder, index, info["generation"])
        info["count"] = int(index.ntotal)
        _write_json(folder, info)
        old.unlink(missing_ok=True)
    else:
        _write_json(folder, info)
    return info


# --- querying -----------------------------------------------------------------------------------------


class _Shards:
    """Image bytes by (source path, shard, uid), from the WebDataset tars; each tar's member table is read
    once and cached, then one member is a seek and a read."""

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], dict[str, tuple[int, int, str]]] = {}
        self._lock = threading.Lock()

    def _table(self, root: str, shard: str) -> dict[str, tuple[int, int, str]]:
        key = (root, shard)
        with self._lock:
            if key not in self._tables:
                fs, path = filesystem(f"{root}/shards/{shard}.tar")
                if not fs.exists(path):
                    raise RetrievalIndexError(
                        f"{root}/shards/{shard}.tar is missing: was the run moved or deleted?"
                    )
                table = {}
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        uid, _, ext = m.name.rpartition(".")
                        if ext not in ("json", "txt"):
                            table[uid] = (m.offset_data, m.size, ext)
                self._tables[key] = table
            return self._tables[key]

    def image(self, root: str, shard: str, uid: str) -> tuple[bytes, str]:
        entry = self._table(root, shard).get(uid)
        if entry is None:
            raise KeyError(f"{uid} has no image in {root}/shards/{shard}.tar")
        offset, size, ext = entry
        fs, path = filesystem(f"{root}/shards/{shard}.tar")
        with fs.open(path, "rb") as f:
            f.seek(offset)
            return f.read(size), ext


@dataclass
class Neighbor:
    """One search result. ``image`` (encoded bytes, from the run's shard tar) and ``embedding`` (float32,
    unit length, as stored) load on first use."""

    uid: str
    score: float
    caption: str | None
    url: str | None
    shard: str
    source: str  # the run's output folder
    id: int
    clip_score: float | None = None
    captions: dict[str, str | None] = field(default_factory=dict)  # caption_vlm, caption_fused when present
    _retriever: Retriever | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> bytes:
        assert self._retriever is not None  # noqa: S101 - type narrowing; set by the Retriever that made it
        return self._retriever.image_bytes(self.uid)

    @property
    def embedding(self) -> np.ndarray:
        assert self._retriever is not None  # noqa: S101 - type narrowing; set by the Retriever that made it
        return self._retriever.embedding(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "score": self.score,
            "caption": self.caption,
            "url": self.url,
            "shard": self.shard,
            "source": self.source,
            "clip_score": self.clip_score,
            **self.captions,
        }


class Retriever:
    """Query an index from generation code::

        r = Retriever("out/index")
        for nb in r.search_text("a red circle", k=4):
            print(nb.score, nb.caption); open(f"{nb.uid}.jpg", "wb").write(nb.image)

    The CLIP model that made the embeddings (from ``index.json``) loads on the first text or image query."""

    def __init__(self, index_path: str | Path, device: str = "cpu", clip: Any | None = None):
        faiss = _faiss()
        self.folder = Path(index_path)
        self.info = _read_json(self.folder)
        self.index = faiss.read_index(str(self.folder / self.info["faiss_file"]))
        if self.index.ntotal != self.info["count"]:
            raise RetrievalIndexError(
                f"{self.folder}: the FAISS file holds {self.index.ntotal} vectors, index.json says {self.info['count']}"
            )
        if self.info.get("search_params"):
            faiss.ParameterSpace().set_index_parameters(self.index, self.info["search_params"])
        self.meta = pa.concat_tables([pq.read_table(self.folder / p["metadata"]) for p in self.info["parts"]])
        self._parts = [
            np.load(self.folder / p["embeddings"], mmap_mode="r", allow_pickle=False)
            for p in self.info["parts"]
        ]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self._row_of_uid = {u: i for i, u in reversed(list(enumerate(self.meta["uid"].to_pylist())))}
        self._cols = {c: self.meta[c].to_pylist() for c in self.meta.column_names}
        self._sources = [s["path"] for s in self.info["sources"]]
        self._shards = _Shards()
        self._device = device
        self._clip = clip
        self._clip_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def clip(self) -> Any:
        with self._clip_lock:
            if self._clip is None:
                from curate.models.clip import ClipModel

                c = self.info["clip"]
                self._clip = ClipModel.load(c["model"], c["pretrained"], self._device)
            return self._clip

    def embed_text(self, prompt: str) -> np.ndarray:
        clip = self.clip
        with self._clip_lock:  # torch modules are not made to be called from many threads at once
            return clip.encode_texts([prompt])[0]

    def embed_image(self, image: str | Path | bytes | Any) -> np.ndarray:
        """A path, encoded bytes or a PIL image -> its CLIP embedding, preprocessed as clip_score does."""
        from PIL import Image

        from curate.kit.image_batches import decode_rgb

        try:
            if isinstance(image, Image.Image):
                img = image.convert("RGB")
            elif isinstance(image, bytes | bytearray):
                img = decode_rgb(bytes(image))
            else:
                img = decode_rgb(Path(image).read_bytes())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise RetrievalIndexError(f"the query image does not decode: {e}") from e
        clip = self.clip
        with self._clip_lock:
            return clip.encode_images([clip.preprocess(img)])[0]

    def search_text(self, prompt: str, k: int = 10) -> list[Neighbor]:
        return self.search_embedding(self.embed_text(prompt), k)

    def search_image(self, image: str | Path | bytes | Any, k: int = 10) -> list[Neighbor]:
        return self.search_embedding(self.embed_image(image), k)

    def search_embedding(self, vector: np.ndarray, k: int = 10) -> list[Neighbor]:
        """Nearest neighbours of one (unit length) vector, best first."""
        return self.search_embeddings(np.asarray(vector)[None, :], k)[0]

    def search_embeddings(self, vectors: np.ndarray, k: int = 10) -> list[list[Neighbor]]:
        x = np.ascontiguousarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.info["dimension"]:
            raise RetrievalIndexError(
                f"query vectors of shape {x.shape}: the index wants [n, {self.info['dimension']}]"
            )
        scores, ids = search(self.index, self._parts, x, k, rerank_factor(self.info["factory"]))
        return [
            [self.neighbor(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def neighbor(self, row: int, score: float = float("nan")) -> Neighbor:
        c = self._cols
        return Neighbor(
            uid=c["uid"][row],
            score=score,
            caption=c["caption"][row],
            url=c["url"][row],
            shard=c["shard"][row],
            source=self._sources[c["source"][row]],
            id=row,
            clip_score=c["clip_score"][row],
            captions={k: c[k][row] for k in EXTRA_CAPTIONS if k in c},
            _retriever=self,
        )

    def get(self, uid: str) -> Neighbor:
        if uid not in self._row_of_uid:
            raise KeyError(uid)
        return self.neighbor(self._row_of_uid[uid])

    def embedding(self, row: int) -> np.ndarray:
        part = int(np.searchsorted(self._starts, row, side="right") - 1)
        return np.asarray(self._parts[part][row - self._starts[part]], np.float32)

    def image_bytes(self, uid: str) -> bytes:
        return self.image_file(uid)[0]

    def image_file(self, uid: str) -> tuple[bytes, str]:
        """``(bytes, extension)`` of the sample's image, read from its shard tar."""
        nb = self.get(uid)
        return self._shards.image(nb.source, nb.shard, uid)


def image_mime(ext: str) -> str:
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(
        ext, "application/octet-stream"
    )


def demo_index(output: str | Path, index_path: str | Path, say: Callable[[str], None], k: int = 5) -> dict:
    """Build an index over a run and show one text query: the caption of the kept sample with the best
    clip_score, and its ``k`` nearest samples. Used by ``curate demo``."""
    info = build_index([str(output)], index_path)
    r = Retriever(index_path)
    scores = np.nan_to_num(
        np.asarray(r.meta["clip_score"].to_numpy(zero_copy_only=False), np.float64), nan=-2
    )
    prompt = r.meta["caption"][int(np.argmax(scores))].as_py() or ""
    hits = r.search_text(prompt, k)
    say(f"retrieval index: {index_path} ({describe_index(info)}); query {prompt!r}:")
    for n in hits:
        say(f"  {n.score:.3f}  {n.caption}  ({n.uid})")
    return {
        "path": str(index_path),
        "count": info["count"],
        "prompt": prompt,
        "neighbors": [n.to_dict() for n in hits],
    }


def describe_index(info: dict[str, Any]) -> str:
    """One line: count, dimension, factory and expected recall."""
    r = info["expected_recall"]
    recall = (
        "exact search" if r.get("exact") else f"expected recall@10 {r['recall_at_10']:.3f} ({r['params']})"
    )
    return f"{info['count']:,} vectors of dimension {info['dimension']}, factory {info['factory']}, {recall}"


# --- takedown -----------------------------------------------------------------------------------------


def remove_from_index(index_path: str | Path, uids: set[str]) -> dict[str, Any]:
    """Remove the samples with these uids from an index: their vectors, metadata rows and embeddings.

    FAISS ids are row numbers over the parts, so every part from the first one touched is written again
    under a new name with the remaining rows (ids renumbered), and the trained FAISS index is emptied
    (``reset()``, no retraining) and given the remaining float16 vectors again: for ``Flat`` exactly the index
    a build without those samples makes. ``index.json`` is written last and the old files go after it, so a
    takedown killed midway leaves the index as it was. Returns ``{"removed": [uids], "files": [...]}``."""
    faiss = _faiss()
    folder = Path(index_path)
    info = _read_json(folder)
    metas = [pq.read_table(folder / p["metadata"]) for p in info["parts"]]
    hits = [np.isin(np.asarray(m["uid"].to_pylist(), object), list(uids)) for m in metas]
    removed = sorted(
        {u for m, h in zip(metas, hits, strict=True) for u in np.asarray(m["uid"].to_pylist())[h]}
    )
    if not removed:
        return {"removed": [], "files": []}
    first_touched = next(i for i, h in enumerate(hits) if h.any())
    parts, vectors, files, next_id = [], [], [], 0
    for i, (p, meta, hit) in enumerate(zip(info["parts"], metas, hits, strict=True)):
        emb = np.load(folder / p["embeddings"], allow_pickle=False)
        if i < first_touched:
            parts.append(p)
            vectors.append(emb)
            next_id += len(emb)
            continue
        meta, emb = meta.filter(pa.array(~hit)), emb[~hit]
        if not len(emb):
            continue
        meta = meta.set_column(0, "id", pa.array(np.arange(next_id, next_id + len(emb)), pa.int64()))
        name = f"{info['next_part']:05d}"
        info["next_part"] += 1
        pq.write_table(meta, folder / "metadata" / f"{name}.parquet.tmp", compression="zstd")
        (folder / "metadata" / f"{name}.parquet.tmp").replace(folder / "metadata" / f"{name}.parquet")
        with open(folder / "embeddings" / f"{name}.npy.tmp", "wb") as f:
            np.save(f, np.ascontiguousarray(emb, np.float16))
        (folder / "embeddings" / f"{name}.npy.tmp").replace(folder / "embeddings" / f"{name}.npy")
        new = {
            "metadata": f"metadata/{name}.parquet",
            "embeddings": f"embeddings/{name}.npy",
            "count": len(emb),
        }
        parts.append({**p, **new})
        files.append(
            {"replaced": [p["metadata"], p["embeddings"]], "by": [new["metadata"], new["embeddings"]]}
        )
        vectors.append(emb)
        next_id += len(emb)
    for p in info["parts"][first_touched:]:
        if not any(p["metadata"] in f["replaced"] for f in files):
            files.append({"replaced": [p["metadata"], p["embeddings"]], "by": []})
    index = faiss.read_index(str(folder / info["faiss_file"]))
    index.reset()  # keeps the training (coarse quantizer, codebooks)
    for v in vectors:
        _add_batches(index, v)
    old = {folder / info["faiss_file"]} | {
        folder / name for p in info["parts"][first_touched:] for name in (p["metadata"], p["embeddings"])
    }
    info["generation"] += 1
    info["faiss_file"] = _save_index(folder, index, info["generation"])
    info["count"] = int(index.ntotal)
    info["parts"] = parts
    info["taken_down"] = info.get("taken_down", 0) + len(removed)
    _write_json(folder, info)
    for p in old:
        p.unlink(missing_ok=True)
    return {"removed": removed, "files": files}
