"""Reads the input (one or many files, local or any fsspec URL) and cuts it into shards.

Shards are cut from the input in order: files sorted by path, rows in file order, ``shard_size`` rows each,
so shard ``00042`` always holds the same rows. Planning reads only what it must to count rows (parquet
metadata; text formats whole), and a worker reads only its shard's rows.

Every input row comes out as one row of a shard table: a row whose URL is null or unusable is kept with
``status=invalid_url``, a repeat of an earlier (url, caption) pair in the same shard with
``status=duplicate_row``. Nothing is dropped silently. Blank lines of a ``txt`` input are not rows.

Text inputs are decoded as UTF-8; invalid bytes become U+FFFD (as do binary parquet columns read as text),
never an error. A CSV/TSV row with the wrong number of fields, or a quoted value that is never closed (which
would swallow every following row into one caption), is an :class:`InputError` naming the file and line.

Every caption is repaired and cleaned as it is read. First :func:`repair_caption`: ftfy undoes mojibake
(UTF-8 read as Windows-1252 or Latin-1: ``CafÃ©`` -> ``Café``, ``â€œ`` -> ``“``) and HTML entities
(``&amp;`` -> ``&``; not in text that holds a ``<``, which may be markup), and flags the rows it changed in
``caption_repaired``; quotes, ligatures, widths and line breaks stay as they are. Then :func:`clean_caption`:
NFC, lone surrogates replaced by U+FFFD, control characters (NUL, C0, DEL, C1) removed except tab, newline
and carriage return; other white space is kept as it is. A caption longer than ``input.max_caption_chars`` is
cut to that many characters and flagged in ``caption_truncated``. The ``uid`` is computed from the caption *as read*, before cleaning, so uids (and
resumed runs, dedup decisions and indexes that name them) are the same as before cleaning existed, and two
inputs that differ only beyond the cut keep distinct uids.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import lzma
import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from curate.base import InputError
from curate.core import sources
from curate.core.config import InputConfig
from curate.core.schema import COLUMNS, CORE_COLUMNS, uid_for, uid_for_source

__all__ = ["InputReader", "Segment", "ShardSpec", "clean_caption", "format_of", "repair_caption"]

_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
    ".tar": "webdataset",
    ".tgz": "webdataset",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class Segment:
    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class ShardSpec:
    """What a shard is made of: rows ``[start, stop)`` of one or more input files."""

    id: str
    first_row: int
    segments: tuple[Segment, ...]

    @property
    def rows(self) -> int:
        return sum(s.stop - s.start for s in self.segments)

    def to_dict(self) -> dict:
        return {"id": self.id, "first_row": self.first_row, "segments": [vars(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> ShardSpec:
        return cls(d["id"], d["first_row"], tuple(Segment(**s) for s in d["segments"]))


def format_of(path: str) -> str | None:
    name = path.lower()
    for comp in _COMPRESSION:
        name = name.removesuffix(comp)
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


class InputReader:
    def __init__(self, config: InputConfig):
        self.config = config
        self.fs, _ = fsspec.core.url_to_fs(config.path)

    # --- discovery and planning ------------------------------------------------------------------

    @functools.cached_property
    def files(self) -> list[str]:
        """The input files, sorted. A directory means every file in it (recursively) of a known format."""
        path = self.config.path
        fs = self.fs
        if self.config.format == "folder":
            if not fs.isdir(path):
                raise InputError(f"input.path: {path} is not a directory (input.format: folder)")
            found = sorted(
                p
                for p in fs.find(path)
                if not _hidden(p, fs._strip_protocol(path)) and sources.is_image_file(p)
            )
            if not found:
                raise InputError(
                    f"input.path: no image files under {path} (extensions: {', '.join(sources.IMAGE_EXTENSIONS)})"
                )
        elif any(ch in path for ch in "*?["):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            found = sorted(
                p
                for p in fs.find(path)
                if not p.rsplit("/", 1)[-1].startswith((".", "_"))
                and (format_of(p) == self.config.format if self.config.format else format_of(p))
            )
        elif fs.exists(path):
            found = [path]
        else:
            raise InputError(f"input.path: {path} does not exist")
        if not found:
            raise InputError(f"input.path: no input files match {path}")
        if self.config.format is None and any(format_of(p) == "webdataset" for p in found):
            # img2dataset's output folder: the parquet and json files beside its tars are their metadata.
            found = [p for p in found if format_of(p) == "webdataset"]
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol not in ("file", "local"):
            found = [fs.unstrip_protocol(p) for p in found]
        for p in found:
            self._format(p)  # fail early on a file we cannot read
        return found

    def _format(self, path: str) -> str:
        fmt = self.config.format or format_of(path)
        if fmt is None:
            raise InputError(
                f"{path}: cannot tell the format from the name; set input.format to one of "
                "parquet, csv, tsv, jsonl, txt, webdataset, folder"
            )
        if self.config.image_col is not None and fmt != "parquet":
            raise InputError(f"{path}: input.image_col is for parquet input, and this is {fmt}")
        return fmt

    @property
    def carries_images(self) -> bool:
        """Rows arrive with their image bytes: the download stage takes them instead of fetching."""
        return self.config.carries_images or (
            bool(self.files) and self._format(self.files[0]) == "webdataset"
        )

    @functools.cached_property
    def root(self) -> str:
        """The folder that the ``source`` column's names are relative to."""
        return sources.source_root(self.config.path, self.fs)

    def count_rows(self, path: str) -> int:
        fmt = self._format(path)
        if fmt == "folder":
            return 1
        if fmt == "webdataset":
            return sources.scan_tar(path).count
        if fmt == "parquet":
            try:
                with self.fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a name not UTF-8
                raise InputError(f"{path}: not a readable parquet file: {e}") from None
            # Shards are cut by the footer's count and read by row group: both must agree, or rows vanish.
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            if sum(groups) != meta.num_rows or any(n < 0 for n in groups):
                raise InputError(
                    f"{path}: not a readable parquet file: its footer says {meta.num_rows} rows, its row "
                    f"groups {sum(groups)}"
                )
            return meta.num_rows
        return self._read_file(path).num_rows

    def plan(self, shard_size: int) -> list[ShardSpec]:
        """Cut the input into shards of ``shard_size`` rows; the last one may be smaller."""
        shards: list[ShardSpec] = []
        current: list[Segment] = []
        filled = 0
        total = 0
        for path in self.files:
            n = self.count_rows(path)
            pos = 0
            while pos < n:
                take = min(shard_size - filled, n - pos)
                current.append(Segment(path, pos, pos + take))
                pos += take
                filled += take
                if filled == shard_size:
                    shards.append(ShardSpec(f"{len(shards):05d}", total, tuple(current)))
                    total += filled
                    current, filled = [], 0
        if current:
            shards.append(ShardSpec(f"{len(shards):05d}", total, tuple(current)))
        if self.config.uid_col is not None:
            self._check_unique_uids()
        return shards

    def _check_unique_uids(self) -> None:
        """``input.uid_col`` names every row of the run: a repeat anywhere is refused before any work (uids
        name shard members, dedup decisions and index entries)."""
        seen: dict[str, str] = {}
        for path in self.files:
            for i, uid in enumerate(self._uids_of(path)):
                if uid is None:
                    raise InputError(f"{path}: row {i}: {self.config.uid_col} (input.uid_col) is null")
                if uid in seen:
                    raise InputError(
                        f"{path}: row {i}: {self.config.uid_col} (input.uid_col) {uid!r} repeats {seen[uid]}; "
                        "uids must be unique in a run"
                    )
                seen[uid] = f"{path} row {i}"

    def _uids_of(self, path: str) -> list[str | None]:
        col = self.config.uid_col
        if self._format(path) == "webdataset":
            index = sources.scan_tar(path)
            if col == "key":
                return [key for key, _ in index.samples]
            values = sources.json_field(path, col)
            if all(v is None for v in values) and values:
                raise InputError(f"{path}: no sample's json has {col!r} (input.uid_col)")
            return [None if v is None else str(v) for v in values]
        elif self._format(path) == "parquet":
            try:
                with self.fs.open(path, "rb") as f:
                    names = pq.ParquetFile(f).schema_arrow.names
                    table = pq.read_table(f, columns=[col]) if col in names else pa.table({})
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{path}: not a readable parquet file: {e}") from None
        else:
            table = self._read_file(path)
        if col not in table.column_names:
            raise InputError(
                f"{path}: no column {col!r} (input.uid_col); columns: {', '.join(table.column_names)}"
            )
        return [None if v is None else str(v) for v in table[col].to_pylist()]

    def column_names(self) -> list[str]:
        """The columns a shard table will have, from the first file: the core columns, then the rest."""
        path = self.files[0]
        if self.carries_images:
            spec = ShardSpec("names", 0, (Segment(path, 0, min(1, self.count_rows(path))),))
            return self.load(spec).column_names
        if self._format(path) == "parquet":
            try:
                with self.fs.open(path, "rb") as f:
                    names = pq.ParquetFile(f).schema_arrow.names
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a name not UTF-8
                raise InputError(f"{path}: not a readable parquet file: {e}") from None
        else:
            names = self._read_file(path).column_names
        return list(CORE_COLUMNS) + [self._carried_name(n) for n in names if n not in self._input_keys()]

    # --- reading ---------------------------------------------------------------------------------

    def load(self, spec: ShardSpec) -> pa.Table:
        """The shard's rows as a table with the core columns first, then the carried input columns."""
        if self.config.format == "folder":  # one segment per image: read together
            parts = [
                sources.folder_rows(
                    [s.path for s in spec.segments], root=self.root, fs=self.fs, captions=self._captions
                )
            ]
        else:
            parts = [self._read_segment(seg) for seg in spec.segments]
        raw = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        return self._normalise(raw, spec.first_row)

    @functools.cached_property
    def _captions(self) -> dict[str, str | None] | None:
        """input.captions of a folder: relative path -> caption."""
        if self.config.captions is None:
            return None
        path = self.config.captions
        if "://" not in path and not path.startswith("/") and not self.fs.exists(path):
            path = f"{self.config.path.rstrip('/')}/{path}"  # relative to the folder
        fmt = format_of(path)
        if fmt not in ("csv", "tsv", "jsonl", "parquet"):
            raise InputError(f"input.captions: {path}: a csv, tsv, jsonl or parquet file, please")
        try:
            if fmt == "parquet":
                with fsspec.open(path, "rb") as f:
                    table = pq.read_table(f)
            else:
                table = self._read_file(path)
        except (FileNotFoundError, pa.ArrowException, OSError) as e:
            raise InputError(f"input.captions: {path}: cannot read it: {e}") from None
        missing = [c for c in ("path", "caption") if c not in table.column_names]
        if missing:
            raise InputError(
                f"input.captions: {path}: no column {', '.join(missing)}; columns: {', '.join(table.column_names)}"
            )
        paths = _as_strings(table["path"], f"input.captions: {path}: column 'path'")
        texts = _as_strings(table["caption"], f"input.captions: {path}: column 'caption'")
        found: dict[str, str | None] = {}
        for i, (p, text) in enumerate(zip(paths, texts, strict=True)):
            if p is None:
                raise InputError(f"input.captions: {path}: row {i}: path is null")
            p = p.removeprefix("./")
            if p in found:
                raise InputError(f"input.captions: {path}: row {i}: {p} has a caption already")
            found[p] = text
        return found

    def _read_segment(self, seg: Segment) -> pa.Table:
        fmt = self._format(seg.path)
        if fmt == "webdataset":
            return sources.read_tar(
                seg.path,
                seg.start,
                seg.stop,
                root=self.root,
                fs=self.fs,
                caption_field=self.config.caption_field,
            )
        if fmt == "parquet":
            try:
                with self.fs.open(seg.path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    groups, offset, first = [], 0, None
                    for g in range(pf.metadata.num_row_groups):
                        n = pf.metadata.row_group(g).num_rows
                        if offset + n > seg.start and offset < seg.stop:
                            groups.append(g)
                            first = offset if first is None else first
                        offset += n
                    table = pf.read_row_groups(groups)
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a name not UTF-8
                raise InputError(f"{seg.path}: not a readable parquet file: {e}") from None
            table = table.slice(seg.start - (first or 0), seg.stop - seg.start)
            if table.num_rows != seg.stop - seg.start:  # row groups that hold fewer rows than they say
                raise InputError(
                    f"{seg.path}: not a readable parquet file: rows {seg.start}..{seg.stop - 1} hold "
                    f"{table.num_rows} rows"
                )
            return self._with_images(table, seg) if self.config.image_col else table
        return self._read_file(seg.path).slice(seg.start, seg.stop - seg.start)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one reader per run; keeps the file a shard spans
    def _read_file(self, path: str) -> pa.Table:
        fmt = self._format(path)
        c = self.config
        try:
            with fsspec.open(path, "rb", compression="infer") as f:
                data = f.read()
            if fmt == "txt":
                lines = [ln.strip() for ln in data.decode("utf-8", errors="replace").splitlines()]
                return pa.table({c.url_col: pa.array([ln for ln in lines if ln], pa.string())})
            data = _valid_utf8(data)
            if fmt == "jsonl":
                # pyarrow (26.0.1 and earlier) dies of SIGSEGV on a file whose first value is a top-level
                # null (apache/arrow#47409): refused here, as pyarrow refuses a first line of 1, "x" or [].
                if data.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"null"):
                    raise InputError(
                        f"{path}: not readable as jsonl: the first line is null, not a JSON object"
                    )
                return pajson.read_json(io.BytesIO(data))
        # EOFError, zlib.error, LZMAError: a compressed input that ends early or is corrupt (gzip raises
        # OSError only for a bad header).
        except (pa.ArrowException, OSError, UnicodeError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise InputError(f"{path}: not readable as {fmt}: {e}") from None
        delimiter = "\t" if fmt == "tsv" else ","
        strings = {col: pa.string() for col in (c.url_col, c.caption_col) if col}
        try:
            # newlines_in_values: a quoted caption may span lines; without it Arrow accepts that only
            # within one parse block, so the same file would read differently depending on its size.
            table = _read_csv(data, delimiter, strings)
        except (pa.ArrowException, OSError) as e:
            where = _csv_bad_line(data, delimiter)
            raise InputError(f"{path}: not readable as {fmt}: {where + ': ' if where else ''}{e}") from None
        if _any_multiline(table):
            line = _unclosed_quote_line(data, delimiter)
            if line is not None:
                raise InputError(
                    f"{path}: not readable as {fmt}: line {line}: a quoted value is never closed; it would "
                    "swallow every following line"
                )
        return table

    def _with_images(self, table: pa.Table, seg: Segment) -> pa.Table:
        """A parquet segment with its image column turned into the raw image columns of :mod:`sources`."""
        col = self.config.image_col
        if col not in table.column_names:
            raise InputError(
                f"{seg.path}: no column {col!r} (input.image_col); columns: {', '.join(table.column_names)}"
            )
        base = seg.path.rsplit("/", 1)[0] if "/" in seg.path else "."
        images, statuses, errors = sources.image_values(
            table[col], base=base, fs=self.fs, what=f"{seg.path}: column {col!r} (input.image_col)"
        )
        where = sources.relative(seg.path, self.root, self.fs)
        table = table.drop_columns([col])
        for name, values, kind in (
            (sources.SOURCE, [f"{where}#{seg.start + i}" for i in range(table.num_rows)], pa.string()),
            (sources.SOURCE_IMAGE, images, pa.binary()),
            (sources.READ_STATUS, statuses, pa.string()),
            (sources.READ_ERROR, errors, pa.string()),
        ):
            table = table.append_column(name, pa.array(values, kind))
        return table

    # --- normalising -----------------------------------------------------------------------------

    def _input_keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.config.url_col, self.config.caption_col) if k)

    @staticmethod
    def _carried_name(name: str) -> str:
        """Input columns keep their names unless curate declares one like it: then ``input_<name>``."""
        return f"input_{name}" if name in COLUMNS else name

    def _raw_columns(self, raw: pa.Table) -> list[str]:
        """The raw columns carried as input columns: all but the url and caption taken, and the reserved
        columns of :mod:`sources` (a tar sample's key is carried as ``key`` unless its json has one)."""
        reserved = {
            sources.SOURCE,
            sources.SOURCE_IMAGE,
            sources.READ_STATUS,
            sources.READ_ERROR,
            sources.CAPTION,
        }
        if sources.KEY in raw.column_names and "key" in raw.column_names:
            reserved.add(sources.KEY)
        keys = self._input_keys() if sources.CAPTION not in raw.column_names else (self.config.url_col,)
        return [k for k in raw.column_names if k not in keys and k not in reserved]

    def _normalise(self, raw: pa.Table, first_row: int) -> pa.Table:
        c = self.config
        n = raw.num_rows
        where = f"{c.path}"
        images = sources.SOURCE_IMAGE in raw.column_names
        carried = self._raw_columns(raw)
        # A repeated header name ("url,url"), or an input column that would land on another's name once
        # carried ("uid" is carried as input_uid: an input_uid beside it), would lose a column or fail.
        names = [*CORE_COLUMNS, *(self._carried_name(_key_name(k)) for k in carried)]
        repeated = sorted({k for k in raw.column_names if raw.column_names.count(k) > 1})
        repeated = repeated or sorted({k for k in names if names.count(k) > 1})
        if repeated:
            raise InputError(
                f"{where}: column names that repeat (or collide once carried): {', '.join(repeated)}"
            )
        if c.url_col in raw.column_names:
            urls = _as_strings(raw[c.url_col], f"{where}: column {c.url_col!r} (input.url_col)")
        elif images:
            urls = [None] * n  # the image came with the input
        else:
            raise InputError(
                f"{where}: no column {c.url_col!r} (input.url_col); columns: {', '.join(raw.column_names)}"
            )
        if sources.CAPTION in raw.column_names:
            captions = raw[sources.CAPTION].to_pylist()
        elif c.caption_col is None:
            captions = [None] * n
        elif c.caption_col in raw.column_names:
            captions = _as_strings(
                raw[c.caption_col], f"{where}: column {c.caption_col!r} (input.caption_col)"
            )
        else:
            raise InputError(
                f"{where}: no column {c.caption_col!r} (input.caption_col; null for inputs without captions); "
                f"columns: {', '.join(raw.column_names)}"
            )
        if images:
            located = raw[sources.SOURCE].to_pylist()
            read_status = raw[sources.READ_STATUS].to_pylist()
            read_error = raw[sources.READ_ERROR].to_pylist()
        if c.uid_col is not None:
            name = sources.KEY if c.uid_col == "key" and sources.KEY in raw.column_names else c.uid_col
            if name not in raw.column_names:
                raise InputError(
                    f"{where}: no column {c.uid_col!r} (input.uid_col); columns: {', '.join(raw.column_names)}"
                )
            given = [None if v is None else str(v) for v in raw[name].to_pylist()]

        uids, statuses, errors, cleaned, truncated, repaired = [], [], [], [], [], []
        first_seen: dict[str, int] = {}
        for i, (url, caption) in enumerate(zip(urls, captions, strict=True)):
            if c.uid_col is not None:
                uid = given[i]
                if uid is None:
                    raise InputError(
                        f"{where}: input row {first_row + i}: {c.uid_col} (input.uid_col) is null"
                    )
            else:
                # The caption as read: see the module docstring. An image that came with the input and has
                # no URL is named by where it came from.
                uid = uid_for_source(located[i], caption) if images and url is None else uid_for(url, caption)
            text, fixed = repair_caption(caption, c.max_caption_chars)
            text, cut = clean_caption(text, c.max_caption_chars)
            cleaned.append(text)
            truncated.append(cut)
            repaired.append(fixed)
            if images:
                status, error = (read_status[i], read_error[i]) if read_status[i] else ("ok", None)
            else:
                status, error = _check_url(url)
            if status == "ok":
                if uid in first_seen:
                    status = "duplicate_row"
                    what = (
                        "uid"
                        if c.uid_col is not None
                        else "url and caption"
                        if not images
                        else "image source and caption"
                    )
                    error = f"same {what} as input row {first_row + first_seen[uid]}"
                else:
                    first_seen[uid] = i
            uids.append(uid)
            statuses.append(status)
            errors.append(error)

        columns: dict[str, pa.Array | pa.ChunkedArray] = {
            "uid": pa.array(uids, pa.string()),
            "input_index": pa.array(range(first_row, first_row + n), pa.int64()),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(cleaned, pa.string()),
            "status": pa.array(statuses, pa.string()),
            "error": pa.array(errors, pa.string()),
            "drop_reason": pa.nulls(n, pa.string()),
            "caption_truncated": pa.array(truncated, pa.bool_()),
            "caption_repaired": pa.array(repaired, pa.bool_()),
        }
        if images:
            columns[sources.SOURCE] = raw[sources.SOURCE]
            columns[sources.SOURCE_IMAGE] = raw[sources.SOURCE_IMAGE]
        for name in carried:
            columns[self._carried_name(_key_name(name))] = raw[name]
        return pa.table(columns)


def _key_name(name: str) -> str:
    """A tar sample's key is carried as ``key``."""
    return "key" if name == sources.KEY else name


def _hidden(path: str, root: str) -> bool:
    """A file under ``root`` that a folder input skips: any part of its path starting with . or _."""
    rel = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else path
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _read_csv(data: bytes, delimiter: str, strings: dict[str, pa.DataType]) -> pa.Table:
    """Arrow parses a CSV in blocks of 1 MiB and refuses a row longer than a block ("straddling object"):
    one 10 MB caption would fail the whole file. Such a file is parsed again as one block."""
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(column_types=strings)
    try:
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e) or len(data) >= 2**31 - 1:
            raise
    read = pacsv.ReadOptions(block_size=len(data) + 1)
    return pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)


def _as_strings(col: pa.ChunkedArray, what: str) -> list[str | None]:
    """The column's values as str; invalid UTF-8 (a binary column, or a parquet string column written
    without validation) is decoded with U+FFFD, never an error. A column that is no text and does not cast
    to it (a JSON object or list, a nested parquet type) is an :class:`InputError` naming ``what``."""
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        try:
            col = col.cast(pa.string())
        except pa.ArrowException as e:
            raise InputError(f"{what} holds {t}, not text: {e}") from None
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        return _as_strings(col.cast(pa.large_binary()), what)


# A C1 control character that does not follow a character of a Windows-1252 or Latin-1 mis-decoded UTF-8
# byte cannot be part of mojibake (UTF-8 continuation bytes follow a lead byte): it goes before ftfy looks,
# as clean_caption would remove it, so ftfy does not read it as a lone Windows-1252 character (\x85 -> "…").
_LONE_C1 = re.compile(
    "(?<![\x80-\xff\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u017d"
    "\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178])[\x80-\x9f]"
)
REPAIR_WINDOW = 4  # x max_chars: a repair never lengthens text, and UTF-8 mojibake is at most 4 characters a
# character, so beyond this what is repaired would be cut anyway


@functools.cache
def _ftfy_config() -> Any:
    """What ftfy may change: mojibake and HTML entities. Not curly quotes, ligatures, full-width forms or line
    breaks (they are what the author wrote), nor control characters and normalisation (clean_caption's)."""
    import ftfy

    return ftfy.TextFixerConfig(
        unescape_html="auto",
        remove_terminal_escapes=False,
        fix_c1_controls=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=False,
        fix_line_breaks=False,
        remove_control_chars=False,
        normalization=None,
        explain=False,
    )


def repair_caption(caption: str | None, max_chars: int | None) -> tuple[str | None, bool]:
    """The caption with mojibake and HTML entities repaired by ftfy, and whether anything changed.

    ``CafÃ©`` -> ``Café``, ``â€œquotedâ€\\x9d`` -> ``“quoted”``, ``Tom &amp; Jerry`` -> ``Tom & Jerry``;
    entities stay in text that holds a ``<`` (ftfy's "auto": it may be markup). ASCII without ``&`` has nothing
    to repair and is returned as it is, at once. With a ``max_chars``, only the first ``REPAIR_WINDOW`` x
    ``max_chars`` characters are repaired and the rest is appended as it was (:func:`clean_caption` cuts it):
    a 10 MB caption costs what a short one does.
    """
    if caption is None or (caption.isascii() and "&" not in caption):
        return caption, False
    import ftfy

    head, rest = caption, ""
    if max_chars is not None and len(caption) > REPAIR_WINDOW * max_chars:
        head, rest = caption[: REPAIR_WINDOW * max_chars], caption[REPAIR_WINDOW * max_chars :]
    fixed = ftfy.fix_text(_LONE_C1.sub("", head), _ftfy_config())
    return fixed + rest, _plain(fixed) != _plain(head)


def _plain(text: str) -> str:
    """What clean_caption makes of control characters and lone surrogates: not a repair of ftfy's."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


# C0 and C1 control characters and DEL, except tab, newline and carriage return; lone surrogates.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_caption(caption: str | None, max_chars: int | None) -> tuple[str | None, bool]:
    """The caption as curate stores it, and whether it was cut.

    NFC; lone surrogates (which no UTF-8 file can hold) become U+FFFD; control characters are removed
    except tab, newline and carriage return; other white space is kept as it is (the uid folds it, the
    caption keeps it). Then at most ``max_chars`` characters (code points; ``None``: no limit). Null stays
    null and the empty string stays empty.
    """
    if caption is None:
        return None, False
    # Control characters go first: one removed after NFC could leave a letter and a combining mark side by
    # side that NFC would have composed ("a\x00\u0301"), and the caption would be neither NFC nor stable.
    caption = _CONTROL.sub("", caption)
    if not caption.isascii():
        caption = _SURROGATE.sub("\ufffd", caption)
        caption = unicodedata.normalize("NFC", caption)
    if max_chars is not None and len(caption) > max_chars:
        return caption[:max_chars], True
    return caption, False


def _valid_utf8(data: bytes) -> bytes:
    """``data`` if it is valid UTF-8, else decoded with U+FFFD for every invalid byte and encoded again."""
    check = codecs.getincrementaldecoder("utf-8")()
    step = 16 << 20  # checks in 16 MB steps: no full-size copy of a valid file
    try:
        for pos in range(0, len(data), step):
            check.decode(data[pos : pos + step])
        check.decode(b"", final=True)
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")
    return data


def _csv_bad_line(data: bytes, delimiter: str) -> str | None:
    """``line N`` of the first row whose field count differs from the header's (after Arrow refused the
    file), or None when Python's csv module finds none."""
    rows = csv.reader(io.StringIO(data.decode("utf-8"), newline=""), delimiter=delimiter)
    try:
        width = len(next(rows))
        for row in rows:
            if row and len(row) != width:
                return f"line {rows.line_num}"
    except (csv.Error, StopIteration):
        return f"line {rows.line_num}" if rows.line_num else None
    return None


def _any_multiline(table: pa.Table) -> bool:
    import pyarrow.compute as pc

    return any(
        (pa.types.is_string(col.type) or pa.types.is_large_string(col.type))
        and pc.any(pc.match_substring_regex(col, "[\r\n]")).as_py()
        for col in table.columns
    )


def _unclosed_quote_line(data: bytes, delimiter: str) -> int | None:
    """The line where a quoted value opens that runs to the end of the file, or None.

    A quote opens a quoted value only at the start of a field (as Arrow reads it); ``""`` inside is a quote.
    Only called when some value spans lines, so a clean file never pays for this scan.
    """
    text = data.decode("utf-8")
    sep = re.escape(delimiter)
    quoted = re.compile(f'(?:^|(?<=[{sep}\n]))"(?:[^"]|"")*("|\\Z)')
    for m in quoted.finditer(text):
        if not m.group(1):
            return text.count("\n", 0, m.start()) + 1
    return None


def _check_url(url: str | None) -> tuple[str, str | None]:
    if url is None:
        return "invalid_url", "url is null"
    if not url.strip():
        return "invalid_url", "url is empty"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return "invalid_url", f"cannot parse url: {e}"
    if parts.scheme.lower() not in ("http", "https"):
        return "invalid_url", f"unsupported scheme {parts.scheme!r}: only http and https"
    if not host:
        return "invalid_url", "url has no host"
    return "ok", None


def total_rows(specs: Iterable[ShardSpec]) -> int:
    return sum(s.rows for s in specs)
