"""Hashes others can match: pHash bit for bit as imagehash computes it, md5, and Meta's PDQ as its own Python
signal computes it (curate.kit.hashing, through the download stage's processing)."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import imagehash
import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageOps

from curate.kit.hashing import PdqIndex, pdq_dihedral, pdq_hash, pdq_words, popcount64
from curate.kit.imaging import ImageOptions, process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from flagship import photo_like


def _encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Real photos cropped and jittered, in the formats and modes the web serves: JPEG (one with an EXIF
    rotation), PNG with alpha, palette GIF, grey WebP, 16-bit grey PNG."""
    photos = [data for data, _ in photo_like(60, seed=3)]
    out = list(photos)
    for i, data in enumerate(photos[:30]):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        kind = i % 5
        if kind == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated: imagehash hashes the stored pixels, so do we
            out.append(_encoded(img, "JPEG", quality=80, exif=exif.tobytes()))
        elif kind == 1:
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(img.size))
            out.append(_encoded(rgba, "PNG"))
        elif kind == 2:
            out.append(_encoded(img.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))
        elif kind == 3:
            out.append(_encoded(img.convert("L"), "WEBP", quality=70))
        else:
            grey16 = img.convert("L").convert("I;16")
            out.append(_encoded(grey16, "PNG"))
    return out


OPTIONS = ImageOptions(image_size=64, resize_mode="border", formats=("jpeg", "png", "webp", "gif"), pdq=True)


def test_phash_is_imagehash_of_the_original_bit_for_bit(images):
    for data in images:
        got = process(data, OPTIONS)
        assert got.status == "ok", got.error
        original = Image.open(io.BytesIO(data))
        assert got.phash == str(imagehash.phash(original))
        assert got.phash_mirror == str(imagehash.phash(ImageOps.mirror(Image.open(io.BytesIO(data)))))
        assert got.md5 == hashlib.md5(data).hexdigest() and got.sha256 == hashlib.sha256(data).hexdigest()
    # Not the stored copy's: a bordered 64 px image hashes differently.
    stored = process(images[0], OPTIONS)
    assert str(imagehash.phash(Image.open(io.BytesIO(stored.image)))) != stored.phash


def test_pdq_is_metas_own_python_signal(images):
    for data in images[::3]:
        got = process(data, OPTIONS)
        # threatexchange's pdq_from_bytes: pdqhash.compute on the decoded file as RGB, hex of the bit string.
        bits, quality = pdqhash.compute(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        want = f"{int(''.join(str(b) for b in bits), 2):064x}"
        assert (got.pdq, got.pdq_quality) == (want, quality)
        assert got.pdq_dihedral == pdq_dihedral(Image.open(io.BytesIO(data)))[0][1:]
    assert not process(images[0], ImageOptions()).pdq  # only when asked for


def test_pdq_dihedral_hashes_find_rotated_and_flipped_copies(images):
    img = Image.open(io.BytesIO(images[1])).convert("RGB")
    original, quality = pdq_hash(img)
    variants, same_quality = pdq_dihedral(img)
    assert (variants[0], same_quality) == (original, quality)
    transforms = [
        img.transpose(Image.Transpose.ROTATE_90),
        img.transpose(Image.Transpose.ROTATE_180),
        img.transpose(Image.Transpose.ROTATE_270),
        img.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    ]
    index = PdqIndex(variants, max_distance=31)
    for t in transforms:
        copy, _ = pdq_hash(t)
        found, dist = index.nearest([copy])
        assert found[0] >= 1 and dist[0] <= 31  # a transformed copy matches one of the seven variants
        assert PdqIndex([original], 31).nearest([copy])[0][0] == -1  # and not the original's hash


def test_pdq_index_is_the_brute_force_nearest():
    rng = np.random.default_rng(0)
    listed = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(300)]
    queries = []
    for i in range(200):
        words = bytearray(bytes.fromhex(listed[i % 300]))
        for bit in rng.choice(256, size=int(rng.integers(0, 60)), replace=False):
            words[bit // 8] ^= 1 << (bit % 8)
        queries.append(bytes(words).hex())
    found, dist = PdqIndex(listed, 31).nearest(queries, block=5000)  # several blocks
    full = popcount64(pdq_words(queries)[:, None, :] ^ pdq_words(listed)[None, :, :]).sum(-1)
    for q in range(len(queries)):
        best = int(full[q].argmin())
        if full[q, best] <= 31:
            assert (found[q], dist[q]) == (best, full[q, best])
        else:
            assert (found[q], dist[q]) == (-1, -1)
    assert 0 < (found >= 0).sum() < len(queries)  # both cases happen
