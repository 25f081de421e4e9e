"""Download, check and resize the image of every kept row, many at a time.

Rows whose image came with the input (WebDataset tars, image folders, a parquet image column: see
:mod:`curate.core.sources`) are not fetched: their bytes go through the same processing as downloaded ones
(the checks below, resize and re-encode, sha256 of the original bytes, pHash), with the same statuses.

One pool of ``concurrency`` download threads per worker, made in ``setup()``, serves every shard of that
worker. The stage overlaps shards (``overlaps_shards``, see :mod:`curate.executors.base`): the executors start
the next shards' downloads (up to ``shards_in_flight`` shards at once) while the current shard's slowest URLs
finish. The pool serves URLs in the order they were queued, and each shard is queued once the one before it is
under way, so its URLs take the sockets the earlier shards free: never more than ``concurrency`` sockets open
per worker, and none idle while a shard waits on its tail. Each row's result depends on its URL alone, so a
shard's output is the same whichever shard's URLs ran beside it.

Status codes (every row ends with exactly one; only ``ok`` rows carry an image):

=====================  ==========================================================================
``ok``                 downloaded (or taken from the input), decoded, resized and re-encoded
``invalid_url``        (input) null, empty or unparseable URL, or a scheme other than http(s)
``duplicate_row``      (input) the same url and caption as an earlier row of the shard (for images
                       that came with the input: the same source and caption, or a tar key repeated)
``no_image``           (input) a WebDataset sample without an image member, a null image column
``read_error``         (input) the input's file or tar member could not be read
``bad_metadata``       (input) a WebDataset sample's json is not a JSON object
``blocked_address``    the host resolves to a non-public address, or a redirect leads to one or to
                       another scheme; no connection is made
``opted_out``          robots.txt disallows the path or answers 5xx, ``X-Robots-Tag`` says noai /
                       noimageai / noindex / noimageindex, or W3C TDMRep reserves TDM rights (the
                       ``tdm-reservation: 1`` header or a rule of ``/.well-known/tdmrep.json``);
                       ``error`` names the rule
``http_<code>``        the final HTTP status was not 200 (4xx at once; 429 and 5xx after retries, waiting
                       as ``Retry-After`` asks; at once when it asks past the deadline)
``too_many_redirects`` more than ``max_redirects`` hops
``timeout``            connect or read timeout, or the total deadline per URL passed (after retries),
                       however slowly the status line, headers or body trickle in; also a turn at a busy
                       host (``max_per_host``, ``per_host_rate``) that did not come within the deadline
``tls_error``          the TLS handshake failed: a certificate that does not verify (unknown CA,
                       expired) or names another host; ``error`` gives OpenSSL's reason; not retried
``connection_error``   refused (by every address of the host), reset, DNS failure (after retries, except
                       DNS), a proxy that refuses the CONNECT, a response that
                       is not HTTP or has too many or too long headers, a body shorter than its
                       Content-Length; also when the host's robots.txt could not be reached
``too_large``          Content-Length or the streamed body exceeded ``max_bytes``
``not_an_image``       the bytes are no image format (HTML served as image/jpeg, ...)
``unsupported_format`` an image format not in ``formats``
``decode_error``       truncated or corrupt image data
``too_many_pixels``    width x height above ``max_pixels``: a decompression bomb, refused unread; or a
                       stored size above it or above the encoder's side limit (1 x 60,000 under
                       keep_ratio), refused before decoding
``too_small``          smaller side below ``min_image_size``
``bad_aspect_ratio``   aspect ratio above ``max_aspect_ratio``
=====================  ==========================================================================
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

import curate
from curate.base import StrictModel
from curate.core.schema import Column, is_kept
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.imaging import ImageOptions, Processed, accept_header, process
from curate.kit.net import Fetcher, FetchPolicy, parse_proxy

DEFAULT_USER_AGENT = f"curate/{curate.__version__} (+https://github.com/curate-data/curate#readme)"
TRANSIENT_STATUSES = ("timeout", "connection_error", "http_429", "http_5xx")
ROWS_IN_FLIGHT = 4000  # rows a worker downloads at once by default, across shards (shards_in_flight)


class DownloadConfig(StrictModel):
    concurrency: int = Field(32, gt=0, le=1024, description="parallel downloads per worker")
    shards_in_flight: int | None = Field(
        None,
        ge=1,
        le=64,
        description="shards per worker whose downloads run at once, sharing its `concurrency` sockets: the one "
        "being finished and those queued behind it, so the slowest hosts of one shard leave no socket idle. "
        "Default: enough shards for about 4,000 rows, at least 2 and at most 8 (500-row shards: 8; 10,000-row "
        "shards: 2, as each shard's own rows outlast a slow host's tail). Each holds its images in memory "
        "until written; 1 takes shards one at a time",
    )
    decode_threads: int | None = Field(
        None, gt=0, description="images decoded at once per worker (default: its CPU count); bounds memory"
    )
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(10.0, gt=0, description="seconds of silence allowed on a socket read")
    total_timeout: float = Field(30.0, gt=0, description="deadline per URL, retries and redirects included")
    max_bytes: int = Field(20 << 20, gt=0)
    retries: int = Field(2, ge=0, description="for timeouts, connection errors, 429 and 5xx only")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry; doubles each time")
    max_redirects: int = Field(5, ge=0, le=5)
    user_agent: str = DEFAULT_USER_AGENT
    robots_txt: bool = Field(True, description="honour robots.txt (RFC 9309; fetched once per origin)")
    x_robots_tag: bool = Field(
        True, description="honour X-Robots-Tag: noai, noimageai, noindex, noimageindex"
    )
    tdmrep: bool = Field(
        True,
        description="honour W3C TDMRep: the tdm-reservation header and /.well-known/tdmrep.json (once per "
        "origin)",
    )
    allow_private: list[str] = Field(
        default_factory=list, description="host:port entries exempt from the SSRF guard"
    )
    dns_cache_ttl: float = Field(
        300.0, ge=0, description="seconds a worker reuses a host's resolved addresses; 0: resolve every time"
    )
    max_per_host: int = Field(16, gt=0, description="connections to one host at once, per worker")
    per_host_rate: float | None = Field(
        None, gt=0, description="new requests to one host a second, per worker (default: no limit)"
    )
    proxy: str | None = Field(
        None,
        description="http://[user:password@]host:port carrying http and https (CONNECT) requests; unset: "
        "HTTP_PROXY / HTTPS_PROXY of the environment",
    )
    proxy_env: bool = Field(
        True, description="use HTTP_PROXY, HTTPS_PROXY and NO_PROXY (or lower case) of the environment"
    )
    ca_bundle: str | None = Field(
        None,
        description="PEM file of the CAs to trust instead of the system's (default: SSL_CERT_FILE or "
        "the system store)",
    )
    formats: list[Literal["jpeg", "png", "webp", "gif", "avif", "heic", "bmp", "tiff"]] = [
        "jpeg",
        "png",
        "webp",
        "gif",
        "avif",
        "heic",
    ]
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    resample: Literal["area", "lanczos", "bicubic"] = Field(
        "area", description="area: pixel averaging to shrink, Lanczos to enlarge (as img2dataset)"
    )
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, ge=1)
    max_pixels: int = Field(50_000_000, gt=0, description="decompression bomb limit, checked before decoding")
    encode_format: Literal["jpg", "webp", "png", "original"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    perceptual_hash: bool = Field(
        True,
        description="write the pHash of the original image (phash, phash_mirror), which perceptual dedup, "
        "decontamination and pHash blocklists compare; false: those columns stay null and a JPEG at least "
        "twice the stored size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling; without pdq): "
        "about 40% less CPU per image on 1-megapixel photos stored at 256 px (11 -> 6.7 ms)",
    )
    pdq: bool = Field(
        False,
        description="also write Meta's PDQ hash of the original image (pdq, pdq_quality), for PDQ hash lists; "
        "needs the pdq extra (pdqhash); about 4 ms of CPU a 0.3-megapixel photo, 30 ms at 3 megapixels",
    )

    @field_validator("pdq")
    @classmethod
    def _pdqhash_installed(cls, on: bool) -> bool:
        if on:
            try:
                import pdqhash  # noqa: F401
            except ImportError:
                raise ValueError("pdq: true needs the pdqhash package: pip install 'curate[pdq]'") from None
        return on

    @field_validator("allow_private")
    @classmethod
    def _host_port(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            host, sep, port = entry.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{entry!r} is not host:port, e.g. 127.0.0.1:8080")
        return entries

    @field_validator("proxy")
    @classmethod
    def _http_proxy(cls, proxy: str | None) -> str | None:
        if proxy:
            parse_proxy(proxy)  # its ValueError names what is wrong
        return proxy or None

    @model_validator(mode="after")
    def _original_is_not_resized(self) -> DownloadConfig:
        if self.encode_format == "original" and self.resize_mode != "no":
            raise ValueError("encode_format: original keeps the downloaded bytes; it needs resize_mode: no")
        return self


def _pick(cls: type, config: StrictModel):
    """An instance of the dataclass ``cls`` from the config fields of the same names (lists as tuples)."""
    values = config.model_dump()
    return cls(**{f.name: _frozen(values[f.name]) for f in dataclasses.fields(cls) if f.name in values})


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas before the download threads start. glibc gives every thread that allocates
    an arena of its own (up to 8 per core), and memory freed by dozens of download threads stays spread over
    them: with 32 threads, peak memory fell from about 600 to 370 MiB (PSS) and throughput rose
    (benchmarks/RESULTS.md). Only tuning: elsewhere than glibc it does nothing and returns False."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8 is M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class Download(Stage):
    name = "download"
    Config = DownloadConfig
    # Its other columns (image, width, ..., sha256) are core columns, declared in curate.core.schema.
    columns = (
        Column("mime", pa.string(), "download", "MIME type of the downloaded bytes, from their magic number"),
        Column(
            "phash",
            pa.string(),
            "download",
            "64-bit DCT perceptual hash of the original image, 16 hex digits: imagehash's phash, bit for bit "
            "(curate.kit.hashing.phash)",
        ),
        Column(
            "phash_mirror",
            pa.string(),
            "download",
            "phash of the original image mirrored left to right: flips match",
        ),
        Column("md5", pa.string(), "download", "md5 of the downloaded bytes (for MD5 hash lists)"),
        Column(
            "pdq",
            pa.string(),
            "download",
            "Meta's PDQ hash of the original image, 64 hex digits (download.pdq: true)",
        ),
        Column("pdq_quality", pa.int32(), "download", "PDQ's quality of the hash, 0-100 (below 50: weak)"),
        Column(
            "pdq_dihedral",
            pa.list_(pa.string()),
            "download",
            "PDQ hashes of the original rotated by 90, 180, 270 and flipped (PDQ's dihedral hashes; sidecar "
            "only): blocklists find rotated and flipped copies",
            in_json=False,
        ),
    )
    reads = ("url", "status", "drop_reason")
    resources = StageResources(cpus=1)
    overlaps_shards = True  # thread-safe, one socket budget per worker: see the module docstring

    config: DownloadConfig

    @property
    def writes(self) -> tuple[str, ...]:
        """Each is the field of the same name of curate.kit.imaging.Processed."""
        always = (
            "status",
            "error",
            "image",
            "width",
            "height",
            "orig_width",
            "orig_height",
            "sha256",
            "md5",
            "mime",
            "phash",
            "phash_mirror",
        )
        return always + (("pdq", "pdq_quality", "pdq_dihedral") if self.config.pdq else ())

    @property
    def leaves_null(self) -> dict[str, str]:
        """Without ``perceptual_hash`` the pHash columns are written, null: a later stage that compares them
        (perceptual dedup, decontamination, a pHash blocklist) is a config error."""
        off = "perceptual_hash: false"
        return {} if self.config.perceptual_hash else {"phash": off, "phash_mirror": off}

    def shards_in_flight(self, shard_rows: int) -> int:
        """Shards of ``shard_rows`` rows one worker downloads at once
        (:func:`curate.executors.base.shards_in_flight`): the config's, or as many as hold ``ROWS_IN_FLIGHT``
        rows, 2 to 8. Small shards (whose downloads take less time than a slow host's answer) then still keep
        the sockets busy, and the images held beyond the usual two shards stay bounded by rows."""
        if self.config.shards_in_flight is not None:
            return self.config.shards_in_flight
        return min(8, max(2, math.ceil(ROWS_IN_FLIGHT / max(1, shard_rows))))

    def setup(self) -> None:
        c = self.config
        decoders = c.decode_threads or os.cpu_count() or 1
        self._decoders = threading.BoundedSemaphore(decoders)
        limit_malloc_arenas(max(2, decoders))
        policy = dataclasses.replace(_pick(FetchPolicy, c), accept=accept_header(c.formats))
        self._fetcher = Fetcher(policy)
        self._image = _pick(ImageOptions, c)
        # The worker's sockets, shared by every shard it runs (FIFO: a shard's URLs before the next one's).
        self._sockets = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="curate-download")

    def _one(self, url: str | None, given: bytes | None = None) -> Processed:
        if given is not None:  # the image came with the input: no fetch, the same processing
            with self._decoders:
                return process(given, self._image)
        fetched = self._fetcher.fetch((url or "").strip())
        if fetched.status != "ok":
            return Processed(fetched.status, fetched.error)
        # Many threads wait on sockets; only as many as there are cores decode at once. Decoded pixels are
        # the big allocations, and more decoders than cores only fight over the GIL.
        with self._decoders:
            return process(fetched.body or b"", self._image)

    def __call__(self, table: pa.Table) -> pa.Table:
        todo = [i for i, keep in enumerate(is_kept(table).to_pylist()) if keep]
        urls = table["url"].to_pylist()
        given = (
            table["source_image"].to_pylist()
            if "source_image" in table.column_names
            else [None] * table.num_rows
        )
        futures = [self._sockets.submit(self._one, urls[i], given[i]) for i in todo]
        try:
            results = {i: f.result() for i, f in zip(todo, futures, strict=True)}
        except BaseException:  # a bug, or Ctrl-C: the shard's queued URLs leave the next shard's way
            for f in futures:
                f.cancel()
            raise
        if "source_image" in table.column_names:  # taken: from here on the stored image is the image
            table = table.drop_columns(["source_image"])

        # Rows not downloaded keep their status and error, and get nulls in the other columns.
        out = {name: [None] * table.num_rows for name in self.writes}
        out["status"], out["error"] = table["status"].to_pylist(), table["error"].to_pylist()
        for i, r in results.items():
            for name, values in out.items():
                values[i] = getattr(r, name)
        for name, values in out.items():
            table = set_column(table, name, values)
        return table
