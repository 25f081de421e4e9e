"""Changing an index folder: build one over runs, append another run (or bring up to date a run it holds,
which grew or was retried since), remove samples (a takedown).

Each change writes new parts and a new FAISS file under names not in use, then ``index.json`` (the commit
point, :mod:`curate.index.store`), and only then removes the files it replaced.

Memory: a build holds its runs' float16 embeddings (1 GB per million at d=512; briefly twice, to train)
plus the FAISS index, which the auto factory fits in ``memory_budget`` (and briefly twice, while it is
saved); an append holds the new run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curate.base import RetrievalIndexError
from curate.index.factory import add_in_batches, auto_factory, load_faiss, new_index, parse_size, tune
from curate.index.runs import RunRows, check_compatible, read_run, unique_new
from curate.index.store import (
    FORMAT,
    index_files,
    read_embeddings,
    read_faiss,
    read_info,
    read_metadata,
    write_faiss,
    write_info,
    write_part,
)

__all__ = ["add_to_index", "build_index", "remove_from_index"]


def _write_rows(folder: Path, number: int, rows: RunRows, first_id: int, source: int) -> dict[str, Any]:
    """Write a run's rows as part ``number``, with FAISS ids from ``first_id`` and their source's number."""
    n = rows.meta.num_rows
    meta = rows.meta.add_column(0, "id", pa.array(np.arange(first_id, first_id + n), pa.int64()))
    meta = meta.append_column("source", pa.array([source] * n, pa.int32()))
    return write_part(folder, number, meta, rows.vectors)


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
    faiss = load_faiss()
    say = progress or (lambda msg: None)
    folder = Path(index_path)
    if (folder.exists() and any(folder.iterdir())) and not (folder / "index.json").exists():
        raise RetrievalIndexError(f"{folder} exists and is not an index folder: give another --index")
    runs = [read_run(str(o), say) for o in outputs]
    for r in runs[1:]:
        check_compatible(runs[0].source, runs[0].vectors.shape[1], r, str(r.source["path"]))
    seen: set[str] = set()
    runs = [unique_new(r, seen) for r in runs]
    dim = runs[0].vectors.shape[1]
    n = sum(len(r.vectors) for r in runs)
    budget = parse_size(memory_budget)
    chosen = auto_factory(n, dim, budget) if factory == "auto" else factory
    index = new_index(np.concatenate([r.vectors for r in runs]), chosen, seed, say)
    # Start afresh: old parts and FAISS files go only once the new index.json is in place.
    old = index_files(folder)
    previous = read_info(folder) if (folder / "index.json").exists() else {}
    old_generation, next_part = previous.get("generation", 0), previous.get("next_part", 0)
    folder.mkdir(parents=True, exist_ok=True)
    parts, first = [], 0
    for i, r in enumerate(runs):
        if not len(r.vectors):
            continue
        say(f"adding {len(r.vectors):,} vectors from {r.source['path']}")
        add_in_batches(index, r.vectors)
        parts.append(_write_rows(folder, next_part, r, first, i))  # never the name of an old part
        next_part += 1
        parts[-1]["source"] = i
        first += len(r.vectors)
    sources = [{**r.source, "added": r.meta.num_rows, "skipped": r.skipped} for r in runs]
    if chosen != "Flat":
        say(f"measuring recall@10 against exact search on up to {recall_sample:,} queries")
    recall = tune(index, chosen, [read_embeddings(folder, p) for p in parts], recall_sample, seed)
    if recall.get("params"):
        faiss.ParameterSpace().set_index_parameters(index, recall["params"])
    generation = old_generation + 1
    info = {
        "format": FORMAT,
        "generation": generation,
        "next_part": next_part,
        "faiss_file": write_faiss(folder, index, generation),
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
    write_info(folder, info)
    keep = (
        {folder / info["faiss_file"]}
        | {folder / p["metadata"] for p in parts}
        | {folder / p["embeddings"] for p in parts}
    )
    for p in old - keep:
        p.unlink(missing_ok=True)
    return info


def add_to_index(
    index_path: str | Path,
    output: str,
    progress: Callable[[str], None] | None = None,
    recall_sample: int = 1000,
) -> dict[str, Any]:
    """Append the kept samples of a run to an index, without retraining or rebuilding: the new vectors go
    into the trained index, a new metadata/embeddings part is written, and recall is measured again.

    A run the index already holds is brought up to date: after it grew (``curate run --add``, new input
    files) or was retried, its samples that are no longer kept (a new row beat them in dedup) are removed
    first (:func:`remove_from_index`), then its new kept samples are added. The source entry records both
    (``added``, ``removed``)."""
    load_faiss()  # no FAISS: say so before reading anything
    say = progress or (lambda msg: None)
    folder = Path(index_path)
    info = read_info(folder)
    rows = read_run(output, say)
    check_compatible(info["clip"], info["dimension"], rows, output)
    gone = _no_longer_kept(folder, info, rows)
    if gone:
        say(f"removing {len(gone):,} samples of {rows.source['path']} that it no longer keeps")
        remove_from_index(folder, gone, counter="no_longer_kept")
        info = read_info(folder)
    seen: set[str] = set()
    for p in info["parts"]:
        seen.update(read_metadata(folder, p, columns=["uid"])["uid"].to_pylist())
    rows = unique_new(rows, seen)
    source = len(info["sources"])
    info["sources"].append(
        {**rows.source, "added": rows.meta.num_rows, "skipped": rows.skipped, "removed": len(gone)}
    )
    if len(rows.vectors):
        index = read_faiss(folder, info)
        say(f"adding {len(rows.vectors):,} vectors from {rows.source['path']}")
        add_in_batches(index, rows.vectors)
        part = _write_rows(folder, info["next_part"], rows, info["count"], source)
        info["next_part"] += 1
        part["source"] = source
        info["parts"].append(part)
        parts = [read_embeddings(folder, p) for p in info["parts"]]
        info["expected_recall"] = tune(index, info["factory"], parts, recall_sample, 0)
        info["search_params"] = info["expected_recall"].get("params", "")
        old = folder / info["faiss_file"]
        info["generation"] += 1
        info["faiss_file"] = write_faiss(folder, index, info["generation"])
        info["count"] = int(index.ntotal)
        write_info(folder, info)
        old.unlink(missing_ok=True)
    else:
        write_info(folder, info)
    return info


def _no_longer_kept(folder: Path, info: dict[str, Any], rows: RunRows) -> set[str]:
    """The uids the index holds from the run of ``rows`` (a source of the same path) that the run no longer
    keeps."""
    sources = [i for i, s in enumerate(info["sources"]) if s.get("path") == rows.source["path"]]
    if not sources:
        return set()
    kept = set(rows.meta["uid"].to_pylist())
    held: set[str] = set()
    for p in info["parts"]:
        meta = read_metadata(folder, p, columns=["uid", "source"])
        mine = np.isin(np.asarray(meta["source"].to_pylist()), sources)
        held.update(np.asarray(meta["uid"].to_pylist(), object)[mine].tolist())
    return held - kept


def remove_from_index(index_path: str | Path, uids: set[str], counter: str = "taken_down") -> dict[str, Any]:
    """Remove the samples with these uids from an index: their vectors, metadata rows and embeddings.

    FAISS ids are row numbers over the parts, so every part from the first one touched is written again
    under a new name with the remaining rows (ids renumbered), and the trained FAISS index is emptied
    (``reset()``, no retraining) and given the remaining float16 vectors again: for ``Flat`` exactly the index
    a build without those samples makes. ``index.json`` is written last and the old files go after it, so a
    takedown killed midway leaves the index as it was. ``counter``: the count in ``index.json`` the removed
    samples add to (``taken_down``; ``no_longer_kept`` for samples a grown run dropped). Returns
    ``{"removed": [uids], "files": [...]}``."""
    load_faiss()
    folder = Path(index_path)
    info = read_info(folder)
    metas = [read_metadata(folder, p) for p in info["parts"]]
    hits = [np.isin(np.asarray(m["uid"].to_pylist(), object), list(uids)) for m in metas]
    removed = sorted(
        {u for m, h in zip(metas, hits, strict=True) for u in np.asarray(m["uid"].to_pylist())[h]}
    )
    if not removed:
        return {"removed": [], "files": []}
    first_touched = next(i for i, h in enumerate(hits) if h.any())
    parts, vectors, files, next_id = [], [], [], 0
    for i, (p, meta, hit) in enumerate(zip(info["parts"], metas, hits, strict=True)):
        emb = read_embeddings(folder, p, mmap=False)
        if i < first_touched:
            parts.append(p)
            vectors.append(emb)
            next_id += len(emb)
            continue
        meta, emb = meta.filter(pa.array(~hit)), emb[~hit]
        if not len(emb):
            continue
        meta = meta.set_column(0, "id", pa.array(np.arange(next_id, next_id + len(emb)), pa.int64()))
        new = write_part(folder, info["next_part"], meta, emb)
        info["next_part"] += 1
        parts.append({**p, **new})
        files.append(
            {"replaced": [p["metadata"], p["embeddings"]], "by": [new["metadata"], new["embeddings"]]}
        )
        vectors.append(emb)
        next_id += len(emb)
    for p in info["parts"][first_touched:]:
        if not any(p["metadata"] in f["replaced"] for f in files):
            files.append({"replaced": [p["metadata"], p["embeddings"]], "by": []})
    index = read_faiss(folder, info)
    index.reset()  # keeps the training (coarse quantizer, codebooks)
    for v in vectors:
        add_in_batches(index, v)
    old = {folder / info["faiss_file"]} | {
        folder / name for p in info["parts"][first_touched:] for name in (p["metadata"], p["embeddings"])
    }
    info["generation"] += 1
    info["faiss_file"] = write_faiss(folder, index, info["generation"])
    info["count"] = int(index.ntotal)
    info["parts"] = parts
    info[counter] = info.get(counter, 0) + len(removed)
    write_info(folder, info)
    for p in old:
        p.unlink(missing_ok=True)
    return {"removed": removed, "files": files}
