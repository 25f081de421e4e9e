"""`curate demo` end to end: a small world, served, scored, filtered, and checked against its ground truth.

The first test gives a tiny random CLIP through ``--clip`` (its scores are real model outputs, their quality
untested); the second runs with the demo CLIP the package ships, as a user's ``make demo`` does.
"""

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from conftest import sidecars
from support.data import make_tiny_clip


def test_demo_matches_its_ground_truth(tmp_path, cli):
    """Locally. Under Ray the same pipeline writes the same bytes (tests/test_executors.py,
    tests/test_clip_score.py), and model stages as actor pools run end to end in tests/test_flagship.py."""
    clip = make_tiny_clip(tmp_path / "clip")
    (clip / "curate_calibration.json").write_text(json.dumps({"threshold": 0.05}))
    args = ("--size", 150, "--clip", clip, "--executor", "local", "--train-steps", 0)
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

    # It ends with what to look at: the report, a query to run, and the comparison (not trained here).
    end = r.out[r.out.index("what to look at") :]
    assert f"{tmp_path / 'demo'}/run/report/report.html" in end.replace("\n", "")
    assert "curate index query" in end and "not trained (--train-steps 0)" in end


def test_two_runs_over_the_same_world_give_the_same_rows_and_numbers(tmp_path, cli):
    """The world's server listens on a new port each time; the uids come from a port-free address
    (input.uid_col), so the rows, their order, every decision and every printed number are the same. The
    demo CLIP is the one the package ships, unpacked in a second rather than trained."""
    outs = []
    for name in ("first", "second"):
        r = cli("demo", "--output", tmp_path / name, "--size", 80, "--train-steps", 0)
        assert r.code == 0, r
        assert "the demo CLIP as the package ships it (450 steps" in r.out + r.err
        outs.append(r.out)
    a, b = sidecars(tmp_path / "first/run"), sidecars(tmp_path / "second/run")
    assert a["url"].to_pylist() != b["url"].to_pylist()  # two servers, two ports
    # Left out: the URLs (and error messages, which may quote one), and the tiny RANDOM captioners' words:
    # their logits are so flat that float rounding in a batched matmul can flip a token. The demo trains on
    # the alt-text (train_caption: alt), so its numbers do not depend on them.
    noise = [c for c in a.column_names if c in ("url", "error", "caption_vlm", "caption_fused")]
    a, b = a.drop_columns(noise), b.drop_columns(noise)
    assert a.column_names == b.column_names
    for name in a.column_names:  # scores agree to float rounding (threaded matmuls); everything else exactly
        x, y = a[name].to_pylist(), b[name].to_pylist()
        if pa.types.is_floating(a.schema.field(name).type):
            assert [v is None for v in x] == [v is None for v in y], name
            np.testing.assert_allclose([v or 0 for v in x], [v or 0 for v in y], atol=1e-6, err_msg=name)
        elif pa.types.is_list(a.schema.field(name).type):  # embeddings, in float16
            for u, v in zip(x, y, strict=True):
                assert (u is None) == (v is None), name
                if u is not None:
                    np.testing.assert_allclose(u, v, atol=1e-3, err_msg=name)
        else:
            assert x == y, name
    for tar in sorted((tmp_path / "first/run/shards").glob("*.tar")):
        with tarfile.open(tar) as x, tarfile.open(tmp_path / "second/run/shards" / tar.name) as y:
            assert x.getnames() == y.getnames()
            for m in x.getnames():
                if not m.endswith(".json"):  # the json holds the url
                    assert x.extractfile(m).read() == y.extractfile(m).read(), m
    numbers = [
        [line for line in out.splitlines() if line.startswith(prefix)]
        for out in outs
        for prefix in ("download statuses", "mismatched captions", "text overlays", "duplicates removed")
    ]
    assert numbers[:4] == numbers[4:] and all(numbers)


def test_the_comparison_interval_is_a_seeded_paired_bootstrap():
    from curate.demo.train_compare import paired_interval

    rng = np.random.default_rng(1)
    raw = rng.random(128).tolist()
    curated = [x + 0.1 + rng.normal(0, 0.05) for x in raw]
    ci = paired_interval([*curated, None], [*raw, 0.5])  # a prompt one model skipped is left out
    assert ci["n"] == 128 and ci["low"] < ci["diff"] < ci["high"]
    assert abs(ci["diff"] - 0.1) < 0.02 and ci["high"] - ci["low"] < 0.03
    assert paired_interval(curated, raw) == paired_interval(curated, raw)  # seeded: the same every time


def test_the_interval_over_seeds_resamples_seeds_as_well_as_prompts():
    from curate.demo.train_compare import paired_interval, two_level_interval

    rng = np.random.default_rng(2)
    same = [np.full(64, 0.1), np.full(64, 0.1)]
    assert np.allclose(two_level_interval(same), (0.1, 0.1))
    # Three seeds whose prompts agree within each seed but whose means differ: the prompt interval of any one
    # seed is narrow, the interval over seeds spans their means.
    diffs = [m + rng.normal(0, 0.01, 128) for m in (0.05, 0.10, 0.15)]
    low, high = two_level_interval(diffs)
    one = paired_interval(list(diffs[1]), [0.0] * 128)
    assert one["high"] - one["low"] < 0.01
    assert low < 0.07 and high > 0.13 and low < float(np.mean([d.mean() for d in diffs])) < high
    assert two_level_interval(diffs) == (low, high)  # seeded
