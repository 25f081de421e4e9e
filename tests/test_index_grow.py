"""`curate index add` on a run the index already holds, after the run grew: its new kept samples are added
and the samples it no longer keeps (a new row beat them in dedup) are removed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.index import add_to_index, build_index
from curate.index.store import read_faiss, read_info, read_metadata

DIM = 8


def _vectors(names: list[str]) -> dict[str, list[float]]:
    out = {}
    for k, name in enumerate(names):
        v = np.random.default_rng(k).standard_normal(DIM).astype(np.float32)
        out[name] = (v / np.linalg.norm(v)).tolist()
    return out


VECTORS = _vectors(["u0", "u1", "u2", "u3", "n0", "n1"])


def _shard(run, shard: str, rows: list[tuple[str, str | None]]) -> None:
    """A finished shard of ``rows`` (uid, drop reason), as the writer leaves its sidecar and stats."""
    (run / "shards").mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "uid": [u for u, _ in rows],
            "url": [f"http://example.com/{u}.jpg" for u, _ in rows],
            "caption": [f"caption of {u}" for u, _ in rows],
            "status": ["ok"] * len(rows),
            "drop_reason": pa.array([r for _, r in rows], pa.string()),
            "clip_score": [0.3] * len(rows),
            "image_embedding": pa.array([VECTORS[u] for u, _ in rows], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, run / "shards" / f"{shard}.parquet")
    (run / "shards" / f"{shard}_stats.json").write_text(json.dumps({"shard": shard}))


def _indexed(folder) -> set[str]:
    info = read_info(folder)
    return {u for p in info["parts"] for u in read_metadata(folder, p, columns=["uid"])["uid"].to_pylist()}


def test_adding_a_grown_run_adds_its_new_rows_and_removes_those_it_dropped(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    stage = {"stage": "clip_score", "name": "clip_score", "model": "local-dir:tiny", "embeddings": True}
    (run / "run.json").write_text(
        json.dumps({"name": "t", "fingerprint": "f", "config": {"stages": [stage]}})
    )
    _shard(run, "00000", [("u0", None), ("u1", None), ("u2", None), ("u3", "caption_length<3")])
    index = tmp_path / "index"
    build_index([str(run)], index, factory="Flat")
    assert _indexed(index) == {"u0", "u1", "u2"}

    # The run grew: a new shard, and a new row (n0) that dedup keeps over u1 (its shard rewritten).
    _shard(
        run, "00000", [("u0", None), ("u1", "duplicate:exact:n0"), ("u2", None), ("u3", "caption_length<3")]
    )
    _shard(run, "00001", [("n0", None), ("n1", None)])
    r = cli("index", "add", index, run)
    assert r.code == 0 and "added 2 samples" in r.out and "removed 1 it no longer keeps" in r.out, r
    info = read_info(index)
    assert _indexed(index) == {"u0", "u2", "n0", "n1"} and info["count"] == 4
    assert info["no_longer_kept"] == 1 and "taken_down" not in info
    # Every FAISS id still maps to its own sample: each vector finds itself.
    faiss_index = read_faiss(index, info)
    metas = pa.concat_tables([read_metadata(index, p) for p in info["parts"]])
    by_id = dict(zip(metas["id"].to_pylist(), metas["uid"].to_pylist(), strict=True))
    for uid in ("u0", "u2", "n0", "n1"):
        _, ids = faiss_index.search(np.asarray([VECTORS[uid]], np.float32), 1)
        assert by_id[int(ids[0, 0])] == uid

    # Adding it again changes nothing.
    again = add_to_index(index, str(run))
    assert _indexed(index) == {"u0", "u2", "n0", "n1"} and again["count"] == 4
    assert again["sources"][-1]["added"] == 0 and again["sources"][-1]["removed"] == 0
