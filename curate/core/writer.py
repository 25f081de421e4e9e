"""The end of every pipeline: one WebDataset tar, one parquet sidecar and one stats file per shard.

Where each goes is :class:`curate.core.output.OutputFolder`'s to say; what each holds is this module's:

shards/<id>.tar          <uid>.jpg|.png|.webp (if the row has an image), <uid>.json, <uid>.txt
                         for every kept row, in uid order, with fixed mtime and owner: byte-identical
                         on every rerun and executor. The json holds every column but the image and
                         the bulky ones (embeddings), which stay in the parquet. The txt is the
                         training caption that ``output.train_caption`` chooses (alt-text, VLM, fused
                         or a per-uid mix); every caption stays in the json and the parquet.
shards/<id>.parquet      every row of the shard, kept or dropped, every column but the image bytes.
dropped/<id>.tar         for audit: <uid>.jpg (a thumbnail, longest side 128 px) and <uid>.json (uid,
                         drop_reason) for every ok row with an image that a stage dropped, in uid order,
                         byte-identical on every rerun like the main tar; written even when empty, so every
                         finished shard has one. Kept out of shards/ so that globbing shards/*.tar (WebDataset,
                         Ray Data's read_webdataset on the folder) never trains on dropped images.
shards/<id>_stats.json   counts per status and drop reason, per-stage seconds; written last, so its
                         presence means the shard is complete.

With ``output.naming: img2dataset`` the parquet and the tar's json also carry img2dataset's columns
(:func:`img2dataset_columns`: ``key``, ``error_message``, ``original_width``, ``original_height``, ``exif``
beside curate's ``url``, ``caption``, ``width``, ``height``, ``sha256``), and the stats its fields
(:func:`img2dataset_stats`: ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
``duration``, ``start_time``, ``end_time``, ``status_dict``), so that code written for img2dataset's output
reads curate's. There ``status`` (in the parquet and the tar's json) holds img2dataset's outcome
(:func:`img2dataset_status`: ``success``, ``failed_to_download``, ``failed_to_resize``) and ``curate_status``
curate's own code (``ok``, ``http_404``, ...); curate's tools read sidecars through
:func:`curate.core.output.read_sidecar`, which gives curate's code back in ``status``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.output import CURATE_STATUS, OutputFolder
from curate.core.schema import COLUMNS, canonical_order, is_kept, reason_bucket
from curate.core.storage import write_atomic, write_json_atomic
from curate.kit.captions import TrainCaption

__all__ = [
    "IMG2DATASET_COLUMNS",
    "ShardWriter",
    "image_extension",
    "img2dataset_columns",
    "img2dataset_outward",
    "img2dataset_stats",
    "img2dataset_status",
    "shard_counts",
    "thumbnail",
]

MTIME = 0  # fixed member mtime: a rerun writes the same bytes
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 85

# img2dataset's columns that curate names otherwise (or lacks), added with output.naming: img2dataset.
IMG2DATASET_COLUMNS = ("key", "error_message", "original_width", "original_height", "exif")
# curate's statuses that img2dataset counts as failed_to_resize (its resizer refused or could not decode the
# image); every other non-ok status never got an image: failed_to_download.
_RESIZE_FAILURES = frozenset(
    {"not_an_image", "unsupported_format", "decode_error", "too_many_pixels", "too_small", "bad_aspect_ratio"}
)


def image_extension(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "bin"


def shard_counts(table: pa.Table) -> dict[str, Any]:
    """How many rows, ok, kept, and how many per status and per drop reason."""
    status = Counter(table["status"].to_pylist())
    reasons = Counter(reason_bucket(r) for r in table["drop_reason"].to_pylist() if r is not None)
    return {
        "rows": table.num_rows,
        "ok": status.get("ok", 0),
        "kept": pc.sum(is_kept(table).cast(pa.int64())).as_py() or 0,
        "status": dict(sorted(status.items(), key=lambda kv: str(kv[0]))),
        "drop_reason": dict(sorted(reasons.items())),
    }


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def img2dataset_status(status: str | None) -> str:
    """img2dataset's outcome for a curate status: ``success``, ``failed_to_resize`` (the image came but did
    not decode or pass the size and aspect checks) or ``failed_to_download`` (no image came)."""
    if status == "ok":
        return "success"
    return "failed_to_resize" if status in _RESIZE_FAILURES else "failed_to_download"


def img2dataset_columns(table: pa.Table) -> pa.Table:
    """The table with img2dataset's columns added after curate's: ``key`` (the sample's key in the tar: its
    uid), ``error_message`` (``error``), ``original_width``/``original_height`` (``orig_width``/``orig_height``)
    and ``exif`` (null: curate does not extract EXIF, as img2dataset with ``extract_exif=False``); ``width``,
    ``height`` and ``sha256`` as nulls where no download stage wrote them. Columns of an earlier write (a
    retried or grown shard comes back from its sidecar) are made again; an input's own ``key`` that is not
    the uid is kept as ``input_key``."""
    names = table.column_names
    if "key" in names:
        same = pc.all(pc.fill_null(pc.equal(table["key"], table["uid"]), False)).as_py() is not False
        if same or "input_key" in names:
            table = table.drop_columns(["key"])
        else:
            table = table.rename_columns(["input_key" if n == "key" else n for n in names])
    table = table.drop_columns([c for c in IMG2DATASET_COLUMNS if c in table.column_names])
    n = table.num_rows

    def column(name: str, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
        return table[name] if name in table.column_names else pa.nulls(n, kind)

    for name, kind in (("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string())):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(n, kind))
    for name, values in (
        ("key", table["uid"]),
        ("error_message", column("error", pa.string())),
        ("original_width", column("orig_width", pa.int32())),
        ("original_height", column("orig_height", pa.int32())),
        ("exif", pa.nulls(n, pa.string())),
    ):
        table = table.append_column(name, values)
    return table


def img2dataset_outward(table: pa.Table) -> pa.Table:
    """``status`` as img2dataset's outcome, curate's code moved to ``curate_status`` (the last column)."""
    codes = table["status"]
    outcomes = pa.array([img2dataset_status(s) for s in codes.to_pylist()], pa.string())
    table = table.set_column(table.column_names.index("status"), "status", outcomes)
    return table.append_column(CURATE_STATUS, codes)


def img2dataset_stats(table: pa.Table, stats: dict[str, Any], end_time: float) -> dict[str, Any]:
    """img2dataset's ``_stats.json`` fields for the shard: counts of its three outcomes, ``status_dict``
    (``success`` and each failure's error message, as img2dataset counts them), and times: ``duration`` is the
    shard's seconds in curate (reading and every stage), ending at ``end_time``."""
    outcomes = Counter(img2dataset_status(s) for s in table["status"].to_pylist())
    status_dict: Counter[str] = Counter()
    for status, error in zip(table["status"].to_pylist(), table["error"].to_pylist(), strict=True):
        status_dict["success" if status == "ok" else (error or status or "unknown")] += 1
    duration = sum(float(s.get("seconds", 0.0)) for s in stats.get("stages", {}).values())
    return {
        "count": table.num_rows,
        "successes": outcomes["success"],
        "failed_to_download": outcomes["failed_to_download"],
        "failed_to_resize": outcomes["failed_to_resize"],
        "duration": duration,
        "start_time": end_time - duration,
        "end_time": end_time,
        "status_dict": dict(status_dict.most_common()),
    }


class ShardWriter:
    def __init__(
        self,
        output_path: str,
        text_column: str = "caption",
        dropped_thumbnails: bool = True,
        train_caption: TrainCaption | None = None,
        naming: Literal["curate", "img2dataset"] = "curate",
    ):
        """``train_caption`` chooses each sample's <uid>.txt (see :class:`curate.kit.captions.TrainCaption`);
        without it, ``text_column`` is written as it is. ``naming="img2dataset"`` adds img2dataset's columns
        and stats fields (see the module docstring)."""
        self.output_path = output_path
        self.text_column = text_column
        self.dropped_thumbnails = dropped_thumbnails
        self.naming = naming
        self.train_caption = train_caption or TrainCaption("column", text_column)

    def paths(self, shard_id: str) -> dict[str, str]:
        """The shard's files by kind (``tar``, ``parquet``, ``dropped``, ``stats``): see
        :meth:`curate.core.output.OutputFolder.shard_files`."""
        return OutputFolder(self.output_path).shard_files(shard_id)

    def write(self, shard_id: str, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's files (stats last) and return the stats as written."""
        out = OutputFolder(self.output_path)
        fs, paths = out.fs, out.shard_files(shard_id)
        fs.makedirs(out.shards_dir, exist_ok=True)
        if self.dropped_thumbnails:
            fs.makedirs(out.dropped_dir, exist_ok=True)
        if self.naming == "img2dataset":
            table = img2dataset_columns(table)
        # Schema metadata (pandas', an earlier phase's) would make the bytes depend on where a shard came from.
        table = table.select(canonical_order(table.column_names)).replace_schema_metadata(None)
        # An input image the download stage did not take (a row it never saw) is no output.
        table = table.drop_columns([c for c in ("source_image",) if c in table.column_names])

        tar_bytes, samples = self._tar(table)
        dropped_bytes, thumbnails = _dropped_tar(table) if self.dropped_thumbnails else (b"", 0)
        sidecar = table.drop_columns([c for c in ("image",) if c in table.column_names])
        if self.naming == "img2dataset":
            sidecar = img2dataset_outward(sidecar)
        buf = io.BytesIO()
        pq.write_table(sidecar, buf, compression="zstd")
        write_atomic(fs, paths["tar"], tar_bytes)
        write_atomic(fs, paths["parquet"], buf.getvalue())
        if self.dropped_thumbnails:
            write_atomic(fs, paths["dropped"], dropped_bytes)

        final = {"shard": shard_id, **shard_counts(table), **stats}
        final["written"] = {
            "samples": samples,
            "tar_bytes": len(tar_bytes),
            "parquet_bytes": buf.tell(),
            "dropped_thumbnails": thumbnails,
            "dropped_tar_bytes": len(dropped_bytes),
        }
        if self.naming == "img2dataset":
            final |= img2dataset_stats(table, stats, time.time())
        write_json_atomic(fs, paths["stats"], final)
        return final

    def _tar(self, table: pa.Table) -> tuple[bytes, int]:
        kept = table.filter(is_kept(table))
        kept = kept.take(pc.sort_indices(kept, [("uid", "ascending")]))
        texts = self.train_caption.texts(kept)
        if self.naming == "img2dataset":
            kept = img2dataset_outward(kept)
        meta_cols = [
            c for c in kept.column_names if c != "image" and (c not in COLUMNS or COLUMNS[c].in_json)
        ]
        images = kept["image"].to_pylist() if "image" in kept.column_names else [None] * kept.num_rows
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i, row in enumerate(kept.select(meta_cols).to_pylist()):
                uid = row["uid"]
                members = {
                    f"{uid}.json": json.dumps(
                        {k: _json_value(v) for k, v in row.items()}, sort_keys=True, ensure_ascii=False
                    ).encode(),
                    f"{uid}.txt": texts[i].encode("utf-8", "replace"),
                }
                if images[i] is not None:
                    members[f"{uid}.{image_extension(images[i])}"] = images[i]
                for name in sorted(members):
                    _add(tar, name, members[name])
        return out.getvalue(), kept.num_rows


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> bytes | None:
    """A small RGB JPEG of encoded image bytes (longest side at most ``side``, never enlarged); None when
    the bytes do not decode. Deterministic: the same bytes give the same thumbnail."""
    from PIL import Image

    from curate.kit.imaging import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = to_rgb(img)  # a JPEG stays lazy here, so thumbnail() can decode it at a reduced scale
            img.thumbnail((side, side))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return out.getvalue()


def _dropped_tar(table: pa.Table) -> tuple[bytes, int]:
    """The audit tar: a thumbnail and (uid, drop_reason) of every ok row with an image that was dropped."""
    out = io.BytesIO()
    written = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if "image" in table.column_names:
            ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
            hit = pc.and_(pc.and_(ok, pc.is_valid(table["drop_reason"])), pc.is_valid(table["image"]))
            rows = table.select(["uid", "drop_reason", "image"]).filter(hit)
            rows = rows.take(pc.sort_indices(rows, [("uid", "ascending")]))
            for row in rows.to_pylist():
                small = thumbnail(row["image"])
                meta = {"uid": row["uid"], "drop_reason": row["drop_reason"]}
                if small is not None:
                    _add(tar, f"{row['uid']}.jpg", small)
                    written += 1
                _add(tar, f"{row['uid']}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    return out.getvalue(), written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
