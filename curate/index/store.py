"""The on-disk format of a retrieval index folder::

    index.json                 what it is: factory, dimension, count, source runs, CLIP model, expected recall
    index.<generation>.faiss   the FAISS index (inner product on L2-normalised vectors = cosine)
    metadata/NNNNN.parquet     one part per build/append: id, uid, caption, url, source, shard, clip_score, ...
    embeddings/NNNNN.npy       the same rows' float16 embeddings, row-aligned with the metadata part

Every file is written whole under its final name (:func:`curate.core.storage.write_atomic`), and a new part
or FAISS file never takes the name of one in use. ``index.json`` is written last and names the FAISS file
and the parts it covers, so a build, append or takedown killed midway leaves the index as it was. FAISS ids
are row numbers ``0..count-1`` over the parts in order (the uid map).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.base import RetrievalIndexError
from curate.core.storage import filesystem, write_atomic
from curate.index.factory import load_faiss

__all__ = [
    "FORMAT",
    "describe_index",
    "index_files",
    "read_embeddings",
    "read_faiss",
    "read_info",
    "read_metadata",
    "write_faiss",
    "write_info",
    "write_part",
]

FORMAT = 1
INFO = "index.json"


def _write(path: Path, data: bytes | memoryview) -> None:
    fs, where = filesystem(str(path))
    write_atomic(fs, where, data)  # a bytes-like view is written as is, without a copy


def read_info(folder: Path) -> dict[str, Any]:
    """The folder's ``index.json``, checked to be an index of the format this curate reads."""
    path = folder / INFO
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


def write_info(folder: Path, info: dict[str, Any]) -> None:
    """Write ``index.json``: the commit point of every change to the index."""
    _write(folder / INFO, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


def write_part(folder: Path, number: int, meta: pa.Table, vectors: np.ndarray) -> dict[str, Any]:
    """Write part ``number``: the metadata rows and their row-aligned float16 embeddings. Returns its entry
    for ``index.json`` (``metadata``, ``embeddings``, ``count``)."""
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    name = f"{number:05d}"
    table = pa.BufferOutputStream()
    pq.write_table(meta, table, compression="zstd")
    _write(folder / "metadata" / f"{name}.parquet", table.getvalue().to_pybytes())
    array = io.BytesIO()
    np.save(array, np.ascontiguousarray(vectors, np.float16))
    _write(folder / "embeddings" / f"{name}.npy", array.getbuffer())
    return {
        "metadata": f"metadata/{name}.parquet",
        "embeddings": f"embeddings/{name}.npy",
        "count": len(vectors),
    }


def read_metadata(folder: Path, part: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(folder / part["metadata"], columns=columns)


def read_embeddings(folder: Path, part: dict[str, Any], mmap: bool = True) -> np.ndarray:
    """A part's float16 embeddings, memory-mapped unless ``mmap`` is false."""
    return np.load(folder / part["embeddings"], mmap_mode="r" if mmap else None, allow_pickle=False)


def write_faiss(folder: Path, index: Any, generation: int) -> str:
    """Write the FAISS index as ``index.<generation>.faiss``; returns the file's name. It is serialized in
    memory first: while it is written, the index is held twice."""
    name = f"index.{generation}.faiss"
    _write(folder / name, memoryview(load_faiss().serialize_index(index)))
    return name


def read_faiss(folder: Path, info: dict[str, Any]) -> Any:
    return load_faiss().read_index(str(folder / info["faiss_file"]))


def index_files(folder: Path) -> set[Path]:
    """Every FAISS file and part in the folder, named in ``index.json`` or not."""
    return (
        set(folder.glob("index.*.faiss")) | set(folder.glob("metadata/*")) | set(folder.glob("embeddings/*"))
    )


def describe_index(info: dict[str, Any]) -> str:
    """One line: count, dimension, factory and expected recall."""
    r = info["expected_recall"]
    recall = (
        "exact search" if r.get("exact") else f"expected recall@10 {r['recall_at_10']:.3f} ({r['params']})"
    )
    return f"{info['count']:,} vectors of dimension {info['dimension']}, factory {info['factory']}, {recall}"
