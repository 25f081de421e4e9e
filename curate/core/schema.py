"""Every column of a curate table, declared once: name, Arrow type, the stage that writes it, its meaning.

A shard travels through the pipeline as one Arrow table with one row per input sample. The input reader
writes the core columns, declared here; each stage carries the columns it adds as class data
(``Stage.columns``), and :func:`curate.core.registry.register` declares them when it registers the stage, so
``COLUMNS`` is complete once the registry is imported. Input columns that are not declared (LAION's
``similarity``, ``punsafe``, ...) are carried along untouched, after the declared ones.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

__all__ = [
    "COLUMNS",
    "Column",
    "canonical_order",
    "declare",
    "is_kept",
    "normalise_caption",
    "normalise_url",
    "reason_bucket",
    "uid_for",
    "uid_for_source",
]


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    writer: str
    doc: str
    in_json: bool = True  # False for bulky columns (embeddings): kept in the parquet sidecar only


COLUMNS: dict[str, Column] = {}


def declare(column: Column) -> Column:
    """Add a column to the schema (the registry does, for each column of a stage it registers). Declaring
    the same name twice with another type is an error; the first declaration keeps its place, which is the
    column's place in every written table (:func:`canonical_order`)."""
    existing = COLUMNS.get(column.name)
    if existing is not None and existing.type != column.type:
        raise ValueError(
            f"column {column.name!r} is already declared as {existing.type} by {existing.writer!r}"
        )
    COLUMNS.setdefault(column.name, column)
    return COLUMNS[column.name]


# The core columns: written by the input reader, and the image columns of the download stage. The download
# stage's own extras (mime, phash) are in Download.columns.
for _c in [
    # Written by the input reader.
    Column("uid", pa.string(), "input", "stable id: see uid_for(); same input, same uid, on every run"),
    Column(
        "input_index", pa.int64(), "input", "position of the row in the whole input (files in sorted order)"
    ),
    Column("url", pa.string(), "input", "image URL, from the input's url column"),
    Column(
        "caption",
        pa.string(),
        "input",
        "alt-text, from the input's caption column: mojibake and HTML entities repaired, NFC, control "
        "characters removed, cut to input.max_caption_chars (see curate.core.reader.clean_caption)",
    ),
    Column("status", pa.string(), "input", "'ok', or the reason code of the first failure"),
    Column("error", pa.string(), "input", "human-readable detail of a non-ok status; null when ok"),
    Column(
        "drop_reason", pa.string(), "input", "null while kept; else the first filter that dropped the row"
    ),
    Column(
        "caption_truncated",
        pa.bool_(),
        "input",
        "true when the input caption was longer than input.max_caption_chars and was cut",
    ),
    Column(
        "caption_repaired",
        pa.bool_(),
        "input",
        "true when ftfy repaired mojibake or HTML entities in the input caption (curate.core.reader.repair_caption)",
    ),
    # Written by the input reader for inputs that carry their images (curate.core.sources).
    Column(
        "source",
        pa.string(),
        "input",
        "where an image that came with the input was read: <tar>#<key>, a file's path, <parquet>#<row>",
    ),
    Column(
        "source_image",
        pa.binary(),
        "input",
        "image bytes that came with the input; the download stage takes them instead of fetching (never "
        "written)",
        in_json=False,
    ),
    # Written by the download stage.
    Column("image", pa.binary(), "download", "the re-encoded image bytes (never written to parquet)"),
    Column("width", pa.int32(), "download", "width of the stored image"),
    Column("height", pa.int32(), "download", "height of the stored image"),
    Column("orig_width", pa.int32(), "download", "width of the downloaded image"),
    Column("orig_height", pa.int32(), "download", "height of the downloaded image"),
    Column("sha256", pa.string(), "download", "sha256 of the downloaded bytes"),
]:
    declare(_c)

CORE_COLUMNS = (
    "uid",
    "input_index",
    "url",
    "caption",
    "status",
    "error",
    "drop_reason",
    "caption_truncated",
    "caption_repaired",
)


def canonical_order(names: list[str]) -> list[str]:
    """Declared columns in declaration order first, then the rest (input columns) in their given order."""
    declared = [n for n in COLUMNS if n in names]
    return declared + [n for n in names if n not in COLUMNS]


# --- uid ---------------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
# White space to fold: runs of two or more, and any single white space other than " " (which already is
# what a run folds to). Matching single spaces too gives the same string, but a 10 MB caption of words
# would then cost millions of match pieces: 150 MB to hash one caption.
_WS = re.compile(r"\s{2,}|[^\S ]")


def normalise_url(url: str) -> str:
    """The URL as it is hashed into the uid.

    Surrounding white space is removed, the scheme and host are lower-cased, a default port (:80 for http,
    :443 for https) and the fragment are dropped. Path and query are kept exactly: they are case-sensitive.
    Raises ValueError for a string that does not split as a URL.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    if parts.hostname is not None:
        host = parts.hostname.lower()
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        port = parts.port  # raises ValueError on a bad port
        userinfo = netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + host
        if port is not None and port != _DEFAULT_PORTS.get(scheme):
            netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path, parts.query, ""))


def normalise_caption(caption: str | None) -> str:
    """The caption as it is hashed into the uid: NFC, white space runs folded to one space, stripped."""
    if caption is None:
        return ""
    return _WS.sub(" ", unicodedata.normalize("NFC", caption)).strip()


def uid_for(url: str | None, caption: str | None) -> str:
    """The sample's stable id.

    ``sha256(normalise_url(url) + "\\n" + normalise_caption(caption))`` as hex, first 32 characters
    (128 bits). A URL that does not parse is hashed as given (stripped); a null URL as the empty string.
    Identical (url, caption) pairs share a uid: the reader marks repeats within a shard. The reader passes
    the caption as read from the input, before its cleaning and length cut, so uids stay as they were
    before the reader cleaned captions.
    """
    if url is None:
        norm = ""
    else:
        try:
            norm = normalise_url(url)
        except ValueError:
            norm = url.strip()
    digest = hashlib.sha256((norm + "\n" + normalise_caption(caption)).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def uid_for_source(source: str, caption: str | None) -> str:
    """The id of a sample whose image came with the input and has no URL: from where it was read
    (``<tar>#<key>``, a file's path relative to the input's root) and its caption, hashed as
    :func:`uid_for` hashes a URL but without URL normalisation (which would drop ``#<key>``)."""
    digest = hashlib.sha256(
        ("source:" + source + "\n" + normalise_caption(caption)).encode("utf-8", "surrogatepass")
    )
    return digest.hexdigest()[:32]


# --- reasons -----------------------------------------------------------------------------------------

_UID_SUFFIX = re.compile(r":[0-9a-f]{32}$")


def reason_bucket(reason: str) -> str:
    """The reason without a trailing ``:<uid>``, so ``duplicate:exact:<uid>`` counts as ``duplicate:exact``."""
    return _UID_SUFFIX.sub("", reason)


def is_kept(table: pa.Table) -> pa.ChunkedArray:
    """Boolean mask of rows that are ok and not dropped: the rows that go into the WebDataset tar."""
    import pyarrow.compute as pc

    ok = pc.equal(table["status"], "ok")
    return pc.and_kleene(pc.fill_null(ok, False), pc.is_null(table["drop_reason"]))
