"""The retrieval index: FAISS over the kept samples' CLIP image embeddings, read from a run's sidecars (no
recompute), and the :class:`Retriever` that generation code queries.

    runs.py      the kept rows of a run that carry an embedding: what an index is built from
    factory.py   FAISS: choosing a factory for a memory budget, training, searching, tuning to a recall
    store.py     the index folder on disk: index.json, the FAISS file, metadata and embedding parts
    build.py     build, append to, and remove from (takedown) an index
    query.py     Retriever and Neighbor; the results' images from the runs' shard tars
    serve.py     the HTTP API and search page of ``curate index serve`` (ASGI on uvicorn: the serve extra)
    clip_back.py clip-retrieval's back-end protocol (/knn-service, /metadata, /indices-list) over an index

``from curate.index import Retriever`` (and the names below) is the public API.
"""

from __future__ import annotations

from curate.index.build import add_to_index, build_index, remove_from_index
from curate.index.factory import auto_factory, new_index, parse_size, rerank_factor, search, tune
from curate.index.query import Neighbor, Retriever, image_mime
from curate.index.runs import RunRows, read_run
from curate.index.store import describe_index, read_info

__all__ = [
    "Neighbor",
    "Retriever",
    "RunRows",
    "add_to_index",
    "auto_factory",
    "build_index",
    "describe_index",
    "image_mime",
    "new_index",
    "parse_size",
    "read_info",
    "read_run",
    "remove_from_index",
    "rerank_factor",
    "search",
    "tune",
]
