"""Atomic file writes through fsspec: a reader never sees a half-written file under its final name.

On a file system with a rename (a local disk, NFS), a file is written to a temporary name and renamed into
place; a writer killed midway leaves only a ``*.tmp-*`` file, which the next run removes before it starts.
An object store (S3 and S3-compatible stores such as MinIO, GCS, Azure Blob) has no rename: a "move" is a
copy and a delete. There each file is written as one complete object under its final name (one PUT, or a
multipart upload that is only visible once completed): it appears whole or not at all, and no temporary
object is ever made. Either way completion is marked by a file written last (a shard's ``_stats.json``, a
phase's ``.arrow``, a global stage's ``_done``), and every reader trusts only marked work.

Object stores are opened without fsspec's listings cache: shards are written by other processes (Ray
workers), and a cached listing would hide them from ``exists``, ``ls`` and ``glob`` here.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

__all__ = [
    "OBJECT_STORES",
    "clean_temp",
    "filesystem",
    "is_object_store",
    "read_json",
    "write_atomic",
    "write_json_atomic",
]

TMP_MARK = ".tmp-"
# fsspec protocols of object stores, where one upload is atomic and there is no rename (s3fs, gcsfs, adlfs).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _protocols(fs: AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_object_store(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is an object store: whole-object uploads, no atomic rename."""
    return bool(_protocols(fs) & OBJECT_STORES)


def filesystem(path: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``path`` and the path within it (no protocol)."""
    protocol, _ = fsspec.core.split_protocol(path)
    options = {"use_listings_cache": False} if protocol in OBJECT_STORES else {}
    fs, root = fsspec.core.url_to_fs(path, **options)
    return fs, root.rstrip("/")


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    if is_object_store(fs):
        fs.pipe_file(path, data)  # one complete object: visible whole or not at all
        return
    tmp = f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    except BaseException:
        fs.rm_file(tmp)
        raise


def write_json_atomic(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    write_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.load(f)


def clean_temp(fs: AbstractFileSystem, folder: str) -> int:
    """Remove temporary files left by killed writers under ``folder``; returns how many."""
    if not fs.exists(folder):
        return 0
    stale = [p for p in fs.find(folder) if TMP_MARK in p.rsplit("/", 1)[-1]]
    for p in stale:
        fs.rm_file(p)
    return len(stale)
