"""The bundled trainer on real shards of the sample world: load-time filters, rank/worker splitting, a CPU
smoke run with checkpoints, TensorBoard logs and validation, exact resume, generation and retrieval-augmented
generation, a transformers text encoder with a VAE (latent space), and config errors.

The models are tiny (a UNet of ~0.3 M parameters at 16 px) and random; what is checked is behaviour a user
relies on, not image quality (the demo measures that)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import sidecars, write_pipeline
from PIL import Image
from safetensors.torch import load_file
from support.data import make_tiny_clip

from curate.base import ConfigError, TrainError
from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.index import build_index
from curate.train.config import DataConfig, parse_train_config
from curate.train.data import ShardStream, find_shards, in_holdout, iter_samples
from curate.train.generate import generate
from curate.train.trainer import dist_env, train

UNET = {
    "preset": None,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, world_server):
    """A run over the 200-row world: download (64 px) and clip_score with a tiny CLIP, 4 shards; and an
    index over it."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("train-run")
    clip = make_tiny_clip(tmp / "clip")
    pipeline = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "run",
        [
            {
                "stage": "download",
                "image_size": 64,
                "resize_mode": "center_crop",
                "allow_private": [server.host_port],
            },
            {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 1, "decode_threads": 1},
        ],
        input={"url_col": "url", "caption_col": "caption"},
        shard_size=50,
    )
    import pyarrow.parquet as pq

    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    run_pipeline(load_config(pipeline, []), overwrite=True, show_progress=False)
    build_index([str(tmp / "run")], tmp / "index")
    return {"run": tmp / "run", "index": tmp / "index", "clip": clip, "tmp": tmp}


def _kept(output: Path):
    side = sidecars(output)
    ok = pc.and_(pc.equal(side["status"], "ok"), pc.is_null(side["drop_reason"]))
    return side.filter(ok)


def _config(run, output, **over):
    raw = {
        "output": str(output),
        "seed": 1,
        "data": {"shards": [str(run["run"])], "resolution": 16, "shuffle_buffer": 16},
        "model": {"unet": UNET, "text_encoder": {"kind": "from_run", "max_tokens": 16}},
        "optim": {"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "ema_decay": 0.9},
        "schedule": {"steps": 4, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 5},
        "validation": {"every": None, "prompts": ["a red circle on a blue background"], "sample_steps": 2},
    }
    for key, value in over.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_train_config(raw)


# -- data ----------------------------------------------------------------------------------------------------


def test_shards_are_the_runs_finished_ones_and_read_back_every_kept_sample(run):
    shards = find_shards([str(run["run"])])
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    uids = [s.uid for shard in shards for s in iter_samples(shard)]
    assert sorted(uids) == sorted(_kept(run["run"])["uid"].to_pylist())
    # a shard without its stats file (unfinished) is not trained on
    stats = run["run"] / "shards" / "00003_stats.json"
    saved = stats.read_bytes()
    stats.unlink()
    try:
        assert len(find_shards([str(run["run"])])) == 3
    finally:
        stats.write_bytes(saved)


def _epoch_uids(stream: ShardStream, workers: int, epoch_batches: int | None = None) -> list[str]:
    """The uids one rank sees in its first epoch, over all its workers."""
    uids = []
    for w in range(workers):
        for batch in stream.worker_batches(w, workers):
            if batch["epoch"] > 0:
                break
            uids += batch["uids"]
    return uids


def test_load_time_filters_keep_exactly_the_samples_whose_json_passes(run):
    kept = _kept(run["run"])
    scores = dict(zip(kept["uid"].to_pylist(), kept["clip_score"].to_pylist(), strict=True))
    threshold = float(np.median([v for v in scores.values() if v is not None]))
    cfg = DataConfig(shards=[str(run["run"])], rules=[f"clip_score >= {threshold}"], resolution=16)
    seen = _epoch_uids(ShardStream(find_shards(cfg.shards), cfg, batch_size=7), 1)
    expected = {u for u, v in scores.items() if v is not None and v >= threshold}
    assert len(seen) == len(set(seen)) == len(expected) > 0
    assert set(seen) == expected
    # min_size reads width/height from the json: every image here is 64 px, so 65 keeps none
    cfg = DataConfig(shards=[str(run["run"])], min_size=65, resolution=16)
    with pytest.raises(ValueError, match="no sample passed the filters"):
        next(ShardStream(find_shards(cfg.shards), cfg, batch_size=7).worker_batches(0, 1))


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_see_every_sample_once_per_epoch(run, world, workers):
    cfg = DataConfig(shards=[str(run["run"])], resolution=16, holdout=0.1, shuffle_buffer=10)
    shards = find_shards(cfg.shards)
    per_rank = [
        _epoch_uids(ShardStream(shards, cfg, batch_size=5, seed=3, rank=r, world=world), workers)
        for r in range(world)
    ]
    everything = [u for part in per_rank for u in part]
    expected = {u for u in _kept(run["run"])["uid"].to_pylist() if not in_holdout(u, 0.1)}
    assert Counter(everything).most_common(1)[0][1] == 1  # no sample twice across ranks and workers
    assert set(everything) == expected
    assert all(per_rank)  # every rank got work
    # with 4 shards and world * workers slots: shard-level split when there are enough shards, else samples
    assert len(shards) >= world * workers or all(len(p) > 0 for p in per_rank)


def test_a_stream_skips_consumed_batches_and_continues_with_the_same_ones(run):
    cfg = DataConfig(shards=[str(run["run"])], resolution=16, shuffle_buffer=10)
    shards = find_shards(cfg.shards)
    full = ShardStream(shards, cfg, batch_size=6, seed=5).worker_batches(0, 1)
    first = [next(full) for _ in range(40)]  # more than one epoch (about 30 batches)
    assert {b["epoch"] for b in first} == {0, 1}
    resumed = ShardStream(shards, cfg, batch_size=6, seed=5, consumed={0: 25}).worker_batches(0, 1)
    again = [next(resumed) for _ in range(15)]
    for a, b in zip(first[25:], again, strict=True):
        assert a["uids"] == b["uids"] and a["number"] == b["number"]
        assert torch.equal(a["pixels"], b["pixels"])


def test_rank_discovery_from_torchrun_and_slurm():
    assert dist_env({}) == dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    e = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (e.rank, e.world, e.local_rank) == (3, 8, 1)
    e = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (e.rank, e.world, e.local_rank) == (5, 16, 1)


# -- training --------------------------------------------------------------------------------------------------


def test_a_cpu_run_trains_checkpoints_logs_and_validates(run, tmp_path):
    cfg = _config(
        run,
        tmp_path / "t",
        **{
            "data.holdout": 0.2,
            "validation.fid_samples": 8,
            "validation.eval_samples": 4,
            "validation.feature_extractor": "clip",
        },
    )
    lines: list[str] = []
    summary = train(cfg, say=lines.append, progress=False)
    out = tmp_path / "t"
    assert summary["steps"] == 4 and [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in summary["history"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    ckpt = out / "checkpoints" / "step-00000004"
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["data"]["resolution"] == 16
    assert sum(state["consumed"]["0"].values()) == 4  # batches trained on, for resume
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert Image.open(out / "samples" / "step-00000004.png").size[0] > 16
    val = json.loads((out / "validation.jsonl").read_text().splitlines()[-1])
    m = val["metrics"]
    assert 0 <= m["clip_score"] <= 100
    assert m["fid"] >= 0 and m["fid_n"] == 8 and m["fid_features"].startswith("clip:")
    assert any("training" in line and "M parameters" in line for line in lines)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "clip_score" in page  # curves and the grid


def test_validation_scores_with_the_prompt_scorer_the_caller_supplies(run, tmp_path):
    """The trainer knows no analyser of its own (it never imports the demo): validation.adherence scores the
    generated images with the scorer the caller names 'adherence', and without one it refuses to start."""
    over = {
        "schedule.steps": 1,
        "checkpoint.every": 1,
        "validation.adherence": True,
        "validation.eval_prompts": [
            "a red circle on a blue background",
            "a green star on a white background",
        ],
        "validation.eval_samples": 2,
    }
    seen = []

    def scorer(images, prompts):
        seen.append(([im.size for im in images], list(prompts)))
        return {"adherence": 0.25, "n": len(images)}

    with pytest.raises(TrainError, match="adherence"):
        train(_config(run, tmp_path / "none", **over), progress=False)
    assert not (tmp_path / "none").exists()  # refused before any work
    train(_config(run, tmp_path / "t", **over), progress=False, prompt_scorers={"adherence": scorer})
    assert seen == [([(16, 16)] * 2, over["validation.eval_prompts"])]
    metrics = json.loads((tmp_path / "t" / "validation.jsonl").read_text().splitlines()[-1])["metrics"]
    assert metrics["adherence"] == 0.25 and metrics["adherence_n"] == 2


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(run, tmp_path):
    straight = train(
        _config(run, tmp_path / "a", **{"schedule.steps": 6, "checkpoint.every": 6}), progress=False
    )
    assert straight["steps"] == 6
    train(_config(run, tmp_path / "b", **{"schedule.steps": 3, "checkpoint.every": 3}), progress=False)
    resumed = train(
        _config(run, tmp_path / "b", **{"schedule.steps": 6, "checkpoint.every": 3}), progress=False
    )
    assert resumed["steps"] == 6
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a/checkpoints/step-00000006" / name)
        b = load_file(tmp_path / "b/checkpoints/step-00000006" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # and training did move the weights
    first = load_file(tmp_path / "b/checkpoints/step-00000003/model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)


def test_a_checkpoint_with_another_model_config_refuses_to_resume(run, tmp_path):
    train(_config(run, tmp_path / "c", **{"schedule.steps": 1, "checkpoint.every": 1}), progress=False)
    other = dict(UNET, block_out_channels=[16, 16])
    with pytest.raises(ValueError, match="another model config"):
        train(_config(run, tmp_path / "c", **{"model.unet": other}), progress=False)


def test_generate_writes_images_of_the_trained_size(run, tmp_path, cli):
    train(_config(run, tmp_path / "g", **{"schedule.steps": 2}), progress=False)
    result = generate(
        tmp_path / "g", ["a red circle on a blue background", "a star"], steps=3, images_per_prompt=2
    )
    assert result["images"].shape == (4, 16, 16, 3) and result["images"].dtype == np.uint8
    assert result["step"] == 2
    r = cli(
        "generate",
        "--checkpoint",
        tmp_path / "g",
        "-p",
        "a red square",
        "--out",
        tmp_path / "png",
        "--steps",
        2,
    )
    assert r.code == 0, r.err
    assert Image.open(tmp_path / "png" / "0000-00.png").size == (16, 16)
    # same seed, same images; the EMA weights are the default
    again = generate(
        tmp_path / "g", ["a red circle on a blue background", "a star"], steps=3, images_per_prompt=2
    )
    assert np.array_equal(result["images"], again["images"])
    r = cli(
        "generate", "--checkpoint", tmp_path / "g", "-p", "x", "--rag", run["index"], "--out", tmp_path / "x"
    )
    assert r.code == 2 and "trained without retrieval" in r.err


def test_retrieval_augmented_training_and_generation(run, tmp_path, cli, monkeypatch):
    """The tiny random CLIP gives every image nearly the same embedding, so the default exclude_similarity
    (0.97) would skip every neighbour as a copy and train on none (zeros); at 1.01 only the image itself and
    its recorded duplicates are skipped, and the model trains on real neighbours."""
    from curate.train.retrieval import NeighbourTable

    conditioned: list = []
    collate = NeighbourTable.collate

    def recording(self, values):
        batch = collate(self, values)
        conditioned.append(batch["neighbours"])
        return batch

    monkeypatch.setattr(NeighbourTable, "collate", recording)
    retrieval = {"index": str(run["index"]), "k": 3, "exclude_similarity": 1.01}
    cfg = _config(run, tmp_path / "rag", **{"model.retrieval": retrieval, "optim.rag_dropout": 0.3})
    lines: list[str] = []
    train(cfg, say=lines.append, progress=False)
    assert any("3 neighbours for each of" in line and "(0 had fewer than 3" in line for line in lines), lines
    assert len(conditioned) >= 4  # one batch per step
    for batch in conditioned:  # every sample of every batch conditioned on k real (unit-length) embeddings
        assert batch.shape[1:] == (3, 32)
        assert (batch.float().norm(dim=-1) > 0.9).all()
    state = json.loads((tmp_path / "rag/checkpoints/step-00000004/state.json").read_text())
    assert state["clip_dim"] == 32
    weights = load_file(tmp_path / "rag/checkpoints/step-00000004/model.safetensors")
    assert weights["retrieval.null"].shape == (3, 32)  # k null tokens of the text width
    r = cli(
        "generate",
        "--checkpoint",
        tmp_path / "rag",
        "-p",
        "a red circle on a blue background",
        "--rag",
        run["index"],
        "-k",
        3,
        "--rag-guidance",
        2,
        "--steps",
        2,
        "--out",
        tmp_path / "out",
    )
    assert r.code == 0, r.err
    assert Image.open(tmp_path / "out" / "0000-00.png").size == (16, 16)
    with_rag = generate(tmp_path / "rag", ["a red circle"], steps=2, rag=str(run["index"]), rag_guidance=2)
    without = generate(tmp_path / "rag", ["a red circle"], steps=2)
    assert not np.array_equal(with_rag["images"], without["images"])  # the neighbours do condition it
    r = cli("generate", "--checkpoint", tmp_path / "rag", "-p", "x", "--rag", run["index"], "-k", 5)
    assert r.code == 2 and "k=3" in r.err


def test_training_neighbours_are_never_the_sample_itself(run):
    from curate.index import Retriever
    from curate.train.config import RetrievalConfig
    from curate.train.retrieval import _run_samples, training_neighbours

    table = training_neighbours(
        RetrievalConfig(index=str(run["index"]), k=2), [str(run["run"])], say=lambda _: None
    )
    uids, vectors, _ = _run_samples([str(run["run"])])
    r = Retriever(run["index"])
    for uid, own in list(zip(uids, vectors, strict=True))[:40]:
        nbrs = table.get(uid)
        assert nbrs.shape == (2, 32)
        sims = nbrs @ own / np.linalg.norm(own)
        assert (sims < 0.97 + 1e-3).all()  # neither itself nor a copy
    assert len(table) == len(r)


def test_hf_text_encoder_and_vae_train_in_latent_space(run, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from curate.demo.tiny_captioners import build_tokenizer

    text_dir, vae_dir = tmp_path / "text", tmp_path / "vae"
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a red circle on a blue background"] * 4)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
        )
    ).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    AutoencoderKL(
        block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(vae_dir)
    unet = dict(UNET, block_out_channels=[16, 16])
    cfg = _config(
        run,
        tmp_path / "latent",
        **{
            "model.text_encoder": {"kind": "hf", "path": str(text_dir), "max_tokens": 16},
            "model.vae": {"path": str(vae_dir)},
            "model.unet": unet,
            "model.prediction": "v_prediction",
            "schedule.steps": 2,
        },
    )
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["history"][-1]["loss"])
    state = json.loads((tmp_path / "latent/checkpoints/step-00000002/state.json").read_text())
    assert state["config"]["model"]["vae"]["path"] == str(vae_dir)
    weights = load_file(tmp_path / "latent/checkpoints/step-00000002/model.safetensors")
    assert weights["unet.conv_in.weight"].shape[1] == 4  # the UNet denoises 4-channel latents
    images = generate(tmp_path / "latent", ["a red circle"], steps=2)["images"]
    assert images.shape == (1, 16, 16, 3)  # decoded back to pixels by the VAE


def test_open_clip_token_states_pool_to_encode_text(run):
    """The text encoder's token states are open_clip's own: pooled and projected, they give encode_text."""
    from curate.train.config import TextEncoderConfig
    from curate.train.model import TextEncoder

    enc = TextEncoder.load(TextEncoderConfig(kind="open_clip", model=f"local-dir:{run['clip']}"), None, "cpu")
    captions = ["a red circle on a blue background", "a star"]
    enc.max_tokens = 77
    text = enc.encode(captions, "cpu")
    tokens = enc.tokenizer(captions)
    pooled = text.states[torch.arange(2), tokens.argmax(dim=-1)] @ enc.model.text_projection
    with torch.no_grad():
        assert torch.allclose(pooled, enc.model.encode_text(tokens), atol=1e-5)
        assert torch.allclose(text.pooled, enc.model.encode_text(tokens), atol=1e-5)
    assert text.states.shape == (2, tokens.shape[1], enc.dim)


def test_config_errors_name_their_yaml_path(run, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.rules"):
        parse_train_config({"output": "x", "data": {"shards": ["x"], "rules": ["clip_score >> 1"]}})
    with pytest.raises(ConfigError, match="unet"):
        parse_train_config({"output": "x", "data": {"shards": ["x"]}, "model": {"unet": {"preset": None}}})
    with pytest.raises(ConfigError, match="holdout"):
        parse_train_config({"output": "x", "data": {"shards": ["x"]}, "validation": {"fid_samples": 8}})
    r_missing = tmp_path / "nothing"
    r_missing.mkdir()
    with pytest.raises(ValueError, match="no shards"):
        train(_config(run, tmp_path / "o", **{"data.shards": [str(r_missing)]}), progress=False)


def test_curate_train_reports_a_setup_problem_and_exits_2(run, tmp_path, cli):
    import yaml

    empty = tmp_path / "nothing"
    empty.mkdir()
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_config(run, tmp_path / "o", **{"data.shards": [str(empty)]}).to_dict()))
    r = cli("train", path, "-q")
    assert r.code == 2 and "no shards (.tar) found" in r.err and "Traceback" not in r.err
    r = cli("train", path, "-q", "--set", "data.rules=[clip_score >> 1]")
    assert r.code == 2 and "data.rules" in r.err


@pytest.mark.slow
def test_two_ranks_with_torchrun_train_on_disjoint_data(run, tmp_path):
    """DDP on the CPU (gloo): two processes launched by torchrun, as on a GPU node; both ranks' data
    positions land in the checkpoint, and a rerun resumes both."""
    import os
    import subprocess
    import sys

    cfg = _config(run, tmp_path / "ddp", **{"schedule.steps": 3, "checkpoint.every": 3, "data.workers": 1})
    path = tmp_path / "ddp.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "curate", "train", str(path), "-q"], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ddp/checkpoints/step-00000003/state.json").read_text())
    assert state["world"] == 2
    assert state["consumed"] == {"0": {"0": 3}, "1": {"0": 3}}  # each rank trained on its own 3 batches
    longer = [*cmd, "-m", "curate", "train", str(path), "-q", "--set", "schedule.steps=4"]
    done = subprocess.run(longer, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step 3" in done.stdout
    state = json.loads((tmp_path / "ddp/checkpoints/step-00000004/state.json").read_text())
    assert state["consumed"] == {"0": {"0": 4}, "1": {"0": 4}}


def test_the_demo_comparison_trains_both_corpora_and_scores_them_alike(run, tmp_path):
    """The machinery of `curate demo`'s last step (two processes, one config, the same held-out prompts);
    the demo itself measures the difference, at 400 steps."""
    from rich.console import Console

    from curate.demo.train_compare import eval_prompts, print_comparison, train_pair

    prompts = eval_prompts(6)
    assert len(set(prompts)) == 6 and prompts == eval_prompts(6)  # distinct, deterministic
    unet = json.dumps(UNET)
    overrides = [
        f"model.text_encoder.model=local-dir:{run['clip']}",
        "model.text_encoder.max_tokens=16",
        f"model.unet={unet}",
        "data.resolution=16",
        "optim.batch_size=8",
        "validation.sample_steps=2",
    ]
    console = Console(record=True, width=120)
    report = train_pair(tmp_path, run["run"], run["run"], console, steps=2, overrides=overrides, prompts=6)
    for name in ("curated", "raw"):
        m = report[name]["metrics"]
        assert m["adherence_n"] == 6 and 0 <= m["adherence"] <= 1 and 0 <= m["clip_score"] <= 100
        assert (tmp_path / "train" / name / "checkpoints" / "step-00000002").is_dir()
    # the same shards, seed and config: the same model, so the same scores
    assert report["curated"]["metrics"]["adherence"] == report["raw"]["metrics"]["adherence"]
    assert json.loads((tmp_path / "train" / "comparison.json").read_text())["prompts"] == 6
    print_comparison(report, console)
    assert "prompt adherence" in console.export_text()


def test_memory_and_speed_options(run, tmp_path):
    """Gradient checkpointing recomputes the same activations (the same weights after training); bf16
    autocast trains on the CPU too; what needs CUDA or a package that is not installed says so before
    training."""
    import importlib.util

    over = {"schedule.steps": 2, "checkpoint.every": 2, "validation.prompts": []}
    train(_config(run, tmp_path / "a", **over), progress=False)
    train(_config(run, tmp_path / "b", **over, **{"model.gradient_checkpointing": True}), progress=False)
    a = load_file(tmp_path / "a/checkpoints/step-00000002/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step-00000002/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    bf16 = train(_config(run, tmp_path / "c", **over, **{"optim.precision": "bf16"}), progress=False)
    assert np.isfinite(bf16["history"][-1]["loss"])
    c = load_file(tmp_path / "c/checkpoints/step-00000002/model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # autocast did compute in bf16
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="fp16 needs a CUDA device"):
            train(_config(run, tmp_path / "d", **over, **{"optim.precision": "fp16"}), progress=False)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(TrainError, match=r"bitsandbytes.*curate\[gpu\]"):
            train(_config(run, tmp_path / "e", **over, **{"optim.optimizer": "adamw8bit"}), progress=False)
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(TrainError, match="xformers"):
            train(_config(run, tmp_path / "f", **over, **{"model.attention": "xformers"}), progress=False)


def test_validation_vqa_model_scores_the_generated_images_with_vqascore(run, tmp_path, cli):
    """`validation.vqa_model` gives `curate train` a VQAScore prompt scorer: the mean over the generated images
    in the metrics, each prompt's score beside it, equal to the scorer's own on the saved samples' prompts."""
    import yaml

    from curate.demo.tiny_captioners import build_tokenizer, make_tiny_vlm
    from curate.models.vqa import QUESTION

    prompts = ["a red circle on a blue background", "a green star on a white background"]
    texts = [QUESTION.format(p) for p in prompts] * 20 + ["Yes", "No"] * 40  # "Yes" is one token
    tokenizer = build_tokenizer(texts, vocab_size=200)
    vlm = make_tiny_vlm("llava", tmp_path / "vlm", tokenizer=tokenizer)
    over = {
        "schedule.steps": 1,
        "checkpoint.every": 1,
        "validation.eval_prompts": prompts,
        "validation.eval_samples": 2,
        "validation.vqa_model": str(vlm),
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_config(run, tmp_path / "t", **over).to_dict()))
    r = cli("train", path, "-q")
    assert r.code == 0, r
    line = json.loads((tmp_path / "t" / "validation.jsonl").read_text().splitlines()[-1])
    scores = line["per_prompt"]["vqa_score"]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    assert (
        line["metrics"]["vqa_score"] == pytest.approx(sum(scores) / 2) and line["metrics"]["vqa_score_n"] == 2
    )

    path.write_text(
        yaml.safe_dump(_config(run, tmp_path / "u", **{**over, "validation.vqa_model": "nowhere"}).to_dict())
    )
    r = cli("train", path, "-q")
    assert r.code == 2 and "validation.vqa_model" in r.err and "Traceback" not in r.err
