"""What every image-scoring stage shares: which rows to score, decoding them in CPU threads a batch ahead of
the model, and scattering scores back to their rows (``curate.core.stage.set_column`` writes the column).

A scoring stage scores the rows that are kept and carry an image; every other row gets null, so a row
dropped earlier never costs model time and a score is never made up. Decoding runs in ``threads`` workers
(Pillow releases the GIL while it decodes) one batch ahead, so a GPU model is fed while the next batch
decodes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.core.schema import is_kept

__all__ = ["decode_rgb", "iter_batches", "rows_to_score", "scatter"]

T = TypeVar("T")


def rows_to_score(table: pa.Table) -> list[int]:
    """Indices of the rows that are kept and have image bytes."""
    if "image" not in table.column_names or table.num_rows == 0:
        return []
    mask = pc.and_(is_kept(table), pc.is_valid(table["image"]))
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False)).tolist()


def decode_rgb(data: bytes) -> Image.Image:
    """The image as 8-bit RGB, fully loaded. Raises on bytes that do not decode."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _prepare_all(datas: Sequence[bytes], prepare: Callable[[Image.Image], T]) -> list[T | None]:
    out: list[T | None] = []
    for data in datas:
        try:
            out.append(prepare(decode_rgb(data)))
        except Exception:  # a row that does not decode gets a null score, never a guess
            out.append(None)
    return out


def iter_batches(
    table: pa.Table,
    indices: Sequence[int],
    prepare: Callable[[Image.Image], T],
    batch_size: int,
    threads: int = 2,
) -> Iterator[tuple[list[int], list[T | None]]]:
    """Yield ``(row indices, prepared items)`` per batch; an item is None where the image did not decode.

    ``prepare`` turns a decoded RGB image into what the model takes (a tensor, an array). Batches are
    prepared by ``threads`` workers, each taking a slice, and the next batch is prepared while the caller
    works on the current one.
    """
    if not indices:
        return
    images = table["image"]
    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    threads = max(1, threads)

    def submit(pool: ThreadPoolExecutor, rows: list[int]) -> list[Future]:
        datas = [images[i].as_py() for i in rows]
        step = -(-len(datas) // threads)
        return [pool.submit(_prepare_all, datas[k : k + step], prepare) for k in range(0, len(datas), step)]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = submit(pool, batches[0])
        for b, rows in enumerate(batches):
            items = [x for f in pending for x in f.result()]
            if b + 1 < len(batches):
                pending = submit(pool, batches[b + 1])
            yield rows, items


def scatter(n: int, rows: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """A list of ``n`` Nones with ``values`` placed at ``rows``."""
    out: list[Any] = [None] * n
    for i, v in zip(rows, values, strict=True):
        out[i] = v
    return out
