"""Hash lists: digests and perceptual hashes of images that must never be in a corpus (CSAM hash lists,
takedown requests, an earlier run's takedowns), read from files and matched against rows.

A list is a text file, one hash per line; ``#`` starts a comment, blank lines are skipped, case does not
matter. The kinds, as the download stage writes them:

- ``sha256``: 64 hex digits, of the downloaded bytes;
- ``md5``: 32 hex digits, of the downloaded bytes (the form most child-safety lists are shared in);
- ``phash``: 16 hex digits, imagehash's ``phash`` of the original image (``curate.kit.hashing.phash``);
- ``pdq``: 64 hex digits, Meta's PDQ of the original image, in the reference's hex form.

A line may say its kind (``md5:<hex>``, ``pdq:<hex>``, ...); without a prefix the length tells, and 64 digits
mean sha256 unless the list is read as a PDQ list (a blocklist's ``pdq:`` files). A ``.parquet`` list holds
columns named after the kinds instead (nulls skipped). Paths may be local or any fsspec URL.
"""

from __future__ import annotations

import re
from typing import Literal

import pyarrow.parquet as pq

from curate.base import HashListError
from curate.core.storage import filesystem

__all__ = ["HASH_LENGTH", "KINDS", "HashKind", "parse_hash", "read_hash_list", "read_hashes"]

HashKind = Literal["sha256", "md5", "phash", "pdq"]
HASH_LENGTH: dict[str, int] = {"sha256": 64, "md5": 32, "phash": 16, "pdq": 64}
KINDS: tuple[str, ...] = ("sha256", "md5", "phash", "pdq")
_HEX = re.compile(r"[0-9a-f]+")


def parse_hash(text: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, str]:
    """``(kind, lower-case hex)`` of one entry; raises ValueError with what is expected."""
    value = text.strip().lower()
    kind, sep, rest = value.partition(":")
    if sep:
        if kind not in kinds:
            raise ValueError(f"unknown kind {kind!r}: use {' or '.join(f'{k}:' for k in kinds)}")
        value = rest.strip()
    else:
        kind = next((k for k in kinds if len(value) == HASH_LENGTH[k]), "")
    if kind and len(value) == HASH_LENGTH[kind] and _HEX.fullmatch(value):
        return kind, value
    want = " or ".join(f"a {k} ({HASH_LENGTH[k]} hex digits)" for k in kinds)
    raise ValueError(f"{text.strip()!r} is not {want}")


def read_hashes(path: str, kinds: tuple[str, ...] = KINDS) -> dict[str, list[str]]:
    """Every hash in the file at ``path`` by kind, in file order, without repeats."""
    fs, root = filesystem(path)
    if not fs.isfile(root):
        raise HashListError(f"{path}: no such file")
    found: dict[str, dict[str, None]] = {k: {} for k in kinds}
    if root.endswith(".parquet"):
        with fs.open(root, "rb") as f:
            table = pq.read_table(f)
        columns = [k for k in kinds if k in table.column_names]
        if not columns:
            raise HashListError(f"{path}: a parquet list needs a column named {' or '.join(kinds)}")
        for kind in columns:
            for row, v in enumerate(table[kind].to_pylist()):
                if v is None:
                    continue
                try:
                    got, value = parse_hash(f"{kind}:{v}", (kind,))
                except ValueError as e:
                    raise HashListError(f"{path}: row {row} of column {kind}: {e}") from None
                found[got][value] = None
        return {k: list(v) for k, v in found.items()}
    with fs.open(root, "rt", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                kind, value = parse_hash(text, kinds)
            except ValueError as e:
                raise HashListError(f"{path}:{number}: {e}") from None
            found[kind][value] = None
    return {k: list(v) for k, v in found.items()}


def read_hash_list(path: str, kind: HashKind) -> list[str]:
    """The hashes of one kind in the file at ``path``: any other entry is an error with its line."""
    return read_hashes(path, (kind,))[kind]
