"""`curate demo` end to end: a small world, served, curated, and checked against its ground truth."""

import json

import pyarrow.parquet as pq


def test_demo_matches_its_ground_truth(tmp_path, cli):
    r = cli("demo", "--output", tmp_path / "demo", "--size", 150)
    assert r.code == 0, r
    line = next(x for x in r.out.splitlines() if x.startswith("download statuses match"))
    agree, checked = line.split(" for ")[1].split(" ")[0].split("/")
    assert agree == checked and int(checked) >= 140  # every fetched row got the status the world planted
    truth = pq.read_table(tmp_path / "demo/world/truth.parquet")
    info = json.loads((tmp_path / "demo/run/run.json").read_text())
    assert info["counts"]["rows"] == truth.num_rows and info["status"] == "finished"
    assert info["counts"]["status"]["http_404"] == truth["expected_status"].to_pylist().count("http_404")
