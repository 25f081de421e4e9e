"""A run's output as other tools read it: code written for img2dataset's output (its column and stats names,
with ``output.naming: img2dataset``), webdataset, Ray Data with the README's exact call, and HuggingFace
``datasets.load_dataset("webdataset", ...)``.

One small run over the sample world (40 rows, some of whose URLs fail), two shards.
"""

from __future__ import annotations

import glob
import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import sidecars, write_pipeline

from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.core.schema import is_kept
from curate.core.writer import img2dataset_status

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory, world_server):
    world, server = world_server
    tmp = tmp_path_factory.mktemp("readers")
    pq.write_table(world.input_table(server.url).slice(0, 40), tmp / "in.parquet")
    download = {"stage": "download", "image_size": 32, "resize_mode": "center_crop", "retries": 0}
    download |= {"read_timeout": 2, "total_timeout": 4}
    download["allow_private"] = [server.host_port]
    p = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "out",
        [download],
        input={"url_col": "url", "caption_col": "caption"},
        output={"naming": "img2dataset"},
        shard_size=20,
    )
    assert run_pipeline(load_config(p, []), show_progress=False).exit_code == 0
    return tmp / "out"


def test_code_written_for_img2dataset_reads_the_run(run):
    """What scripts over img2dataset's output folder do, written with img2dataset's names only."""
    folder = str(run / "shards")
    # Its logger's totals, from every {shard}_stats.json.
    stats = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(folder + "/*_stats.json"))]
    count = sum(s["count"] for s in stats)
    successes = sum(s["successes"] for s in stats)
    failed = sum(s["failed_to_download"] + s["failed_to_resize"] for s in stats)
    status_dict = Counter()
    for s in stats:
        status_dict.update(s["status_dict"])
        assert s["end_time"] - s["start_time"] == pytest.approx(s["duration"], abs=1e-5) and s["duration"] > 0
    # Its parquet, by its column names.
    df = pd.concat(pd.read_parquet(f) for f in sorted(glob.glob(folder + "/*.parquet")))
    cols = ["key", "status", "url", "caption", "error_message", "width", "height", "original_width"]
    cols += ["original_height"]
    df = df[[*cols, "exif", "sha256"]]
    # Its tars: key.jpg, key.txt, key.json whose "key" is the member's key.
    samples = list(
        wds.WebDataset(sorted(glob.glob(folder + "/*.tar")), shardshuffle=False, empty_check=False)
    )

    side = sidecars(run).to_pandas()
    ok = side["status"] == "ok"
    assert count == len(df) == len(side) == 40 and 0 < successes == ok.sum() < 40
    assert failed == (~ok).sum() and status_dict["success"] == successes
    assert sum(status_dict.values()) == count
    assert df["key"].tolist() == side["uid"].tolist()
    # status is img2dataset's outcome (curate's own code is curate_status, which curate's tools read).
    assert (df["status"] == "success").tolist() == ok.tolist()
    assert set(df["status"]) <= {"success", "failed_to_download", "failed_to_resize"}
    assert df["error_message"].isna().tolist() == ok.tolist()
    got = df[df["error_message"].isna()]
    assert (got["original_width"] >= got["width"]).all() and (got["width"] == 32).all()
    assert df["exif"].isna().all() and (df["sha256"].str.len() == 64)[ok.values].all()
    assert sorted(s["__key__"] for s in samples) == sorted(side[ok]["uid"])
    for s in samples:
        meta = json.loads(s["json"])
        assert (
            meta["key"] == s["__key__"] and meta["error_message"] is None and s["jpg"][:3] == b"\xff\xd8\xff"
        )
        assert (meta["original_width"], meta["original_height"]) == (meta["orig_width"], meta["orig_height"])
        assert (meta["status"], meta["curate_status"]) == ("success", "ok")
    # Every curate status is one of img2dataset's three outcomes.
    outcomes = Counter(img2dataset_status(s) for s in side["status"])
    assert outcomes["success"] == successes and sum(outcomes.values()) == count
    assert sum(s["failed_to_resize"] for s in stats) == outcomes["failed_to_resize"]


def _readme_block(start: str) -> str:
    """The README's python block that contains ``start``."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        if start in block:
            return block
    raise AssertionError(f"the README shows no {start!r}")


def test_ray_data_reads_the_tars_with_the_readmes_call(run, ray_cluster):
    import ray.data

    block = _readme_block("ray.data.read_webdataset(")
    call = re.search(r'ray\.data\.read_webdataset\("out/shards"[^\n]*\)', block).group(0)
    assert call == 'ray.data.read_webdataset("out/shards", file_extensions=["tar"])'
    # The README's line with this run's folder for "out/shards" (Ray's workers do not share our directory).
    call = call.replace('"out/shards"', repr(str(run / "shards")))
    rows = eval(call, {"ray": ray}).take_all()
    side = sidecars(run)
    assert sorted(r["__key__"] for r in rows) == sorted(side.filter(is_kept(side))["uid"].to_pylist())
    assert all(r["json"]["key"] == r["__key__"] and r["jpg"].shape == (32, 32, 3) for r in rows)


def test_huggingface_datasets_reads_the_tars_as_the_readme_shows(run, tmp_path, monkeypatch):
    block = _readme_block("load_dataset(")
    call = re.search(r'load_dataset\("webdataset"[^\n]*\)', block).group(0)
    assert call == 'load_dataset("webdataset", data_files={"train": "out/shards/*.tar"}, split="train")'
    from datasets import load_dataset

    monkeypatch.chdir(run.parent)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = eval(call, {"load_dataset": load_dataset})
    side = sidecars(run).to_pandas().set_index("uid")
    assert sorted(ds["__key__"]) == sorted(side[side["status"] == "ok"].index)
    for row in ds:
        meta, want = row["json"], side.loc[row["__key__"]]
        assert meta["key"] == row["__key__"] and meta["url"] == want["url"]
        assert row["txt"] == want["caption"] and row["jpg"].size == (32, 32)
