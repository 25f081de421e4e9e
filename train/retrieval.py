"""Neighbours for retrieval-augmented training and generation, from a curate index (``curate index build``).

Each training image's neighbours are searched with its own CLIP image embedding (from its run's sidecars,
where clip_score wrote it); the image itself, its recorded duplicates (``dup_of`` in either direction) and
anything at least ``exclude_similarity`` alike (a copy the dedup did not remove) are skipped, so the model
learns to use related images rather than to copy the answer. At generation, neighbours are searched with the
prompt's CLIP text embedding, as :class:`curate.index.Retriever` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.train.config import RetrievalConfig

__all__ = ["NeighbourTable", "prompt_neighbours", "training_neighbours"]


class NeighbourTable:
    """uid -> its neighbours' embeddings [k, d] (float32)."""

    def __init__(self, uids: list[str], vectors: np.ndarray):
        self.rows = {u: i for i, u in enumerate(uids)}
        self.vectors = vectors

    def get(self, uid: str) -> np.ndarray | None:
        i = self.rows.get(uid)
        return None if i is None else np.asarray(self.vectors[i], np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[-1])


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


def training_neighbours(cfg: RetrievalConfig, roots: list[str], say=print) -> NeighbourTable:
    """Each training sample's ``k`` neighbours from the index (never itself or its duplicates)."""
    from curate.index import Retriever

    retriever = Retriever(cfg.index)
    uids, vectors, related = _run_samples(roots)
    dim = retriever.info["dimension"]
    if vectors.shape[1] != dim:
        raise ValueError(f"the runs' embeddings have dimension {vectors.shape[1]}, the index {dim}")
    k = cfg.k
    out = np.zeros((len(uids), k, dim), np.float16)
    short = 0
    batch = 4096
    for start in range(0, len(uids), batch):
        found = retriever.search_embeddings(vectors[start : start + batch], k * 2 + 8)
        for j, hits in enumerate(found):
            uid = uids[start + j]
            skip = related.get(uid, set()) | {uid}
            picked = [h for h in hits if h.uid not in skip and h.score < cfg.exclude_similarity][:k]
            if len(picked) < k:
                short += 1
            for r, h in enumerate(picked):
                out[start + j, r] = retriever.embedding(h.id)
            # fewer than k usable neighbours: the remaining slots repeat the nearest ones
            for r in range(len(picked), k):
                out[start + j, r] = out[start + j, r % max(len(picked), 1)]
    say(
        f"retrieval: {k} neighbours for each of {len(uids):,} training samples from {cfg.index} "
        f"({short:,} had fewer than {k} that were not themselves or duplicates)"
    )
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
