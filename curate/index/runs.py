"""What an index is built from: the kept samples of a finished (or partly finished) run that carry a CLIP
image embedding, read from the run's parquet sidecars (no recompute), and the checks that runs can share
an index (the same CLIP model, the same dimension).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.base import RetrievalIndexError
from curate.core.output import OutputFolder, read_sidecar

__all__ = ["EXTRA_CAPTIONS", "RunRows", "check_compatible", "read_run", "unique_new"]

EXTRA_CAPTIONS = ("caption_vlm", "caption_fused")


@dataclass
class RunRows:
    """The kept rows of one run that carry an embedding."""

    source: dict[str, Any]  # path, name, fingerprint, model, pretrained
    meta: pa.Table
    vectors: np.ndarray  # [n, d] float16
    skipped: dict[str, int] = field(default_factory=dict)


def _clip_stage(info: dict[str, Any], path: str) -> dict[str, Any]:
    stages = [s for s in info.get("config", {}).get("stages", []) if s.get("stage") == "clip_score"]
    if not stages:
        raise RetrievalIndexError(
            f"{path}: the run has no clip_score stage, so no image embeddings to index: add clip_score "
            "(embeddings: true) to the pipeline"
        )
    if not stages[-1].get("embeddings", True):
        raise RetrievalIndexError(
            f"{path}: clip_score ran with embeddings: false; run it with embeddings: true"
        )
    return stages[-1]


def read_run(path: str, progress: Callable[[str], None] | None = None) -> RunRows:
    """The kept samples of a finished (or partly finished) run with their embeddings, from the sidecars."""
    out = OutputFolder(path)
    info = out.read_run()
    if info is None:
        raise RetrievalIndexError(f"{path} holds no run.json: not a curate output folder")
    stage = _clip_stage(info, path)
    shards = out.finished_shards()  # a shard counts once its stats file, written last, exists
    if not shards:
        raise RetrievalIndexError(f"{path}: no finished shards (shards/*_stats.json): nothing to index yet")
    absolute = str(Path(path).resolve()) if "://" not in path else path
    model = str(stage.get("model"))
    if model.startswith("local-dir:") and Path(model[len("local-dir:") :]).is_dir():
        # run.json keeps the path as written, often relative to where the run started: pin it down
        model = f"local-dir:{Path(model[len('local-dir:') :]).resolve()}"
    source = {
        "path": absolute,
        "name": info.get("name"),
        "fingerprint": info.get("fingerprint"),
        "model": model,
        "pretrained": stage.get("pretrained"),
    }
    metas, vectors = [], []
    skipped = {"dropped": 0, "no_embedding": 0}
    for shard in shards:
        with out.fs.open(out.shard_parquet(shard), "rb") as f:
            schema = pq.read_schema(f)
            wanted = ["uid", "url", "caption", "status", "drop_reason", "clip_score", "image_embedding"]
            wanted += [c for c in EXTRA_CAPTIONS if c in schema.names]
            if "image_embedding" not in schema.names:
                raise RetrievalIndexError(
                    f"{path}: shard {shard} has no image_embedding column: run clip_score with embeddings: true"
                )
            f.seek(0)
            table = read_sidecar(f, columns=[c for c in wanted if c in schema.names])
        ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
        kept = table.filter(pc.and_(ok, pc.is_null(table["drop_reason"])))
        skipped["dropped"] += table.num_rows - kept.num_rows
        has = kept.filter(pc.is_valid(kept["image_embedding"]))
        skipped["no_embedding"] += kept.num_rows - has.num_rows
        if not has.num_rows:
            continue
        flat = pc.list_flatten(has["image_embedding"]).to_numpy()
        vectors.append(flat.reshape(has.num_rows, -1).astype(np.float16, copy=False))
        extra = {
            c: has[c] if c in has.column_names else pa.nulls(has.num_rows, pa.string())
            for c in EXTRA_CAPTIONS
        }
        metas.append(
            pa.table(
                {
                    "uid": has["uid"],
                    "caption": has["caption"],
                    "url": has["url"],
                    "shard": pa.array([shard] * has.num_rows, pa.string()),
                    "clip_score": has["clip_score"].cast(pa.float32()),
                    **extra,
                }
            )
        )
        if progress:
            progress(f"read shard {shard}: {has.num_rows:,} kept samples with embeddings")
    if not metas:
        raise RetrievalIndexError(
            f"{path}: no kept sample has an image embedding ({skipped['dropped']:,} dropped, "
            f"{skipped['no_embedding']:,} kept without one): nothing to index"
        )
    dims = {v.shape[1] for v in vectors}
    if len(dims) > 1:
        raise RetrievalIndexError(f"{path}: shards hold embeddings of different dimensions {sorted(dims)}")
    return RunRows(source, pa.concat_tables(metas), np.concatenate(vectors), skipped)


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["model"] != b["model"]:
        return False
    return str(a["model"]).startswith("local-dir:") or a["pretrained"] == b["pretrained"]


def _model_text(s: dict[str, Any]) -> str:
    return s["model"] if str(s["model"]).startswith("local-dir:") else f"{s['model']} ({s['pretrained']})"


def check_compatible(clip: dict[str, Any], dim: int, rows: RunRows, path: str) -> None:
    """Refuse rows embedded by another CLIP model (``clip``: model, pretrained) or of another dimension."""
    if not _same_model(clip, rows.source):
        raise RetrievalIndexError(
            f"{path} was embedded with {_model_text(rows.source)}, the index with {_model_text(clip)}: "
            "embeddings of different CLIP models cannot share an index; build a separate one"
        )
    if rows.vectors.shape[1] != dim:
        raise RetrievalIndexError(
            f"{path} has embeddings of dimension {rows.vectors.shape[1]}, the index {dim}"
        )


def unique_new(rows: RunRows, seen: set[str]) -> RunRows:
    """Drop rows whose uid is already indexed (or repeats within the run): the first one stays. Adds the
    new uids to ``seen``."""
    uids = rows.meta["uid"].to_pylist()
    keep = []
    for i, u in enumerate(uids):
        if u not in seen:
            seen.add(u)
            keep.append(i)
    repeated = len(uids) - len(keep)
    if repeated:
        idx = pa.array(keep, pa.int64())
        rows = RunRows(rows.source, rows.meta.take(idx), rows.vectors[keep], rows.skipped)
    rows.skipped["already_indexed"] = repeated
    return rows
