"""The demo's retrieval index: built over the demo run, with one text query shown (``curate demo``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from curate.index import Retriever, build_index, describe_index

__all__ = ["demo_index"]


def demo_index(
    output: str | Path, index_path: str | Path, say: Callable[[str], None], k: int = 5
) -> dict[str, Any]:
    """Build an index over a run and show one text query: the caption of the kept sample with the best
    clip_score, and its ``k`` nearest samples."""
    info = build_index([str(output)], index_path)
    r = Retriever(index_path)
    scores = np.nan_to_num(
        np.asarray(r.meta["clip_score"].to_numpy(zero_copy_only=False), np.float64), nan=-2
    )
    prompt = r.meta["caption"][int(np.argmax(scores))].as_py() or ""
    hits = r.search_text(prompt, k)
    say(f"retrieval index: {index_path} ({describe_index(info)}); query {prompt!r}:")
    for n in hits:
        say(f"  {n.score:.3f}  {n.caption}  ({n.uid})")
    return {
        "path": str(index_path),
        "count": info["count"],
        "prompt": prompt,
        "neighbors": [n.to_dict() for n in hits],
    }
