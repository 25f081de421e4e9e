# ruff: noqa: S101 - a fuzz harness states its invariants as asserts
"""Fuzz input reading: curate.core.reader.InputReader over csv / tsv / jsonl / parquet (and gzip'd text) files.

Invariant: planning and loading every shard either succeeds, with every row accounted for, or raises
``InputError`` (curate.core.reader), which the CLI prints. Accounted for: the shards' row counts add up to the
rows loaded; ``input_index`` runs 0..n-1 across shards; the table starts with the core columns, and its
columns are the ones ``column_names()`` announced; urls are str or null, a null url has status
``invalid_url``; within a shard the uids of ``ok`` rows are unique (repeats are ``duplicate_row``); every
caption is a cleaned one (NFC, no control characters but tab/newline/CR, at most ``max_caption_chars``).
Any exception type other than InputError is a finding.

Input layout: byte 0 chooses the file suffix, byte 1 the config (caption column, max_caption_chars, shard
size); the rest is the file. Run: ``python fuzz/fuzz_input.py fuzz/corpus/input``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import unicodedata

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["curate", "csv", "fsspec"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from curate.base import InputError
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader
    from curate.core.schema import CORE_COLUMNS

SUFFIXES = ("csv", "tsv", "jsonl", "parquet", "csv.gz", "jsonl.gz", "txt")
SHARD_SIZES = (1, 2, 3, 1000)
MAX_CHARS = (None, 3, 2000)


@functools.cache
def workdir() -> str:
    """A scratch folder for the file under test, made on first use (tests point it elsewhere)."""
    return tempfile.mkdtemp(prefix="fuzz_input_")


def config_for(b0: int, b1: int) -> tuple[str, InputConfig, int]:
    suffix = SUFFIXES[b0 % len(SUFFIXES)]
    path = os.path.join(workdir(), f"in.{suffix}")
    caption_col = None if suffix == "txt" or b1 & 1 else "caption"
    cfg = InputConfig(path=path, caption_col=caption_col, max_caption_chars=MAX_CHARS[(b1 >> 1) % 3])
    return path, cfg, SHARD_SIZES[(b1 >> 3) % 4]


def check_caption(c: str | None, max_chars: int | None) -> None:
    if c is None:
        return
    assert unicodedata.is_normalized("NFC", c), repr(c)
    assert all(unicodedata.category(ch) != "Cc" or ch in "\t\n\r" for ch in c), repr(c)
    assert max_chars is None or len(c) <= max_chars, (len(c), max_chars)


def read(cfg: InputConfig, shard_size: int) -> int:
    """Plan and load every shard; check the invariant; the number of rows."""
    reader = InputReader(cfg)
    specs = reader.plan(shard_size)
    names = reader.column_names() if specs else None
    loaded = 0
    for spec in specs:
        t = reader.load(spec)
        assert t.num_rows == spec.rows, (t.num_rows, spec.rows)
        assert tuple(t.column_names[: len(CORE_COLUMNS)]) == CORE_COLUMNS, t.column_names
        assert t.column_names == names, (t.column_names, names)
        assert len(set(t.column_names)) == len(t.column_names), t.column_names
        assert t["input_index"].to_pylist() == list(range(spec.first_row, spec.first_row + spec.rows))
        seen = set()
        for uid, url, caption, status in zip(
            t["uid"].to_pylist(),
            t["url"].to_pylist(),
            t["caption"].to_pylist(),
            t["status"].to_pylist(),
            strict=True,
        ):
            assert isinstance(uid, str) and len(uid) == 32
            assert url is None or isinstance(url, str)
            assert status in ("ok", "invalid_url", "duplicate_row"), status
            if url is None:
                assert status == "invalid_url"
            if status == "ok":
                assert uid not in seen, uid
                seen.add(uid)
            check_caption(caption, cfg.max_caption_chars)
        loaded += t.num_rows
    assert loaded == sum(s.rows for s in specs)
    return loaded


def test_one_input(data: bytes) -> int | None:
    if len(data) < 2:
        return None
    path, cfg, shard_size = config_for(data[0], data[1])
    with open(path, "wb") as f:
        f.write(data[2:])
    try:
        return read(cfg, shard_size)
    except InputError:
        return None


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
