"""Atomic file writes through fsspec: write to a temporary name, then rename into place.

A reader never sees a half-written file under its final name. A writer killed midway leaves only a
``*.tmp-*`` file, which the next run removes before it starts.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

TMP_MARK = ".tmp-"


def filesystem(path: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``path`` and the path within it (no protocol)."""
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root.rstrip("/")


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
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
