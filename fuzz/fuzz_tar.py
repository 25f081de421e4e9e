# ruff: noqa: S101 - a fuzz harness states its invariants as asserts
"""Fuzz the trainer's shard reading: curate.train.data.iter_samples over a shard tar, then to_pixels.

Invariant: reading a corrupt shard either works or fails with ``TrainDataError`` (a ValueError that the CLI
prints, exit 2) naming the shard or the sample: iter_samples turns tarfile's, webdataset's and the
decompressors' errors (TarError, OSError, EOFError, zlib.error, LZMAError, ValueError for a duplicate member)
and a json member that is not a JSON object into it; to_pixels turns Pillow's errors (OSError, SyntaxError,
ValueError, EOFError, DecompressionBombError) into it. Anything else (AttributeError, KeyError, IndexError,
TypeError, SyntaxError, RecursionError, MemoryError) is a finding, as is a hang (libFuzzer's -timeout) or
more than 2 GB of memory. Every sample that comes out has a str uid, a dict meta, str captions for every
``caption`` choice, and pixels of shape [3, r, r], finite, in [-1, 1].

Input layout: the whole input is the shard file (``x.tar``). Run: ``python fuzz/fuzz_tar.py fuzz/corpus/tar``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import warnings

import numpy as np

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["PIL", "curate", "webdataset", "tarfile"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    import webdataset.tariterators  # noqa: F401 - imported here so that it is instrumented
    from PIL import Image

    import curate.kit.image_batches  # noqa: F401 - likewise (to_pixels imports it lazily)
    from curate.base import TrainDataError
    from curate.kit.rules import parse_rule
    from curate.train.data import Sample, caption_of, iter_samples, passes, to_pixels

    Image.init()  # every Pillow plugin, instrumented (Image.open would load them later, uninstrumented)

ALLOWED = (TrainDataError,)
RESOLUTION = 8
RULES = [parse_rule("clip_score >= 0.3")]


@functools.cache
def workdir() -> str:
    """A scratch folder for the file under test, made on first use (tests point it elsewhere)."""
    return tempfile.mkdtemp(prefix="fuzz_tar_")


def read_shard(path: str) -> list[Sample]:
    """What the trainer does with a shard: every sample, filtered and decoded."""
    out = []
    for s in iter_samples(path):
        assert isinstance(s.uid, str), type(s.uid)
        assert isinstance(s.meta, dict), type(s.meta)
        assert s.txt is None or isinstance(s.txt, str)
        for choice in ("alt", "vlm", "fused"):
            assert isinstance(caption_of(s, choice), str), (choice, s.meta, s.txt)
        passes(s.meta, RULES, "drop", 4)
        if s.image is not None:
            assert s.ext in ("jpg", "jpeg", "png", "webp"), s.ext
            rng = np.random.default_rng(0)
            x = to_pixels(s.image, RESOLUTION, "random" if len(s.image) % 2 else "center", True, rng)
            assert x.shape == (3, RESOLUTION, RESOLUTION), x.shape
            assert x.dtype == np.float32 and np.isfinite(x).all()
            assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
        out.append(s)
    return out


def test_one_input(data: bytes) -> list[Sample] | None:
    shard = os.path.join(workdir(), "x.tar")
    with open(shard, "wb") as f:
        f.write(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read_shard(shard)
    except ALLOWED:
        return None


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
