"""Decode, check, normalise, resize and re-encode downloaded images.

The order matters for safety and speed: the format is checked from the magic bytes, the dimensions are read
from the header and a decompression bomb is refused before any pixel is decoded. The pHash (and PDQ) are of
the original at full size, so a JPEG is decoded at full size when they are asked for; without them
(``perceptual_hash`` off, ``pdq`` off) a JPEG much larger than its stored size is decoded at 1/2, 1/4 or 1/8
scale (libjpeg's DCT scaling, :func:`_draft`), most of the decoding work saved.

AVIF is decoded by Pillow itself (11.3 and later); HEIC/HEIF by pillow-heif, whose opener is registered
with Pillow the first time a HEIF file is seen (:func:`_heif_opener`), so that a run without one never
imports it. :func:`accept_header` turns the formats a run decodes into the ``Accept`` header it sends, so
that a server that negotiates (a CDN choosing AVIF, WebP or JPEG for a client) picks one of them.

Resize modes follow img2dataset: ``no``; ``keep_ratio`` (the smaller side becomes ``image_size``);
``keep_ratio_largest`` (the larger side does); ``center_crop`` (smaller side, then a centred square);
``border`` (larger side, then black borders to a square).
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from curate.kit.hashing import pdq_dihedral, phashes

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
EncodeFormat = Literal["jpg", "webp", "png", "original"]
Resample = Literal["area", "lanczos", "bicubic"]

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"GIF87a", "gif", "image/gif"),
    (b"GIF89a", "gif", "image/gif"),
    (b"BM", "bmp", "image/bmp"),
    (b"II*\x00", "tiff", "image/tiff"),
    (b"MM\x00*", "tiff", "image/tiff"),
)


# ISO base media files (HEIF and AVIF) open with an ``ftyp`` box: a major brand and compatible brands.
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
MIME_TYPES = {
    "jpeg": ("image/jpeg",),
    "png": ("image/png",),
    "webp": ("image/webp",),
    "gif": ("image/gif",),
    "bmp": ("image/bmp",),
    "tiff": ("image/tiff",),
    "avif": ("image/avif",),
    "heic": ("image/heic", "image/heif"),
}


def _ftyp_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO BMFF ``ftyp`` box at the start of ``data`` (empty if none)."""
    if data[4:8] != b"ftyp":
        return set()
    size = int.from_bytes(data[:4], "big")
    end = min(size if 16 <= size <= 4096 else 16, len(data))
    return {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}


def sniff(data: bytes) -> tuple[str, str] | None:
    """(format, mime) from the magic bytes, or None when the bytes are no image format we know."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    for magic, fmt, mime in _MAGIC:
        if data.startswith(magic):
            return fmt, mime
    brands = _ftyp_brands(data[:4096])
    if brands & _AVIF_BRANDS:  # before HEIF: an AVIF file lists mif1 too
        return "avif", "image/avif"
    if brands & _HEIF_BRANDS:
        return "heic", "image/heic"
    return None


def accept_header(formats: tuple[str, ...] | list[str]) -> str:
    """The ``Accept`` header for a run that decodes ``formats``: their MIME types, then anything else at a
    low weight, so that a server that cannot negotiate still answers (with what it has)."""
    types = [mime for fmt in formats for mime in MIME_TYPES[fmt]]
    return ",".join([*types, "*/*;q=0.1"])


@functools.cache
def _heif_opener() -> None:
    """Register pillow-heif's HEIF opener with Pillow, once per process (AVIF needs none: Pillow has it)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    resample: Resample = "area"
    min_image_size: int = 0
    max_aspect_ratio: float | None = None
    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif")
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    perceptual_hash: bool = True
    pdq: bool = False


@dataclass
class Processed:
    status: str
    error: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    sha256: str | None = None
    md5: str | None = None
    mime: str | None = None
    phash: str | None = None
    phash_mirror: str | None = None
    pdq: str | None = None
    pdq_quality: int | None = None
    pdq_dihedral: list[str] | None = None


def process(data: bytes, opt: ImageOptions) -> Processed:
    """Everything from downloaded bytes to the stored image, with the status of the taxonomy.

    The hashes are of the original: sha256 and md5 of the bytes; pHash (and PDQ) of the image as decoded,
    before EXIF rotation, resize or borders, so that they equal what imagehash (and Meta's PDQ) compute
    from the same file and match the hash lists published with those tools. Without ``perceptual_hash``
    (and ``pdq``) they are None and a large JPEG may be decoded at a reduced scale (:func:`_draft`)."""
    digest = hashlib.sha256(data).hexdigest()
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    result = _process(data, opt, digest)
    result.md5 = md5
    return result


_TRANSPOSED = (2, 3, 4, 5, 6, 7, 8)  # the EXIF orientations that ImageOps.exif_transpose turns or flips


def _process(data: bytes, opt: ImageOptions, digest: str) -> Processed:
    kind = sniff(data)
    if kind is None:
        head = data[:32].decode("latin-1").strip().lower()
        what = (
            "HTML" if head.startswith(("<!doctype", "<html")) else f"{len(data):,} bytes of no image format"
        )
        return Processed("not_an_image", what, sha256=digest)
    fmt, mime = kind
    if fmt not in opt.formats:
        return Processed(
            "unsupported_format", f"{fmt} is not one of {', '.join(opt.formats)}", sha256=digest, mime=mime
        )
    if fmt == "heic":
        _heif_opener()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # from the header; nothing decoded yet
            if w * h > opt.max_pixels:
                return Processed(
                    "too_many_pixels", f"{w}x{h} > {opt.max_pixels:,} pixels", sha256=digest, mime=mime
                )
            orientation = img.getexif().get(0x0112, 1)
            ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # as displayed
            base = Processed("ok", sha256=digest, mime=mime, orig_width=ow, orig_height=oh)
            if min(ow, oh) < opt.min_image_size:
                base.status, base.error = "too_small", f"{ow}x{oh}: smaller side < {opt.min_image_size}"
                return base
            ratio = max(ow, oh) / max(min(ow, oh), 1)
            if opt.max_aspect_ratio is not None and ratio > opt.max_aspect_ratio:
                base.status, base.error = (
                    "bad_aspect_ratio",
                    f"{ow}x{oh}: aspect ratio {ratio:.2f} > {opt.max_aspect_ratio:g}",
                )
                return base
            if opt.encode_format == "original":
                _load(img)  # decodes: proves the bytes are a whole, valid image
                base.image, base.width, base.height = data, ow, oh
                _hash_original(img, base, opt)
                return base
            # Refused before decoding: an extreme aspect ratio under keep_ratio (1x60000 becomes 256x15M), or
            # a side the encoder cannot store (WebP 16383, JPEG 65500), would fail or exhaust memory later.
            out_w, out_h = output_size(ow, oh, opt)
            limit = _MAX_SIDE.get(opt.encode_format)
            if out_w * out_h > opt.max_pixels or (limit is not None and max(out_w, out_h) > limit):
                why = f"> {opt.max_pixels:,} pixels" if out_w * out_h > opt.max_pixels else ""
                why = why or f"{opt.encode_format} stores at most {limit} pixels a side"
                base.status, base.error = (
                    "too_many_pixels",
                    f"{ow}x{oh} would be stored as {out_w}x{out_h}: {why}",
                )
                return base
            # With a hash of the original asked for, decoded at full size (no libjpeg DCT scaling): the
            # pHash must be the bits imagehash gives, and a reduced decode moves some of them.
            img.seek(0)  # first frame of an animation
            covers = _draft(img, opt)  # the part of a reduced decode that is the whole original, or None
            _load(img)
            _hash_original(img, base, opt)
            if orientation in _TRANSPOSED:  # else exif_transpose only copies the full-size pixels
                if covers is not None:
                    covers = _transposed_box(covers, img.size, orientation)
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            img = resize(img, opt, None if covers is None else ((ow, oh), covers))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Processed("too_many_pixels", str(e), sha256=digest, mime=mime)
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as e:
        return Processed("decode_error", f"{type(e).__name__}: {e}", sha256=digest, mime=mime)
    base.image = encode(img, opt)
    base.width, base.height = img.size
    return base


def _hash_original(img: Image.Image, out: Processed, opt: ImageOptions) -> None:
    """pHash and its mirror (and PDQ with its quality) of the decoded original, as stored in the file; each
    only when asked for."""
    if opt.perceptual_hash:
        out.phash, out.phash_mirror = phashes(img)
    if opt.pdq:
        hashes, out.pdq_quality = pdq_dihedral(img)
        out.pdq, out.pdq_dihedral = hashes[0], hashes[1:]


_DRAFT_GAP = 2.0  # Pillow's thumbnail() default reducing_gap: the reduced decode keeps twice what is stored


def _draft(img: Image.Image, opt: ImageOptions) -> tuple[float, float, float, float] | None:
    """Ask libjpeg to decode ``img`` (not loaded yet) at 1/2, 1/4 or 1/8 scale, by Pillow's ``thumbnail``
    rule (``reducing_gap=2.0``): only as far as the decoded image stays at least twice the size the resize
    scales it to, on each side (the shorter side for keep_ratio and center_crop, the longer for
    keep_ratio_largest and border, through :func:`_scale`). Returns the box of the reduced image that covers
    the whole original (its last row and column may be partial), or None when it is decoded at full size:
    a hash of the original is asked for, it is no JPEG, there is no shrinking resize, or it is less than
    twice too big. Never reached with ``encode_format: original``."""
    if opt.perceptual_hash or opt.pdq or img.format != "JPEG":
        return None
    w, h = img.size  # as stored; the scale is the same for the displayed (turned) image
    scale = _scale(w, h, opt)
    if scale >= 1.0:
        return None
    need = (max(1, round(w * _DRAFT_GAP * scale)), max(1, round(h * _DRAFT_GAP * scale)))
    if min(w // need[0], h // need[1]) < 2:  # libjpeg would decode it at full size anyway
        return None
    drafted = img.draft(None, need)
    return None if drafted is None else drafted[1]


def _transposed_box(
    box: tuple[float, float, float, float], size: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """``box`` of an image of ``size`` (as stored) in the image turned as EXIF ``orientation`` says (as
    ImageOps.exif_transpose turns it)."""
    x0, y0, x1, y1 = box
    w, h = size
    return {
        2: (w - x1, y0, w - x0, y1),  # mirrored left to right
        3: (w - x1, h - y1, w - x0, h - y0),  # turned 180
        4: (x0, h - y1, x1, h - y0),  # mirrored top to bottom
        5: (y0, x0, y1, x1),  # transposed
        6: (h - y1, x0, h - y0, x1),  # turned 90 clockwise
        7: (h - y1, w - x1, h - y0, w - x0),  # transversed
        8: (y0, w - x1, y1, w - x0),  # turned 90 counter-clockwise
    }.get(orientation, box)


def _load(img: Image.Image) -> None:
    """Decode the pixels. Pillow 13's TIFF plugin raises TypeError on a strip offset tag of the wrong type
    (a float, bytes): that is corrupt data, reported as a ValueError (``decode_error``) like the rest."""
    try:
        img.load()
    except TypeError as e:
        raise ValueError(f"corrupt image data ({e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: CMYK, 16- and 32-bit, palette (with transparency), LA/RGBA over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _scale(w: int, h: int, opt: ImageOptions) -> float:
    if opt.resize_mode == "no":
        return 1.0
    side = min(w, h) if opt.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    scale = opt.image_size / side
    return min(scale, 1.0) if opt.resize_only_if_bigger else scale


_MAX_SIDE = {"jpg": 65500, "webp": 16383}  # the encoders' limits; PNG has none that matters here


def output_size(w: int, h: int, opt: ImageOptions) -> tuple[int, int]:
    """The size :func:`resize` gives a ``w`` x ``h`` image (computed, nothing decoded)."""
    scale = _scale(w, h, opt)
    if opt.resize_mode == "center_crop":
        side = opt.image_size / scale
        return max(1, round(min(w, side) * scale)), max(1, round(min(h, side) * scale))
    if scale != 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    if opt.resize_mode == "border":
        w, h = max(w, opt.image_size), max(h, opt.image_size)
    return w, h


def _filter(resample: Resample, scale: float) -> tuple[Image.Resampling, float | None]:
    """The filter and reducing gap. ``area`` averages pixels when shrinking (OpenCV's INTER_AREA, which
    img2dataset uses) and uses Lanczos when enlarging, as img2dataset does."""
    if resample == "area":
        return (Image.Resampling.BOX, None) if scale < 1 else (Image.Resampling.LANCZOS, None)
    if resample == "bicubic":
        return Image.Resampling.BICUBIC, 2.0
    return Image.Resampling.LANCZOS, 3.0


def resize(
    img: Image.Image,
    opt: ImageOptions,
    reduced: tuple[tuple[int, int], tuple[float, float, float, float]] | None = None,
) -> Image.Image:
    """``img`` resized as ``opt`` says. ``reduced``: ``img`` is a reduced decode (:func:`_draft`) of an
    image of that size, which the given box of ``img`` covers; sizes are computed from the original's, so
    the result has the size :func:`output_size` gives, and the pixels are taken from the box."""
    w, h = img.size if reduced is None else reduced[0]
    scale = _scale(w, h, opt)
    resample, gap = _filter(opt.resample, scale)

    def source(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if reduced is None:
            return box
        x0, y0, x1, y1 = reduced[1]
        sx, sy = (x1 - x0) / w, (y1 - y0) / h
        return (x0 + box[0] * sx, y0 + box[1] * sy, x0 + box[2] * sx, y0 + box[3] * sy)

    if opt.resize_mode == "center_crop":
        # Resize only the centred square that survives the crop: no work on pixels that are thrown away.
        side = opt.image_size / scale
        cw, ch = min(w, side), min(h, side)
        if scale == 1.0 and (cw, ch) == (w, h) and reduced is None:
            return img
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        return img.resize(size, resample, box=source(box), reducing_gap=gap)
    if scale != 1.0 or reduced is not None:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        whole = None if reduced is None else source((0, 0, w, h))
        img = img.resize(size, resample, box=whole, reducing_gap=gap)
    if opt.resize_mode == "border":
        s = opt.image_size
        w, h = img.size
        if w < s or h < s:
            canvas = Image.new("RGB", (max(w, s), max(h, s)), (0, 0, 0))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img = canvas
    return img


def encode(img: Image.Image, opt: ImageOptions) -> bytes:
    buf = io.BytesIO()
    if opt.encode_format == "jpg":
        img.save(buf, format="JPEG", quality=opt.encode_quality)
    elif opt.encode_format == "webp":
        img.save(buf, format="WEBP", quality=opt.encode_quality, method=4)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
