"""`curate demo` end to end: a small world, served, scored, filtered, and checked against its ground truth.

The demo's own CLIP takes minutes to train (tests/test_tiny_clip.py trains it briefly); here a tiny random
CLIP stands in through ``--clip``, so the scores are real model outputs but their quality is not tested.
"""

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sidecars
from support.data import make_tiny_clip


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_demo_matches_its_ground_truth(tmp_path, cli, executor, request):
    """Under Ray, three model stages run as three actor pools on the 2-CPU test cluster."""
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    clip = make_tiny_clip(tmp_path / "clip")
    (clip / "curate_calibration.json").write_text(json.dumps({"threshold": 0.05}))
    args = ("--size", 150, "--clip", clip, "--executor", executor, "--train-steps", 0)
    r = cli("demo", "--output", tmp_path / "demo", *args)
    assert r.code == 0, r
    line = next(x for x in r.out.splitlines() if x.startswith("download statuses match"))
    agree, checked = line.split(" for ")[1].split(" ")[0].split("/")
    assert agree == checked and int(checked) >= 140  # every fetched row got the status the world planted
    truth = pq.read_table(tmp_path / "demo/world/truth.parquet")
    info = json.loads((tmp_path / "demo/run/run.json").read_text())
    assert info["counts"]["rows"] == truth.num_rows and info["status"] == "finished"
    assert info["counts"]["status"]["http_404"] == truth["expected_status"].to_pylist().count("http_404")

    # Every downloaded row was scored, and the filter's reasons add up with the funnel.
    side = pq.read_table(tmp_path / "demo/run/shards/00000.parquet")
    fetched = side.filter(pc.and_(pc.equal(side["status"], "ok"), pc.is_valid(side["mime"])))
    assert fetched.num_rows > 100
    for column in ("clip_score", "nsfw_score", "text_area", "ai_watermark"):
        assert fetched[column].null_count == 0, column
    reasons = info["counts"]["drop_reason"]
    assert info["counts"]["kept"] == info["counts"]["ok"] - sum(reasons.values())
    assert "mismatched captions removed by clip_score (threshold 0.05)" in r.out
    assert "text overlays found by text_area (threshold 0.15)" in r.out

    # Dedup ran over every shard: byte copies of a row that survived the filters are always found (sha256
    # needs no model); every dropped duplicate points to a kept row.
    line = next(x for x in r.out.splitlines() if "planted copies found" in x)
    found, considered = line.split("exact_duplicate ")[1].split(",")[0].split("/")
    assert found == considered and int(considered) > 0
    everything = sidecars(tmp_path / "demo/run")
    kept = set(everything.filter(pc.is_null(everything["drop_reason"]))["uid"].to_pylist())
    dups = everything.filter(pc.is_valid(everything["dup_of"]))
    assert dups.num_rows >= int(considered) and set(dups["dup_of"].to_pylist()) <= kept
    summary = json.loads((tmp_path / "demo/run/dedup/dedup.json").read_text())
    assert summary["counts"]["exact"] + summary["counts"]["perceptual"] == dups.num_rows

    # The tiny captioners' output is labelled as what it is.
    assert "TINY RANDOM, UNTRAINED" in r.out + r.err

    # The run report is written at the end of the run, with the demo's captions side by side.
    report = json.loads((tmp_path / "demo/run/report/report.json").read_text())
    assert (tmp_path / "demo/run/report/report.html").exists()
    assert report["funnel"][-1]["rows"] == info["counts"]["kept"] and report["samples"]["captions"]

    # The retrieval index is built over the kept samples, and one text query shows its neighbours.
    index = json.loads((tmp_path / "demo/index/index.json").read_text())
    assert index["count"] > 0 and "retrieval index:" in r.out + r.err
