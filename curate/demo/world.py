"""The sample world: drawn images whose captions say exactly what is in them, plus labelled noise.

``build_world()`` draws coloured shapes on coloured backgrounds ("a red circle and a blue square on a
yellow background"), then injects the faults of a web-scraped corpus, each labelled in ``truth["kind"]``:

==============================  ====================================================  =================
kind                            what                                                  expected_status
==============================  ====================================================  =================
``clean``                       the image and its own caption                         ok
``mismatched_caption``          the caption of another image (``true_caption``        ok
                                keeps the right one)
``exact_duplicate``             the bytes of an earlier image at another path         ok
``near_duplicate:<how>``        an earlier image after ``crop``, ``resize``,          ok
                                ``recompress`` (JPEG, low quality), ``flip`` or
                                ``jitter`` (colour)
``watermark``                   a semi-transparent stock-photo text repeated across   ok
``slow``                        ``/slow/0.5``: the server's sample JPEG, half a       ok
                                second late
``truncated``                   the first half of a JPEG                              decode_error
``html_as_jpeg``                an HTML page served as image/jpeg                     not_an_image
``http_404``, ``http_500``      ``/status/404``, ``/status/500``                      http_404, http_500
==============================  ====================================================  =================

Drawn images have sides of 160 to 640 px (near duplicates: 150 to 640) and aspect ratios up to about 2:1.
Duplicates carry their original's caption and ``duplicate_of`` (the original's path; the original is an
earlier clean row). Rows on built-in routes get a ``?row=<i>`` query so that every URL is unique: a
URL-level deduplication must not mistake two 404s for one image. ``true_caption`` is null where there is
no image (HTML, HTTP errors). With ``photos=True`` and scikit-image installed, its bundled sample photos
replace a few clean rows (paths ``/photo/<name>.jpg``); without it they are left out, as an optional extra.

The same seed gives byte-identical files and rows: every row draws from its own random generator, seeded
by (seed, row), and the plan of kinds from another.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from curate.core.schema import uid_for
from curate.demo.server import SAMPLE_JPEG_CAPTION, WorldServer

__all__ = [
    "COLOURS",
    "EXPECTED_STATUS",
    "KINDS",
    "NOISE_RATES",
    "SHAPES",
    "World",
    "build_world",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
MIN_SIDE, MAX_SIDE = 160, 640  # pixels, of every drawn image
SHAPES = ("circle", "square", "triangle", "star", "diamond")
NEAR_DUPLICATE_KINDS = tuple(
    f"near_duplicate:{how}" for how in ("crop", "resize", "recompress", "flip", "jitter")
)

# Share of rows per noise kind; "slow" is a fixed few (see _slow_count).
NOISE_RATES: dict[str, float] = {
    "mismatched_caption": 0.10,
    "exact_duplicate": 0.03,
    **{kind: 0.01 for kind in NEAR_DUPLICATE_KINDS},
    "watermark": 0.03,
    "truncated": 0.01,
    "html_as_jpeg": 0.01,
    "http_404": 0.02,
    "http_500": 0.01,
}
EXPECTED_STATUS: dict[str, str] = {
    "clean": "ok",
    **{kind: "ok" for kind in NOISE_RATES},
    "slow": "ok",
    "truncated": "decode_error",
    "html_as_jpeg": "not_an_image",
    "http_404": "http_404",
    "http_500": "http_500",
}
KINDS = tuple(EXPECTED_STATUS)

_DUPLICATE_KINDS = ("exact_duplicate", *NEAR_DUPLICATE_KINDS)
_NO_IMAGE_KINDS = ("html_as_jpeg", "http_404", "http_500")
_ROUTES = {"http_404": "/status/404", "http_500": "/status/500", "slow": "/slow/0.5"}
_MIME = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "WEBP": ("webp", "image/webp")}
_WATERMARKS = ("© STOCKPHOTO", "© DREAMSTOCK", "shutterpix ©", "© PIXELBANK  PREVIEW", "© istockimages")
_HTML_PAGES = (
    "<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
    "<body><h1>Forbidden</h1><p>You don't have permission to access this resource.</p></body></html>\n",
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Just a moment...</title></head>\n'
    "<body><noscript>Please enable JavaScript and cookies to continue.</noscript></body></html>\n",
    "<html><head><title>Image not found</title></head><body><p>The image you requested was removed."
    '</p><a href="/">Back to the gallery</a></body></html>\n',
)
# Hand-written captions of scikit-image's bundled sample photos.
_PHOTOS = (
    (
        "astronaut",
        "a portrait of a smiling astronaut in an orange spacesuit holding a helmet, "
        "with an American flag and a model space shuttle behind her",
    ),
    ("coffee", "a cup of coffee on a red saucer with a spoon, on a wooden table"),
    ("chelsea", "a close-up of a tabby cat with green eyes"),
    ("rocket", "a rocket on its launch pad at dusk, between tall lightning towers"),
    ("camera", "a black and white photo of a man in a coat looking through a camera on a tripod"),
)


@dataclass
class World:
    """Files to serve, the input rows and their ground truth (same order)."""

    files: dict[str, tuple[bytes, str]]
    rows: list[dict]
    truth: list[dict] = field(repr=False)

    def serve(self, server: WorldServer) -> None:
        """Register every file on the server."""
        for path, (body, content_type) in self.files.items():
            server.add(path, body, content_type)

    def input_table(self, base_url: str, uid_base: str | None = None) -> pa.Table:
        """The pipeline's input: ``url`` (base_url + path) and ``caption``; with ``uid_base``, also ``uid``
        computed as if the world were served at ``uid_base`` (for ``input.uid_col``: the same uids whatever
        port the server got, so that runs over the same world are the same)."""
        base = base_url.rstrip("/")
        columns = {
            "url": pa.array([base + r["path"] for r in self.rows], pa.string()),
            "caption": pa.array([r["caption"] for r in self.rows], pa.string()),
        }
        if uid_base is not None:
            stable = uid_base.rstrip("/")
            columns["uid"] = pa.array(
                [uid_for(stable + r["path"], r["caption"]) for r in self.rows], pa.string()
            )
        return pa.table(columns)

    def truth_table(self, base_url: str, uid_base: str | None = None) -> pa.Table:
        """The truth rows plus ``url``, ``uid`` and ``duplicate_of_uid`` (the original's uid); uids as the
        input's (:meth:`input_table`)."""
        base = base_url.rstrip("/")
        stable = (uid_base or base_url).rstrip("/")
        uid_of_path = {r["path"]: uid_for(stable + r["path"], r["caption"]) for r in self.truth}
        columns: dict[str, list] = {
            "uid": [uid_of_path[r["path"]] for r in self.truth],
            "url": [base + r["path"] for r in self.truth],
        }
        for name in ("path", "caption", "kind", "true_caption", "duplicate_of", "expected_status"):
            columns[name] = [r[name] for r in self.truth]
        columns["duplicate_of_uid"] = [uid_of_path.get(r["duplicate_of"]) for r in self.truth]
        return pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})

    def write(self, folder: str | os.PathLike, base_url: str, uid_base: str | None = None) -> dict[str, Path]:
        """Write ``folder/input.parquet`` and ``folder/truth.parquet``; returns {"input": ..., "truth": ...}."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"input": folder / "input.parquet", "truth": folder / "truth.parquet"}
        pq.write_table(self.input_table(base_url, uid_base), paths["input"])
        pq.write_table(self.truth_table(base_url, uid_base), paths["truth"])
        return paths


def build_world(
    size: int = 2000,
    seed: int = 0,
    photos: bool = True,
    rare: tuple[str, ...] = (),
    rare_share: float = 0.02,
) -> World:
    """A world of ``size`` rows, deterministic for a seed (see the module docstring).

    ``rare`` names colours or shapes to make rare concepts (for retrieval benchmarks): a scene that names one
    of them (an object or the background) is kept with probability ``rare_share`` and otherwise drawn again
    until it names none. Without ``rare`` (the default) the rows are the same as before the option existed."""
    if size < 0 or seed < 0:
        raise ValueError(f"size and seed must be >= 0, got size={size}, seed={seed}")
    unknown = [w for w in rare if w not in COLOURS and w not in SHAPES]
    if unknown or not 0 <= rare_share <= 1:
        raise ValueError(f"rare names colours or shapes ({unknown} are neither), rare_share is in [0, 1]")
    plan = np.random.default_rng([seed, 0])
    kinds = _plan_kinds(size, plan)
    row_rngs = [np.random.default_rng([seed, 1, i]) for i in range(size)]
    scenes = [_random_scene(rng) for rng in row_rngs]
    if rare:
        scenes = [_make_rare(scene, rare, rare_share, seed, i) for i, scene in enumerate(scenes)]
    clean = [i for i, k in enumerate(kinds) if k == "clean"]

    # Duplicates copy an earlier clean row, each a different one while there are enough.
    original_of: dict[int, int] = {}
    used: set[int] = set()
    for i, kind in enumerate(kinds):
        if kind in _DUPLICATE_KINDS:
            earlier = [j for j in clean if j < i]
            fresh = [j for j in earlier if j not in used] or earlier
            original_of[i] = fresh[int(plan.integers(len(fresh)))]
            used.add(original_of[i])
    # Mismatched rows take the caption of another clean row that says something else.
    caption_from: dict[int, int] = {}
    for i, kind in enumerate(kinds):
        if kind == "mismatched_caption":
            others = [j for j in clean if scenes[j].caption != scenes[i].caption]
            if others:
                caption_from[i] = others[int(plan.integers(len(others)))]
            else:  # a tiny world where every clean caption is this one
                kinds[i] = "clean"
    taken = set(original_of.values()) | set(caption_from.values())
    photo_rows = _place_photos(size, seed, clean, taken) if photos else {}

    width = max(5, len(str(max(size - 1, 0))))
    files: dict[str, tuple[bytes, str]] = {}
    truth: list[dict] = []
    for i, kind in enumerate(kinds):
        rng, scene = row_rngs[i], scenes[i]
        caption = true_caption = scene.caption
        duplicate_of = None
        name = f"/img/{i:0{width}d}"
        if kind in _ROUTES:
            path = f"{_ROUTES[kind]}?row={i}"
            if kind == "slow":
                caption = true_caption = SAMPLE_JPEG_CAPTION
        elif kind == "html_as_jpeg":
            path = name + ".jpg"
            body = _HTML_PAGES[int(rng.integers(len(_HTML_PAGES)))].encode()
            files[path] = (body, "image/jpeg")
        elif kind in _DUPLICATE_KINDS:
            original = truth[original_of[i]]
            caption = true_caption = original["true_caption"]
            duplicate_of = original["path"]
            body, content_type = files[duplicate_of]
            if kind != "exact_duplicate":
                body, content_type = _near_duplicate(body, kind.partition(":")[2], rng)
            path = name + _extension(content_type)
            files[path] = (body, content_type)
        elif i in photo_rows:
            photo_name, caption = photo_rows[i]
            true_caption = caption
            path = f"/photo/{photo_name}.jpg"
            files[path] = (_photo_jpeg(photo_name), "image/jpeg")
        else:
            img = _draw(scene, rng)
            fmt = "JPEG" if kind == "truncated" else scene.format
            if kind == "watermark":
                img = _watermark(img, rng)
            body = _encode(img, fmt)
            if kind == "truncated":
                body = body[: len(body) // 2]
            if kind == "mismatched_caption":
                caption = scenes[caption_from[i]].caption
            ext, content_type = _MIME[fmt]
            path = f"{name}.{ext}"
            files[path] = (body, content_type)
        if kind in _NO_IMAGE_KINDS:
            true_caption = None
        truth.append(
            {
                "path": path,
                "caption": caption,
                "kind": kind,
                "true_caption": true_caption,
                "duplicate_of": duplicate_of,
                "expected_status": EXPECTED_STATUS[kind],
            }
        )
    rows = [{"path": t["path"], "caption": t["caption"]} for t in truth]
    return World(files=files, rows=rows, truth=truth)


# --- planning ----------------------------------------------------------------------------------------


def _slow_count(size: int) -> int:
    return 0 if size < 50 else min(5, max(2, size // 400))


def _plan_kinds(size: int, plan: np.random.Generator) -> list[str]:
    noise = [kind for kind, rate in NOISE_RATES.items() for _ in range(int(rate * size + 0.5))]
    noise += ["slow"] * _slow_count(size)
    noise = noise[: max(0, size - max(1, size // 2))]  # tiny worlds stay at least half clean
    kinds = ["clean"] * size
    for position, kind in zip(plan.permutation(size), noise, strict=False):
        kinds[int(position)] = kind
    if size and kinds[0] != "clean":  # every duplicate needs an earlier clean row to copy
        first_clean = kinds.index("clean")
        kinds[0], kinds[first_clean] = kinds[first_clean], kinds[0]
    return kinds


def _place_photos(size: int, seed: int, clean: list[int], taken: set[int]) -> dict[int, tuple[str, str]]:
    """Row -> (photo name, caption) for the scikit-image photos, on clean rows nothing else refers to."""
    free = [i for i in clean if i not in taken]
    if len(free) < 4 * len(_PHOTOS) or _skimage_data() is None:
        return {}
    rows = np.random.default_rng([seed, 2]).choice(free, size=len(_PHOTOS), replace=False)
    return {int(i): photo for i, photo in zip(rows, _PHOTOS, strict=True)}


@functools.cache
def _skimage_data():
    try:
        from skimage import data
    except ImportError:
        return None  # an optional extra: the world simply has no photos
    return data


@functools.cache
def _photo_jpeg(name: str) -> bytes:
    pixels = getattr(_skimage_data(), name)()
    return _encode(Image.fromarray(pixels).convert("RGB"), "JPEG")


# --- scenes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    r: float
    angle: float


@dataclass(frozen=True)
class _Scene:
    width: int
    height: int
    background: str
    shapes: tuple[_Shape, ...]
    format: str

    @property
    def caption(self) -> str:
        things = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in self.shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on {_article(self.background)} {self.background} background"


def names_any(scene: _Scene, words: tuple[str, ...]) -> bool:
    """Whether the scene's caption names any of these colours or shapes."""
    named = {scene.background} | {s.colour for s in scene.shapes} | {s.kind for s in scene.shapes}
    return bool(named & set(words))


def _make_rare(scene: _Scene, rare: tuple[str, ...], share: float, seed: int, row: int) -> _Scene:
    """The scene, or (with probability 1 - share, when it names a rare word) another that names none. Its own
    generators, so the row's drawing generator is the same as without ``rare``."""
    if not names_any(scene, rare) or np.random.default_rng([seed, 2, row]).random() < share:
        return scene
    attempt = 0
    while names_any(scene, rare):
        scene = _random_scene(np.random.default_rng([seed, 3, row, attempt]))
        attempt += 1
    return scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _random_scene(rng: np.random.Generator) -> _Scene:
    # Sides between 160 and 640, aspect ratio up to 2:1 either way.
    side = rng.uniform(220, 520)
    aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2))))
    width = int(np.clip(side * aspect**0.5, MIN_SIDE, MAX_SIDE))
    height = int(np.clip(side / aspect**0.5, MIN_SIDE, MAX_SIDE))
    names = list(COLOURS)
    background = names[int(rng.integers(len(names)))]
    short = min(width, height)
    shapes: list[_Shape] = []
    for _ in range(int(rng.integers(1, 4))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = [c for c in names if c != background][int(rng.integers(len(names) - 1))]
        r = float(rng.uniform(0.1, 0.2)) * short
        margin = r + 0.06 * short  # corners stay background; a crop of a few percent keeps every shape
        for _try in range(8):
            cx, cy = float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin))
            # Far enough apart that no shape hides another.
            if all(np.hypot(cx - s.cx, cy - s.cy) > 0.8 * (r + s.r) for s in shapes):
                break
        else:
            continue
        if any(s.kind == kind and s.colour == colour for s in shapes):
            continue  # "a red circle and a red circle" is no caption
        shapes.append(_Shape(kind, colour, cx, cy, r, float(rng.uniform(0, 2 * np.pi))))
    if not shapes:  # eight tries failed on a tiny canvas: one shape in the middle
        shapes.append(
            _Shape(
                "circle",
                "white" if background != "white" else "black",
                width / 2,
                height / 2,
                0.2 * short,
                0.0,
            )
        )
    u = rng.random()
    fmt = "PNG" if u < 0.10 else "WEBP" if u < 0.14 else "JPEG"
    return _Scene(width, height, background, tuple(shapes), fmt)


def _draw(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    w, h = scene.width, scene.height
    # A soft gradient and a little grain, so the background is not one flat colour.
    ramp = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None] * float(rng.uniform(-12, 12))
    grain = rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16).astype(np.float32)
    pixels = np.asarray(COLOURS[scene.background], np.float32) + ramp + grain
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r), fill=fill)
        elif s.kind == "square":
            half = 0.85 * s.r
            draw.rectangle((s.cx - half, s.cy - half, s.cx + half, s.cy + half), fill=fill)
        else:
            draw.polygon(_polygon(s), fill=fill)
    return img


def _polygon(s: _Shape) -> list[tuple[float, float]]:
    if s.kind == "triangle":
        angles, radii = s.angle + np.arange(3) * 2 * np.pi / 3, np.full(3, s.r)
    elif s.kind == "star":
        angles, radii = s.angle + np.arange(10) * np.pi / 5, np.tile([s.r, 0.45 * s.r], 5)
    else:  # diamond: a rhombus, taller than wide
        angles, radii = np.arange(4) * np.pi / 2, np.array([s.r, 0.6 * s.r, s.r, 0.6 * s.r])
    return [(s.cx + r * np.cos(a), s.cy + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]


# --- noise -------------------------------------------------------------------------------------------


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stock-photo text, semi-transparent, repeated in tilted rows across the whole image."""
    w, h = img.size
    text = _WATERMARKS[int(rng.integers(len(_WATERMARKS)))]
    font = _font(max(12, int(min(w, h) * rng.uniform(0.07, 0.1))))
    side = int(np.hypot(w, h)) + 2
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    step_x, step_y = (right - left) * 1.4 + 10, (bottom - top) * 3 + 10
    alpha = int(rng.integers(90, 140))
    for row, y in enumerate(np.arange(0, side, step_y)):
        for x in np.arange(-(row % 2) * step_x / 2, side, step_x):
            draw.text(
                (float(x), float(y)),
                text,
                font=font,
                fill=(255, 255, 255, alpha),
                stroke_width=1,
                stroke_fill=(0, 0, 0, alpha // 2),
            )
    layer = layer.rotate(float(rng.uniform(20, 40)), resample=Image.Resampling.BILINEAR)
    x0, y0 = (side - w) // 2, (side - h) // 2
    layer = layer.crop((x0, y0, x0 + w, y0 + h))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _near_duplicate(body: bytes, how: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(bytes, content type) of the original image after one small change."""
    img = Image.open(io.BytesIO(body))
    fmt = img.format if img.format in _MIME else "JPEG"
    img = img.convert("RGB")
    w, h = img.size
    if how == "crop":
        left, right = _crop_margins(w, rng)
        top, bottom = _crop_margins(h, rng)
        img = img.crop((left, top, w - right, h - bottom))
    elif how == "resize":
        # Down where the smaller side stays >= 160, else up (then the larger side stays <= 640).
        short, long = min(w, h), max(w, h)
        if short * 0.75 >= MIN_SIDE:
            scale = rng.uniform(max(0.5, MIN_SIDE / short), 0.8)
        else:
            scale = rng.uniform(1.2, min(1.5, MAX_SIDE / long))
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    elif how == "recompress":
        return _encode(img, "JPEG", quality=int(rng.integers(35, 61))), "image/jpeg"
    elif how == "flip":
        img = ImageOps.mirror(img)
    elif how == "jitter":
        gain = rng.uniform(0.88, 1.12, size=3) * rng.uniform(0.9, 1.1)
        shift = rng.uniform(-12, 12, size=3)
        pixels = np.asarray(img, np.float32) * gain.astype(np.float32) + shift.astype(np.float32)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    else:
        raise ValueError(f"unknown near-duplicate transform {how!r}")
    return _encode(img, fmt), _MIME[fmt][1]


def _crop_margins(side: int, rng: np.random.Generator) -> tuple[int, int]:
    """2 to 6 % off each end, less where that would leave fewer than 160 px (but never under 96 %)."""
    margins = rng.uniform(0.02, 0.06, size=2) * side
    room = max(side - MIN_SIDE, 0.04 * side)
    margins *= min(1.0, room / margins.sum())
    return int(margins[0]), int(margins[1])


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=85)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _extension(content_type: str) -> str:
    return next("." + ext for ext, mime in _MIME.values() if mime == content_type)
