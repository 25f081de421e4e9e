"""Prompt adherence in the sample world: does an image show the colours and shapes its caption names?

The sample world (``curate.demo.world``) draws one to three flat shapes in a fixed palette on a background of
another palette colour, and its captions say exactly that ("a red circle, a blue square and a green star on a
yellow background"). That makes adherence of a text-to-image model trained on it measurable without any
learned model:

1. ``parse_prompt`` reads a caption of that grammar into a ``Prompt``; anything else (photo captions) gives
   None.
2. ``analyse`` maps every pixel to its nearest palette colour, takes the background from the border, finds
   the connected blobs of every other colour (dropping specks and the thin halos that resizing leaves where
   two colours meet) and names each blob's shape from its geometry.
3. ``score`` compares the two: background (0/1), the share of named colours present, the share of named
   (colour, shape) pairs present, and ``adherence``, their mean.

On the world's own images it is exact, up to shapes that another shape hides in part (shapes may overlap a
little); ``tests/test_adherence.py`` measures the rates at full size, 64 px and 32 px.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from curate.demo.world import COLOURS, SHAPES

__all__ = [
    "Analysis",
    "Blob",
    "Prompt",
    "adherence_of",
    "analyse",
    "parse_prompt",
    "score",
]

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], np.float32)
_COLOUR_RE = "|".join(_NAMES)
_SHAPE_RE = "|".join(SHAPES)
_THING = re.compile(rf"an? ({_COLOUR_RE}) ({_SHAPE_RE})")
_CAPTION = re.compile(rf"(?P<things>.+) on an? (?P<background>{_COLOUR_RE}) background")
PARTS = ("background", "colours", "shapes")


@dataclass(frozen=True)
class Prompt:
    """What a caption of the world's grammar asks for: a background colour and (colour, shape) objects."""

    background: str
    objects: tuple[tuple[str, str], ...]

    @property
    def colours(self) -> tuple[str, ...]:
        """The object colours, each once, in caption order."""
        return tuple(dict.fromkeys(colour for colour, _ in self.objects))


@dataclass(frozen=True)
class Blob:
    """A connected region of one palette colour (not the background's)."""

    colour: str
    shape: str  # one of SHAPES, or "unknown"
    area: float  # share of the image's pixels
    bbox: tuple[int, int, int, int]  # x, y, width, height in pixels


@dataclass
class Analysis:
    background: str
    blobs: list[Blob] = field(default_factory=list)


def parse_prompt(text: str | None) -> Prompt | None:
    """The ``Prompt`` of a caption in the world's grammar, or None for any other text.

    The grammar is ``_Scene.caption``'s: "a red circle on a blue background", "a red circle and a green star
    on a white background", "a red circle, a blue square and a green star on a yellow background" (any number
    of objects). Case, surrounding space, runs of spaces and a final full stop are forgiven.
    """
    if not text:
        return None
    text = " ".join(text.strip().lower().split()).removesuffix(".")
    m = _CAPTION.fullmatch(text)
    if m is None:
        return None
    head, _, last = m["things"].rpartition(" and ")
    parts = [*head.split(", "), last] if head else [last]
    objects = []
    for part in parts:
        thing = _THING.fullmatch(part)
        if thing is None:
            return None
        objects.append((thing[1], thing[2]))
    return Prompt(m["background"], tuple(objects))


def _labels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour of every pixel ([h, w] uint8) and the distance to it (float32)."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    d2 = (flat * flat).sum(1, keepdims=True) - 2 * flat @ _PALETTE.T + (_PALETTE * _PALETTE).sum(1)
    labels = d2.argmin(1)
    distance = np.sqrt(np.maximum(d2[np.arange(len(flat)), labels], 0))
    return labels.astype(np.uint8).reshape(pixels.shape[:2]), distance.reshape(pixels.shape[:2])


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an [h, w, 3] image, got shape {pixels.shape}")
    pixels = pixels[:, :, :3]
    if pixels.dtype != np.uint8:  # floats in [0, 1] or [0, 255]
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        pixels = np.clip(np.asarray(pixels, np.float64) * scale, 0, 255).round().astype(np.uint8)
    return pixels


def analyse(
    image: Image.Image | np.ndarray,
    min_area: float = 0.002,
    min_thickness: float = 0.012,
    max_distance: float = 40.0,
) -> Analysis:
    """The background colour and the coloured blobs of an image (PIL, or an [h, w, 3] array).

    The background is the most common palette colour of the outermost ring of pixels. A blob is a connected
    region (8-connectivity) of one other palette colour that covers at least ``min_area`` of the image and
    is at least ``min_thickness`` of the shorter side thick (twice its largest inscribed radius): the
    thickness test drops the thin rims of an in-between colour that resampling leaves where two colours meet
    (red against blue turns purple for a pixel). Its pixels must also be near that colour: a median RGB
    distance of at most ``max_distance`` (the drawn shapes are flat, the background's grain and gradient stay
    within about 25), which keeps noise from passing for shapes. Blobs come largest first.
    """
    import cv2

    pixels = _rgb(image)
    h, w = pixels.shape[:2]
    labels, distance = _labels(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    total, short = float(h * w), float(min(h, w))
    blobs = []
    for index, name in enumerate(_NAMES):
        if index == background:
            continue
        mask = (labels == index).astype(np.uint8)
        if mask.sum() < min_area * total:
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for c in range(1, count):
            x, y, bw, bh, area = (int(v) for v in stats[c])
            if area < min_area * total:
                continue
            inside = components[y : y + bh, x : x + bw] == c
            if float(np.median(distance[y : y + bh, x : x + bw][inside])) > max_distance:
                continue
            blob = np.pad(inside.astype(np.uint8), 1)
            inscribed = float(cv2.distanceTransform(blob, cv2.DIST_L2, 5).max())
            if 2 * inscribed < max(min_thickness * short, 2.0):
                continue
            blobs.append(Blob(name, _shape_of(blob), area / total, (x, y, bw, bh)))
    blobs.sort(key=lambda b: -b.area)
    return Analysis(_NAMES[background], blobs)


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Geometry of one blob (a 0/1 uint8 mask, holes filled): the numbers ``_shape_of`` decides on.

    ``extent``: area / bounding box; ``aspect``: width / height of the bounding box; ``solidity``: area /
    convex hull; ``triangularity``: area / smallest enclosing triangle; ``corners``: how full the four
    corners of the bounding box are (each a fifth of its width and height).
    """
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, [contour], -1, 1, thickness=cv2.FILLED)
    # Pixel counts, not polygon areas: a contour through pixel centres loses half a pixel all round.
    area = float(filled.sum())
    ys, xs = np.nonzero(filled)
    width, height = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
    # The outline through the outer pixel corners, so that hull and triangle compare with the pixel count.
    outline = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = cv2.convexHull(outline.astype(np.float32))
    hull_area = float(cv2.contourArea(hull))
    triangle_area, _ = cv2.minEnclosingTriangle(hull)
    box = filled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    cy, cx = max(1, round(0.2 * height)), max(1, round(0.2 * width))
    corners = [box[:cy, :cx], box[:cy, -cx:], box[-cy:, :cx], box[-cy:, -cx:]]
    return {
        "extent": area / (width * height),
        "aspect": width / height,
        "solidity": area / max(hull_area, 1.0),
        "triangularity": area / max(float(triangle_area), 1.0),
        "corners": float(np.mean([c.mean() for c in corners])),
    }


def _shape_of(mask: np.ndarray) -> str:
    """One of SHAPES, or "unknown", from the blob's geometry (see ``shape_features``).

    What is drawn: a triangle fills its smallest enclosing triangle; a diamond is an unrotated rhombus 0.6
    times as tall as wide and fills half its box; a star has 5 points (inner radius 0.45 of the outer), so
    it fills little of its box and its hull is a third empty; a square (axis-aligned) fills its box, corners
    included; a circle fills pi/4 of a square box. The thresholds sit between the values measured on the
    world's shapes at full size, 64 px and 32 px (small images blur every shape towards a blob).
    """
    f = shape_features(mask)
    square_box = 0.8 <= f["aspect"] <= 1.25
    if f["triangularity"] > 0.66:
        return "triangle"
    if f["extent"] < 0.78 and (0.45 <= f["aspect"] <= 0.8 or 1.25 <= f["aspect"] <= 2.2):
        return "diamond"
    if not square_box:
        return "unknown"
    if f["extent"] < 0.65 or f["solidity"] < 0.8:
        return "star"
    if f["corners"] > 0.6:
        return "square"
    return "circle"


def score(prompt: Prompt, analysis: Analysis) -> dict:
    """How well an analysed image follows a prompt.

    ``background``: 1 when the background colours agree; ``colours``: the share of the named object colours
    that some blob has; ``shapes``: the share of the named (colour, shape) pairs that some blob is;
    ``extra``: the number of blobs of a colour the prompt does not name; ``adherence``: the mean of the
    first three, in [0, 1].
    """
    found_colours = {b.colour for b in analysis.blobs}
    found_pairs = {(b.colour, b.shape) for b in analysis.blobs}
    wanted_colours = set(prompt.colours)
    pairs = set(prompt.objects)
    parts = {
        "background": float(analysis.background == prompt.background),
        "colours": len(wanted_colours & found_colours) / len(wanted_colours) if wanted_colours else 1.0,
        "shapes": len(pairs & found_pairs) / len(pairs) if pairs else 1.0,
    }
    extra = sum(b.colour not in wanted_colours for b in analysis.blobs)
    return {**parts, "extra": extra, "adherence": sum(parts.values()) / len(parts)}


def adherence_of(images: Iterable[Image.Image | np.ndarray], prompts: Sequence[str | Prompt | None]) -> dict:
    """Mean of ``score`` over images and their prompts (captions or parsed ``Prompt``s).

    Prompts outside the world's grammar are skipped and counted in ``skipped``; ``n`` is the number scored.
    The means are None when nothing was scored. ``per_prompt`` is each prompt's adherence (None where
    skipped), for intervals over prompts.
    """
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    sums = dict.fromkeys((*PARTS, "extra", "adherence"), 0.0)
    n = skipped = 0
    per_prompt: list[float | None] = []
    for image, prompt in zip(images, prompts, strict=True):
        parsed = prompt if isinstance(prompt, Prompt) else parse_prompt(prompt)
        if parsed is None:
            skipped += 1
            per_prompt.append(None)
            continue
        scores = score(parsed, analyse(image))
        for key, value in scores.items():
            sums[key] += value
        per_prompt.append(float(scores["adherence"]))
        n += 1
    means = {key: (value / n if n else None) for key, value in sums.items()}
    return {**means, "n": n, "skipped": skipped, "per_prompt": per_prompt}
