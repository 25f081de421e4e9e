"""logging: wandb sends Weights & Biases the scalars and sample grids TensorBoard gets, at the same steps;
tested offline (WANDB_MODE=offline), reading the run file wandb writes for a later `wandb sync`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import _config, make_tiny_clip, write_shard

from curate.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wandb_records(path: Path):
    """The records of an offline run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-style log
    chunks (crc32, length, type) in 32 KiB blocks, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield pb.Record.FromString(pending)
            pending = b""


def test_wandb_offline_gets_the_same_scalars_and_sample_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    world = {
        "shard": write_shard(tmp_path / "shards" / "00000.tar"),
        "clip": make_tiny_clip(tmp_path / "clip"),
    }
    cfg = _config(
        world,
        tmp_path / "t",
        **{
            "logging": "wandb",
            "wandb_project": "curate-test",
            "validation.prompts": ["a red square"],
            "validation.sample_steps": 2,
        },
    )
    summary = train(cfg, progress=False)
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run_id = (tmp_path / "t" / "logs" / "wandb-run-id").read_text()
    assert runs[0].name == f"run-{run_id}.wandb"  # kept for a resumed training to continue the run
    history: dict[int, dict] = {}
    for record in wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for h in summary["history"]:
        assert history[h["step"]]["train/loss"] == pytest.approx(h["loss"], rel=1e-12)
        assert history[h["step"]]["train/lr"] == pytest.approx(h["lr"], rel=1e-12)
        assert "train/samples_per_s" in history[h["step"]]
    step2 = history[2]  # the image's fields come as nested keys
    assert step2["val/samples/_type"] == "image-file" and step2["val/samples/format"] == "png"
    from PIL import Image

    grid = Image.open(runs[0].parent / "files" / step2["val/samples/path"])
    assert grid.size == Image.open(tmp_path / "t" / "samples" / "step-00000002.png").size
    assert "val/seconds" in step2
    assert list((tmp_path / "t" / "logs").glob("events.out.tfevents.*"))  # TensorBoard as well
