"""Write the seed corpus of every harness into fuzz/corpus/<harness>/ (deterministic; a few KB each).

Run: ``python fuzz/make_seeds.py``. The seeds are small valid inputs of each kind (so the fuzzer starts from
the success path) and a few edge cases; findings' crashing inputs are kept next to them as regression seeds
(``finding-*`` files, written by hand, not by this script).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CORPUS = Path(__file__).resolve().parent / "corpus"


def _img(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "RGBA", "CMYK"):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        return Image.fromarray(arr, mode)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8), "L").convert("P")
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
        return img
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels and holds none: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")


def image_seeds() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: displayed as 8x24
    frames = [_img("P", (8, 8), s) for s in (1, 2)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette = _img("P", (10, 10))
    # b0: resize mode (b0 % 5), encode format ((b0 // 5) % 4), 0x40 narrows formats, 0x80 only-if-bigger;
    # b1: resample (b1 % 3), image_size ((b1 // 3) % 4), min_image_size and max_aspect_ratio (high bits).
    return {
        "jpeg_rgb": bytes([4, 6]) + _save(_img("RGB", (16, 12)), "JPEG", quality=80),
        "jpeg_exif_rotated": bytes([11, 9]) + _save(_img("RGB", (24, 8), 1), "JPEG", exif=exif.tobytes()),
        "png_palette_transparency": bytes([8, 3]) + _save(palette, "PNG", transparency=0),
        "png_16bit": bytes([2, 7]) + _save(_img("I;16", (9, 7)), "PNG"),
        "png_rgba": bytes([0, 1]) + _save(_img("RGBA", (7, 5)), "PNG"),
        "webp_original": bytes([15, 0]) + _save(_img("RGB", (12, 12)), "WEBP", quality=50),
        "gif_animated": bytes([4, 10]) + gif.getvalue(),
        "bmp_gray": bytes([1, 4]) + _save(_img("L", (5, 3)), "BMP"),
        "tiff_cmyk": bytes([9, 5]) + _save(_img("CMYK", (6, 6)), "TIFF"),
        "gif_tall_aspect": bytes([1, 0x80 | 6]) + _save(_img("P", (1, 60)), "GIF"),
        "png_bomb_header": bytes([4, 6]) + _png_header_only(100_000, 100_000),
        "html": bytes([4, 6]) + b"<!doctype html><html><body>not found</body></html>",
    }


def _tar(members: list[tuple[str, bytes]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def tar_seeds() -> dict[str, bytes]:
    a, b = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
    meta_a = {"uid": a, "caption": "a red square", "width": 12, "height": 10, "clip_score": 0.31}
    meta_b = {"uid": b, "caption": "two cats", "width": 9, "height": 7, "clip_score": 0.2}
    members = [
        (f"{a}.jpg", _save(_img("RGB", (12, 10)), "JPEG", quality=70)),
        (f"{a}.json", json.dumps(meta_a).encode()),
        (f"{a}.txt", b"a red square"),
        (f"{b}.json", json.dumps(meta_b).encode()),
        (f"{b}.png", _save(_img("L", (9, 7), 3), "PNG")),
        (f"{b}.txt", "deux chats \u00e9".encode()),
    ]
    return {
        "shard": _tar(members),
        "shard_gz": _tar(members, compress=True),
        "shard_webp_and_skipped": _tar(
            [("c.webp", _save(_img("RGB", (8, 8)), "WEBP")), ("c.pth", b"\x80\x04K\x01."), ("c.json", b"{}")]
        ),
        "empty": b"\0" * 1024,
        # finding 8: a json caption that is no string reached the text encoder
        "hostile_caption_not_a_string": _tar([("d.json", b'{"caption": 5, "caption_vlm": [1]}')]),
    }


def caption_seeds() -> dict[str, bytes]:
    # byte 0: mode (b % 3: utf-8 surrogateescape, utf-16-le surrogatepass, latin-1), max_chars ((b // 3) % 6).
    return {
        "ascii": bytes([0]) + b"a photo of a dog on the beach",
        "nfd_cut": bytes([9]) + "cafe\u0301 A\u030angstro\u0308m".encode(),
        "controls": bytes([12]) + "a\x00b\x07c\x1b[31md\x7fe\u0085f\tg\nh\r\ni".encode(),
        "hangul_jamo": bytes([3]) + "\u1100\u1161\u11a8 \ud55c".encode(),
        "utf16_surrogates": bytes([1]) + "x\ud800y\U0001f600".encode("utf-16-le", "surrogatepass"),
        "latin1_c1": bytes([2]) + bytes(range(0x7A, 0xA5)),
        "bad_utf8": bytes([6]) + b"ok \xff\xfe \xc3\x28 \xed\xa0\x80 end",
    }


def input_seeds() -> dict[str, bytes]:
    # byte 0: suffix (b % 7: csv, tsv, jsonl, parquet, csv.gz, jsonl.gz, txt); byte 1: config (bit 0: no
    # caption column, (b >> 1) % 3: max_caption_chars, (b >> 3) % 4: shard size).
    rows = [
        ("http://a.org/1.jpg", "one", 1),
        ("https://b.org/2.png", "two, with a comma", 2),
        ("http://a.org/1.jpg", "one", 3),
        (None, "no url", 4),
        ("ftp://c.org/x", "caf\u00e9\nline", 5),
    ]
    csv = "url,caption,n\n" + "".join(f'{u or ""},"{c}",{n}\n' for u, c, n in rows)
    tsv = "url\tcaption\tn\n" + "".join(f"{u or ''}\t{c.replace(chr(10), ' ')}\t{n}\n" for u, c, n in rows)
    jsonl = "".join(json.dumps({"url": u, "caption": c, "n": n}) + "\n" for u, c, n in rows)
    pbuf = io.BytesIO()
    table = pa.table(
        {"url": [r[0] for r in rows], "caption": [r[1] for r in rows], "n": [r[2] for r in rows]}
    )
    pq.write_table(table, pbuf, row_group_size=2)
    return {
        "csv": bytes([0, 2 << 3]) + csv.encode(),
        "tsv": bytes([1, 1 << 1]) + tsv.encode(),
        "jsonl": bytes([2, 3 << 3]) + jsonl.encode(),
        "parquet": bytes([3, 1 << 3]) + pbuf.getvalue(),
        "csv_gz": bytes([4, 0]) + gzip.compress(csv.encode(), mtime=0),
        "jsonl_gz": bytes([5, 1 << 1]) + gzip.compress(jsonl.encode(), mtime=0),
        "txt": bytes([6, 1]) + b"http://a.org/1.jpg\n\n  http://a.org/2.jpg  \n",
        # finding 6: a repeated column name raised KeyError; finding 7: a JSON object as url, ArrowNotImplemented
        "hostile_repeated_column": bytes([0, 0]) + b"url,caption,url\nhttp://a.org/1,x,http://a.org/2\n",
        "hostile_object_url": bytes([2, 0]) + b'{"url": {"a": 1}, "caption": "x"}\n',
    }


SEEDS = {"image": image_seeds, "tar": tar_seeds, "caption": caption_seeds, "input": input_seeds}


def main() -> None:
    total = 0
    for harness, make in SEEDS.items():
        folder = CORPUS / harness
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / f"seed-{name}").write_bytes(data)
            total += len(data)
    print(f"wrote {sum(len(m()) for m in SEEDS.values())} seeds, {total:,} bytes, under {CORPUS}")


if __name__ == "__main__":
    main()
