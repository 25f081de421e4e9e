"""Inputs that carry their images: WebDataset tars, folders of image files, a parquet column of image bytes.

The reader (:mod:`curate.core.reader`) cuts these into shards like any table; this module turns each kind
into the same raw table: one row per sample with the image's bytes in ``SOURCE_IMAGE``, where it came from
in ``SOURCE`` (``<tar>#<key>``, a file's path, ``<parquet>#<row>``, relative to the input's root), and, for
a sample that could not be read, a status and error in ``READ_STATUS``/``READ_ERROR``. The download stage
then takes those bytes instead of fetching a URL and treats them exactly as downloaded ones (checks, resize,
re-encode, sha256 of the original bytes, pHash, the same statuses).

**WebDataset** (the layout img2dataset and DataComp write): a sample is the run of consecutive tar members
that share a key, the member's path up to the first dot of its file name (``00001/000010005.jpg`` has key
``00001/000010005`` and extension ``jpg``), as the WebDataset format defines it. The image is the first
member with an image extension; ``<key>.txt`` is the caption (or ``input.caption_field`` of the json);
``<key>.json`` (an object) gives metadata columns; a parquet file beside the tar with a ``key`` column
(img2dataset writes one) adds its columns for the keys it lists. Python's tarfile reads the members rather
than webdataset's own iterator, which skips or raises on exactly the cases that must become statuses here:

- a sample with no image member (only ``.txt``/``.json``, or members of unknown kinds): ``no_image``;
- a key seen before in the same tar, not next to its first run: ``duplicate_row``;
- a json member that is not a JSON object: ``bad_metadata`` (the image is still there; nothing is guessed);
- a member whose bytes cannot be read: ``read_error``. A tar that ends early or is not a tar is an
  :class:`~curate.base.InputError` naming the file (exit code 2), found when the input is planned.

**Folders**: every file under the directory (recursively, hidden files and ``_``-prefixed ones skipped) with
an image extension is a sample, in sorted path order; its caption is the same-named ``.txt`` beside it, or
the row of ``input.captions`` (a csv/tsv/jsonl/parquet file with ``path`` and ``caption`` columns, paths
relative to the folder). A file that cannot be read is ``read_error``.

**Parquet image columns** (``input.image_col``): raw bytes, or the ``{bytes, path}`` struct the HuggingFace
datasets library writes; a null ``bytes`` with a ``path`` reads the file (relative to the parquet file's
folder when not absolute).
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curate.base import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "READ_ERROR",
    "READ_STATUS",
    "SOURCE",
    "SOURCE_IMAGE",
    "TarIndex",
    "folder_rows",
    "image_values",
    "is_image_file",
    "json_field",
    "read_tar",
    "scan_tar",
    "source_root",
]

# Reserved names of the raw table; the reader turns them into its core columns.
SOURCE = "source"
SOURCE_IMAGE = "source_image"
READ_STATUS = "__read_status__"
READ_ERROR = "__read_error__"
CAPTION = "__caption__"
KEY = "__key__"

# Extensions of members and files taken as the sample's image, in order of preference within a sample.
IMAGE_EXTENSIONS = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "gif",
    "bmp",
    "tif",
    "tiff",
    "avif",
    "heic",
    "heif",
    "jxl",
    "ppm",
    "pgm",
    "jp2",
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Files of a folder read at once (local disks and object stores alike).
READ_THREADS = 16


def is_image_file(path: str) -> bool:
    return path.rsplit("/", 1)[-1].rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def source_root(path: str, fs: Any) -> str:
    """The folder that ``SOURCE`` names are relative to: the directory given, or the folder of the file
    or of the glob's fixed part."""
    if any(ch in path for ch in "*?["):
        fixed = path[: min(path.index(ch) for ch in "*?[" if ch in path)]
        return fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    stripped = fs._strip_protocol(path)
    return stripped if fs.isdir(path) else posixpath.dirname(stripped)


def relative(path: str, root: str, fs: Any) -> str:
    stripped = fs._strip_protocol(path)
    root = fs._strip_protocol(root) if root else root
    if root and stripped.startswith(root.rstrip("/") + "/"):
        return stripped[len(root.rstrip("/")) + 1 :]
    return stripped


# --- WebDataset tars ---------------------------------------------------------------------------------


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member path: up to and after the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


@dataclass(frozen=True)
class TarIndex:
    """The samples of one tar, in order: each key and its members' (extension, offset, size)."""

    path: str
    samples: tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]

    @property
    def count(self) -> int:
        return len(self.samples)


@functools.lru_cache(maxsize=8)
def scan_tar(path: str) -> TarIndex:
    """Read the tar's headers (not its members' bytes, where the file can seek) into a :class:`TarIndex`.
    A tar that is truncated or not a tar at all is an InputError naming the file."""
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    try:
        with fsspec.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key.rsplit("/", 1)[-1].startswith("__"):  # webdataset's own metadata (__index__, ...)
                    continue
                entry = (ext, member.offset_data, member.size)
                if samples and samples[-1][0] == key:
                    samples[-1][1].append(entry)
                else:
                    samples.append((key, [entry]))
            # tarfile stops quietly at a header cut short; a member whose data runs past the end is the
            # truncation that matters: its bytes would be made up of nothing. (A compressed tar's offsets
            # are in the decompressed stream; a cut stream fails to decompress instead.)
            plain = tar.fileobj is raw
            end = raw.seek(0, io.SEEK_END) if plain and raw.seekable() else None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a readable tar file: {e}") from None
    if end is not None:
        for key, members in samples:
            for ext, offset, size in members:
                if offset + size > end:
                    raise InputError(
                        f"{path}: not a readable tar file: it ends inside member {key}.{ext} "
                        f"({offset + size - end:,} bytes missing): truncated"
                    )
    return TarIndex(path, tuple((k, tuple(m)) for k, m in samples))


def read_tar(path: str, start: int, stop: int, *, root: str, fs: Any, caption_field: str | None) -> pa.Table:
    """Samples ``[start, stop)`` of the tar as a raw table (see the module docstring)."""
    index = scan_tar(path)
    first_seen: dict[str, int] = {}
    for i, (key, _) in enumerate(index.samples[:stop]):
        first_seen.setdefault(key, i)
    where = relative(path, root, fs)
    sidecar = _sidecar_metadata(path)
    rows: list[dict[str, Any]] = []
    with fsspec.open(path, "rb", compression="infer") as f:
        for i in range(start, stop):
            key, members = index.samples[i]
            rows.append(_tar_sample(f, i, key, members, first_seen[key], where, caption_field, sidecar))
    return _rows_table(rows)


def _tar_sample(
    f: Any,
    position: int,
    key: str,
    members: tuple[tuple[str, int, int], ...],
    first: int,
    where: str,
    caption_field: str | None,
    sidecar: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    row: dict[str, Any] = {SOURCE: f"{where}#{key}", KEY: key}
    row |= {k: v for k, v in sidecar.get(key, {}).items()}
    status = error = None
    by_ext = {ext: (offset, size) for ext, offset, size in reversed(members)}  # the first of an extension
    try:
        if "json" in by_ext:
            meta = _read_member(f, *by_ext["json"])
            try:
                value = json.loads(meta.decode("utf-8", "replace"))
            except ValueError as e:
                value, status, error = None, "bad_metadata", f"{key}.json is not JSON: {e}"
            if value is not None and not isinstance(value, dict):
                status, error = "bad_metadata", f"{key}.json holds a {type(value).__name__}, not an object"
            elif isinstance(value, dict):
                row |= value
        if caption_field is not None:
            caption = row.get(caption_field)
            row[CAPTION] = None if caption is None else str(caption)
        elif "txt" in by_ext:
            row[CAPTION] = _read_member(f, *by_ext["txt"]).decode("utf-8", "replace")
        else:
            row[CAPTION] = None
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in by_ext), None)
        if image_ext is None:
            kinds = ", ".join(f".{e}" if e else "(no extension)" for e, _, _ in members)
            status, error = "no_image", f"sample {key} has {kinds} and no image member"
        else:
            row[SOURCE_IMAGE] = _read_member(f, *by_ext[image_ext])
    except OSError as e:
        status, error = "read_error", f"{where}: member of {key}: {e}"
    if first != position:
        status, error = "duplicate_row", f"key {key} repeats sample {first} of this tar"
    row[READ_STATUS], row[READ_ERROR] = status, error
    return row


def _read_member(f: Any, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"{size - len(data):,} of {size:,} bytes missing")
    return data


@functools.lru_cache(maxsize=4)
def _sidecar_metadata(tar_path: str) -> dict[str, dict[str, Any]]:
    """img2dataset's parquet beside the tar (same name, .parquet), by key; {} when there is none."""
    base = tar_path
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    fs, path = fsspec.core.url_to_fs(base + ".parquet")
    if not fs.exists(path):
        return {}
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{base}.parquet (beside {tar_path}): not a readable parquet file: {e}") from None
    if "key" not in table.column_names:
        return {}
    return {str(r["key"]): r for r in table.to_pylist() if r.get("key") is not None}


def json_field(path: str, field: str) -> list[Any]:
    """``field`` of every sample's json object in the tar, in sample order (None where a sample has no json,
    a json that is no object, or no such field): read from the json members only, not the images."""
    values: list[Any] = []
    with fsspec.open(path, "rb", compression="infer") as f:
        for _key, members in scan_tar(path).samples:
            where = next(((offset, size) for ext, offset, size in members if ext == "json"), None)
            value = None
            if where is not None:
                try:
                    meta = json.loads(_read_member(f, *where).decode("utf-8", "replace"))
                    value = meta.get(field) if isinstance(meta, dict) else None
                except (ValueError, OSError):
                    value = None
            values.append(value)
    return values


# --- folders -----------------------------------------------------------------------------------------


def folder_rows(paths: list[str], *, root: str, fs: Any, captions: dict[str, str | None] | None) -> pa.Table:
    """One raw row per image file: its bytes, and its caption from ``captions`` (relative path -> caption)
    when given, else from the ``.txt`` beside it."""

    def one(path: str) -> dict[str, Any]:
        name = relative(path, root, fs)
        row: dict[str, Any] = {SOURCE: name, READ_STATUS: None, READ_ERROR: None}
        try:
            with fs.open(path, "rb") as f:
                row[SOURCE_IMAGE] = f.read()
        except OSError as e:
            row[READ_STATUS], row[READ_ERROR] = "read_error", f"{name}: {e}"
        row[CAPTION] = captions.get(name) if captions is not None else _caption_beside(path, fs)
        return row

    # Object stores answer one small file at a time slowly: read several at once, in order.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return _rows_table(list(pool.map(one, paths)))


def _caption_beside(path: str, fs: Any) -> str | None:
    txt = path.rpartition(".")[0] + ".txt"
    try:
        with fs.open(txt, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return None  # an unreadable caption file is a missing caption; the image is still a sample


# --- parquet image columns -----------------------------------------------------------------------------


def image_values(column: pa.ChunkedArray, *, base: str, fs: Any, what: str) -> tuple[list, list, list]:
    """Image bytes, statuses and errors of a parquet image column: binary, or a struct with ``bytes`` and
    ``path`` (HuggingFace datasets' Image feature); a path without bytes is read, relative to ``base``."""
    t = column.type
    images: list[bytes | None] = []
    statuses: list[str | None] = []
    errors: list[str | None] = []
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        values = [(v or {}).get("bytes") for v in column.to_pylist()]
        paths = (
            [(v or {}).get("path") for v in column.to_pylist()]
            if t.get_field_index("path") >= 0
            else [None] * len(values)
        )
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values, paths = column.to_pylist(), [None] * len(column)
    else:
        raise InputError(f"{what} holds {t}: expected image bytes or a struct of bytes and path")
    for data, path in zip(values, paths, strict=True):
        status = error = None
        if data is None and path:
            full = path if "://" in path or path.startswith("/") else posixpath.join(base, path)
            try:
                with fs.open(full, "rb") as f:
                    data = f.read()
            except OSError as e:
                status, error = "read_error", f"{path}: {e}"
        elif data is None:
            status, error = "no_image", "the image column is null"
        images.append(data)
        statuses.append(status)
        errors.append(error)
    return images, statuses, errors


# --- shared ------------------------------------------------------------------------------------------


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of mixed metadata as a table. A metadata field whose values Arrow cannot put in one column
    (a number here, a string there) is kept as JSON text rather than refused."""
    names: dict[str, None] = {}
    for row in rows:
        names |= dict.fromkeys(row)
    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == SOURCE_IMAGE:
            columns[name] = pa.array(values, pa.binary())
        elif name in (SOURCE, READ_STATUS, READ_ERROR, CAPTION, KEY):
            columns[name] = pa.array(values, pa.string())
        else:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns[name] = pa.array(
                    [None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()
                )
    for name in (SOURCE, READ_STATUS, READ_ERROR, CAPTION):
        columns.setdefault(name, pa.nulls(len(rows), pa.string()))
    columns.setdefault(SOURCE_IMAGE, pa.nulls(len(rows), pa.binary()))
    return pa.table(columns)
