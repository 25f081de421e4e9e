"""Querying an index: the :class:`Retriever` that generation code and the server use, the
:class:`Neighbor` it returns, and the images of the results, read from the runs' shard tars.

A :class:`Retriever` holds the FAISS index and the metadata, and memory-maps the embeddings, which lossy
codes (SQ, PQ) read to re-score ``RERANK`` x k candidates exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curate.base import RetrievalIndexError
from curate.core.output import OutputFolder, TarMember
from curate.index.factory import load_faiss, rerank_factor, search
from curate.index.runs import EXTRA_CAPTIONS
from curate.index.store import read_embeddings, read_faiss, read_info, read_metadata

__all__ = ["Neighbor", "Retriever", "ShardImages", "image_mime"]


class ShardImages:
    """Image bytes by (source run, shard, uid), from the runs' WebDataset tars; each tar's member table is
    read once and cached, then one image is a seek and a read."""

    def __init__(self) -> None:
        self._runs: dict[str, OutputFolder] = {}
        self._tables: dict[tuple[str, str], dict[str, TarMember]] = {}
        self._lock = threading.Lock()

    def _table(self, source: str, shard: str) -> tuple[OutputFolder, dict[str, TarMember]]:
        key = (source, shard)
        with self._lock:
            run = self._runs.setdefault(source, OutputFolder(source))
            if key not in self._tables:
                try:
                    members = run.tar_members(shard)
                except FileNotFoundError:
                    raise RetrievalIndexError(
                        f"{run.as_given(run.shard_tar(shard))} is missing: was the run moved or deleted?"
                    ) from None
                self._tables[key] = {m.uid: m for m in members if m.is_image}
            return run, self._tables[key]

    def image(self, source: str, shard: str, uid: str) -> tuple[bytes, str]:
        """``(bytes, extension)`` of the image of ``uid`` in the shard of the run at ``source``."""
        run, table = self._table(source, shard)
        member = table.get(uid)
        if member is None:
            raise KeyError(f"{uid} has no image in {run.as_given(run.shard_tar(shard))}")
        return run.read_member(shard, member), member.ext


@dataclass
class Neighbor:
    """One search result. ``image`` (encoded bytes, from the run's shard tar) and ``embedding`` (float32,
    unit length, as stored) load on first use."""

    uid: str
    score: float
    caption: str | None
    url: str | None
    shard: str
    source: str  # the run's output folder
    id: int
    clip_score: float | None = None
    captions: dict[str, str | None] = field(default_factory=dict)  # caption_vlm, caption_fused when present
    _retriever: Retriever | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> bytes:
        assert self._retriever is not None  # noqa: S101 - type narrowing; set by the Retriever that made it
        return self._retriever.image_bytes(self.uid)

    @property
    def embedding(self) -> np.ndarray:
        assert self._retriever is not None  # noqa: S101 - type narrowing; set by the Retriever that made it
        return self._retriever.embedding(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "score": self.score,
            "caption": self.caption,
            "url": self.url,
            "shard": self.shard,
            "source": self.source,
            "clip_score": self.clip_score,
            **self.captions,
        }


class Retriever:
    """Query an index from generation code::

        r = Retriever("out/index")
        for nb in r.search_text("a red circle", k=4):
            print(nb.score, nb.caption); open(f"{nb.uid}.jpg", "wb").write(nb.image)

    The CLIP model that made the embeddings (from ``index.json``) loads on the first text or image query."""

    def __init__(self, index_path: str | Path, device: str = "cpu", clip: Any | None = None):
        faiss = load_faiss()
        self.folder = Path(index_path)
        self.info = read_info(self.folder)
        self.index = read_faiss(self.folder, self.info)
        if self.index.ntotal != self.info["count"]:
            raise RetrievalIndexError(
                f"{self.folder}: the FAISS file holds {self.index.ntotal} vectors, index.json says {self.info['count']}"
            )
        if self.info.get("search_params"):
            faiss.ParameterSpace().set_index_parameters(self.index, self.info["search_params"])
        self.meta = pa.concat_tables([read_metadata(self.folder, p) for p in self.info["parts"]])
        self._parts = [read_embeddings(self.folder, p) for p in self.info["parts"]]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self._row_of_uid = {u: i for i, u in reversed(list(enumerate(self.meta["uid"].to_pylist())))}
        self._cols = {c: self.meta[c].to_pylist() for c in self.meta.column_names}
        self._sources = [s["path"] for s in self.info["sources"]]
        self._shards = ShardImages()
        self._device = device
        self._clip = clip
        self._clip_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def clip(self) -> Any:
        with self._clip_lock:
            if self._clip is None:
                from curate.models.clip import ClipModel

                c = self.info["clip"]
                self._clip = ClipModel.load(c["model"], c["pretrained"], self._device)
            return self._clip

    def embed_text(self, prompt: str) -> np.ndarray:
        clip = self.clip
        with self._clip_lock:  # torch modules are not made to be called from many threads at once
            return clip.encode_texts([prompt])[0]

    def embed_image(self, image: str | Path | bytes | Any) -> np.ndarray:
        """A path, encoded bytes or a PIL image -> its CLIP embedding, preprocessed as clip_score does."""
        from PIL import Image

        from curate.kit.image_batches import decode_rgb

        try:
            if isinstance(image, Image.Image):
                img = image.convert("RGB")
            elif isinstance(image, bytes | bytearray):
                img = decode_rgb(bytes(image))
            else:
                img = decode_rgb(Path(image).read_bytes())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise RetrievalIndexError(f"the query image does not decode: {e}") from e
        clip = self.clip
        with self._clip_lock:
            return clip.encode_images([clip.preprocess(img)])[0]

    def search_text(self, prompt: str, k: int = 10) -> list[Neighbor]:
        return self.search_embedding(self.embed_text(prompt), k)

    def search_image(self, image: str | Path | bytes | Any, k: int = 10) -> list[Neighbor]:
        return self.search_embedding(self.embed_image(image), k)

    def search_embedding(self, vector: np.ndarray, k: int = 10) -> list[Neighbor]:
        """Nearest neighbours of one (unit length) vector, best first."""
        return self.search_embeddings(np.asarray(vector)[None, :], k)[0]

    def search_embeddings(self, vectors: np.ndarray, k: int = 10) -> list[list[Neighbor]]:
        x = np.ascontiguousarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.info["dimension"]:
            raise RetrievalIndexError(
                f"query vectors of shape {x.shape}: the index wants [n, {self.info['dimension']}]"
            )
        scores, ids = search(self.index, self._parts, x, k, rerank_factor(self.info["factory"]))
        return [
            [self.neighbor(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def neighbor(self, row: int, score: float = float("nan")) -> Neighbor:
        c = self._cols
        return Neighbor(
            uid=c["uid"][row],
            score=score,
            caption=c["caption"][row],
            url=c["url"][row],
            shard=c["shard"][row],
            source=self._sources[c["source"][row]],
            id=row,
            clip_score=c["clip_score"][row],
            captions={k: c[k][row] for k in EXTRA_CAPTIONS if k in c},
            _retriever=self,
        )

    def get(self, uid: str) -> Neighbor:
        if uid not in self._row_of_uid:
            raise KeyError(uid)
        return self.neighbor(self._row_of_uid[uid])

    def embedding(self, row: int) -> np.ndarray:
        part = int(np.searchsorted(self._starts, row, side="right") - 1)
        return np.asarray(self._parts[part][row - self._starts[part]], np.float32)

    def image_bytes(self, uid: str) -> bytes:
        return self.image_file(uid)[0]

    def image_file(self, uid: str) -> tuple[bytes, str]:
        """``(bytes, extension)`` of the sample's image, read from its shard tar."""
        nb = self.get(uid)
        return self._shards.image(nb.source, nb.shard, uid)


def image_mime(ext: str) -> str:
    """The Content-Type of an image by its extension in a shard tar."""
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(
        ext, "application/octet-stream"
    )
