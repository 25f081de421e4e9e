"""Neighbours for retrieval-augmented training and generation, from a curate index (``curate index build``).

Each training image's neighbours are searched with its own CLIP image embedding (from its run's sidecars,
where clip_score wrote it); the image itself, its recorded duplicates (``dup_of`` in either direction) and
anything at least ``exclude_similarity`` alike (a copy the dedup did not remove) are skipped, so the model
learns to use related images rather than to copy the answer. At generation, neighbours are searched with the
prompt's CLIP text embedding, as :class:`curate.index.Retriever` does.

What a neighbour gives the model is ``retrieval.condition``'s: its CLIP image embedding (``embedding``:
:class:`NeighbourTable`), or its image, resized once to ``image_size``, and its caption (``images_and_captions``:
:class:`NeighbourItems`; the images are read from the runs' shard tars through the index, the captions are
encoded by the trainer's frozen text encoder batch by batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.train.config import RetrievalConfig

__all__ = [
    "NeighbourItems",
    "NeighbourTable",
    "generation_neighbours",
    "prompt_neighbour_items",
    "prompt_neighbours",
    "training_neighbours",
]


class NeighbourTable:
    """``condition: embedding``: uid -> its neighbours' CLIP image embeddings [k, d] (float32)."""

    def __init__(self, uids: list[str], vectors: np.ndarray):
        self.rows = {u: i for i, u in enumerate(uids)}
        self.vectors = vectors

    def get(self, uid: str) -> np.ndarray | None:
        i = self.rows.get(uid)
        return None if i is None else np.asarray(self.vectors[i], np.float32)

    def collate(self, values: list[np.ndarray]) -> dict[str, Any]:
        """A batch's neighbours (what :meth:`get` gave for each sample) as the trainer takes them."""
        import torch

        return {"neighbours": torch.from_numpy(np.stack([np.asarray(v, np.float32) for v in values]))}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[-1])


class NeighbourItems:
    """``condition: images_and_captions``: uid -> its neighbours' index rows [k]; each row's image (uint8
    [s, s, 3], resized once) and caption. Row -1 (no usable neighbour) is a black image with an empty caption."""

    def __init__(
        self,
        uids: list[str],
        rows: np.ndarray,
        images: dict[int, np.ndarray],
        captions: dict[int, str],
        size: int,
    ):
        self.index = {u: i for i, u in enumerate(uids)}
        self.rows = rows
        self.images = images
        self.captions = captions
        self.size = size

    def get(self, uid: str) -> np.ndarray | None:
        i = self.index.get(uid)
        return None if i is None else self.rows[i]

    def collate(self, values: list[np.ndarray]) -> dict[str, Any]:
        import torch

        blank = np.zeros((self.size, self.size, 3), np.uint8)
        images = np.stack([np.stack([self.images.get(int(r), blank) for r in row]) for row in values])
        return {
            "neighbour_images": torch.from_numpy(images),  # [B, k, s, s, 3] uint8
            "neighbour_captions": [[self.captions.get(int(r), "") for r in row] for row in values],
        }

    def __len__(self) -> int:
        return len(self.index)


def neighbour_image(retriever: Any, uid: str, size: int) -> np.ndarray:
    """One indexed sample's image, centre-cropped and resized to ``size`` as training images are: uint8 [s, s, 3]."""
    from curate.train.data import to_pixels

    data, ext = retriever.image_file(uid)
    x = to_pixels(data, size, "center", False, np.random.default_rng(0), name=f"{uid}.{ext}")
    return np.clip((x.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def _run_samples(roots: list[str]) -> tuple[list[str], np.ndarray, dict[str, set[str]]]:
    """Kept samples' uids and image embeddings, and the dup_of relations, from the runs' sidecars."""
    from curate.core.output import OutputFolder
    from curate.index import read_run

    uids: list[str] = []
    vectors = []
    related: dict[str, set[str]] = {}
    for root in roots:
        rows = read_run(root)
        uids += rows.meta["uid"].to_pylist()
        vectors.append(np.asarray(rows.vectors, np.float32))
        out = OutputFolder(root)
        for shard in out.finished_shards():
            with out.fs.open(out.shard_parquet(shard), "rb") as f:
                if "dup_of" not in pq.read_schema(f).names:
                    continue
                f.seek(0)
                t = pq.read_table(f, columns=["uid", "dup_of"])
            t = t.filter(pc.is_valid(t["dup_of"]))
            for a, b in zip(t["uid"].to_pylist(), t["dup_of"].to_pylist(), strict=True):
                related.setdefault(a, set()).add(b)
                related.setdefault(b, set()).add(a)
    if not vectors:
        raise ValueError("retrieval needs curate run folders (with image embeddings) in data.shards")
    return uids, np.concatenate(vectors), related


def _training_rows(cfg: RetrievalConfig, roots: list[str], say) -> tuple[list[str], np.ndarray, Any]:
    """Each training sample's ``k`` neighbours' index rows (never itself or its duplicates): ``(uids, rows
    [n, k], retriever)``. Fewer than k usable: the remaining slots repeat the nearest ones; none: -1."""
    from curate.index import Retriever

    retriever = Retriever(cfg.index)
    uids, vectors, related = _run_samples(roots)
    dim = retriever.info["dimension"]
    if vectors.shape[1] != dim:
        raise ValueError(f"the runs' embeddings have dimension {vectors.shape[1]}, the index {dim}")
    k = cfg.k
    rows = np.full((len(uids), k), -1, np.int64)
    short = 0
    batch = 4096
    for start in range(0, len(uids), batch):
        found = retriever.search_embeddings(vectors[start : start + batch], k * 2 + 8)
        for j, hits in enumerate(found):
            uid = uids[start + j]
            skip = related.get(uid, set()) | {uid}
            picked = [h.id for h in hits if h.uid not in skip and h.score < cfg.exclude_similarity][:k]
            if len(picked) < k:
                short += 1
            if picked:
                rows[start + j] = [picked[r % len(picked)] for r in range(k)]
    say(
        f"retrieval: {k} neighbours for each of {len(uids):,} training samples from {cfg.index} "
        f"({short:,} had fewer than {k} that were not themselves or duplicates)"
    )
    return uids, rows, retriever


def training_neighbours(cfg: RetrievalConfig, roots: list[str], say=print) -> NeighbourTable | NeighbourItems:
    """Each training sample's ``k`` neighbours from the index: their embeddings (``condition: embedding``) or
    their images and captions (``images_and_captions``)."""
    uids, rows, retriever = _training_rows(cfg, roots, say)
    if cfg.condition == "images_and_captions":
        used = sorted({int(r) for r in np.unique(rows) if r >= 0})
        images = {r: neighbour_image(retriever, retriever.neighbor(r).uid, cfg.image_size) for r in used}
        captions = {r: retriever.neighbor(r).caption or "" for r in used}
        return NeighbourItems(uids, rows, images, captions, cfg.image_size)
    out = np.zeros((len(uids), cfg.k, retriever.info["dimension"]), np.float16)
    for i, row in enumerate(rows):
        for r, id_ in enumerate(row):
            if id_ >= 0:
                out[i, r] = retriever.embedding(int(id_))
    return NeighbourTable(uids, out)


def prompt_neighbours(index: str | Path, prompts: list[str], k: int, clip: Any | None = None) -> np.ndarray:
    """[n, k, d] float32: the ``k`` nearest samples to each prompt's CLIP text embedding."""
    from curate.index import Retriever

    retriever = Retriever(index, clip=clip)
    out = np.zeros((len(prompts), k, retriever.info["dimension"]), np.float32)
    for i, prompt in enumerate(prompts):
        hits = retriever.search_text(prompt, k)
        for r in range(k):
            out[i, r] = retriever.embedding(hits[r % len(hits)].id) if hits else 0
    return out


def prompt_neighbour_items(
    index: str | Path, prompts: list[str], k: int, size: int, clip: Any | None = None
) -> tuple[np.ndarray, list[list[str]]]:
    """The ``k`` nearest samples to each prompt's CLIP text embedding as images (uint8 [n, k, s, s, 3]) and
    captions."""
    from curate.index import Retriever

    retriever = Retriever(index, clip=clip)
    images = np.zeros((len(prompts), k, size, size, 3), np.uint8)
    captions = [[""] * k for _ in prompts]
    for i, prompt in enumerate(prompts):
        hits = retriever.search_text(prompt, k)
        for r in range(k if hits else 0):
            hit = hits[r % len(hits)]
            images[i, r] = neighbour_image(retriever, hit.uid, size)
            captions[i][r] = hit.caption or ""
    return images, captions


def generation_neighbours(gen: Any, index: str | Path, prompts: list[str], device: Any = "cpu") -> Any:
    """What ``gen.sample(neighbours=...)`` takes for these prompts, for the model's kind of retrieval tokens."""
    import torch

    cfg = gen.cfg.retrieval
    k = gen.denoiser.retrieval.k
    if cfg.condition == "images_and_captions":
        images, captions = prompt_neighbour_items(index, prompts, k, cfg.image_size, clip=gen.text.clip)
        return gen.encode_neighbours(torch.from_numpy(images), captions, device)
    return torch.from_numpy(prompt_neighbours(index, prompts, k, clip=gen.text.clip))
