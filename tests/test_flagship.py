"""The flagship, CI-sized: `curate run pipelines/laion_subset.yaml` end to end, its own stage graph (caption
filter, download over HTTP, CLIP score, NSFW, watermark and text, aesthetic, the quality filter, dedup,
recaption, caption fusion), with stand-in models of the same families, smaller: open_clip's ViT-B/32 (its
published NSFW head, an aesthetic head of its width), LAION's EfficientNet-B3 watermark net, and Qwen2-VL and
Qwen2.5 from their published configs, shrunk. benchmarks/flagship.py runs the same at full size.

Stand-in scores mean nothing, so the quality filter is opened (`clip_score >= -1`); what is tested is that
every stage loads its model through the real loading code, the plan sizes and places every actor, the
output reconciles, and nothing a stand-in wrote passes for a real model's output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_stand_in import SMALL

from curate.demo.server import WorldServer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("faiss")

LAION = Path(__file__).parent.parent / "pipelines" / "laion_subset.yaml"
ROWS = 12
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
    base = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, 3) + rng.uniform(0, 55, 3)
    pixels = base + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The images over HTTP, the LAION-style input table, and the stand-ins in a model directory."""
    from curate.cli.options import load_pipeline
    from curate.core.pipeline import Pipeline
    from curate.models.heads import AestheticHead
    from curate.models.stand_in import write_stand_ins

    root = tmp_path_factory.mktemp("flagship")
    mp = pytest.MonkeyPatch()
    mp.setenv("CURATE_MODEL_DIR", str(root / "models"))
    mp.setenv("CURATE_OFFLINE", "1")
    head = root / "aesthetic-b32.pth"  # LAION publishes no aesthetic head for B/32: one of its layout
    torch.manual_seed(0)
    torch.save(AestheticHead([512, 1024, 128, 64, 16, 1], [0, 2, 4, 6, 7]).state_dict(), head)
    with WorldServer() as server:
        urls = [server.add(f"/{i}.jpg", _image(i), "image/jpeg") for i in range(ROWS - 2)]
        urls += [server.url + "/missing.jpg", "not a url"]
        captions = [f"a photo of thing number {i} on a table" for i in range(ROWS)]
        source = root / "part-00000.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), source)
        sets = [
            f"input.path={source}",
            "shard_size=6",
            "stages.clip_score.model=ViT-B-32",
            "stages.clip_score.batch_size=8",
            "stages.nsfw.clip_model=ViT-B-32",
            "stages.aesthetic.clip_model=ViT-B-32",
            f"stages.aesthetic.head={head}",
            "stages.quality_filter.rules=['clip_score >= -1']",
            "stages.recaption.max_new_tokens=8",
            "stages.recaption.batch_size=4",
            "stages.fuse_captions.max_new_tokens=8",
            "stages.fuse_captions.batch_size=4",
            f"stages.download.allow_private=['{server.host_port}']",
        ]
        written = write_stand_ins(Pipeline(load_pipeline(str(LAION), sets)), overrides=SMALL)
        yield {"root": root, "sets": sets, "written": written}
    mp.undo()


def _run(cli, world, executor: str) -> Path:
    out = world["root"] / f"out-{executor}"
    args = [a for s in [*world["sets"], f"output.path={out}"] for a in ("--set", s)]
    r = cli("run", LAION, "--executor", executor, *args)
    assert r.code == 0, r
    return out


def _check(out: Path, plan_source: str) -> dict:
    info = json.loads((out / "run.json").read_text())
    # Every model the pipeline loaded was a stand-in, and the run says so.
    assert {s["stage"] for s in info["stand_ins"]} == {
        "clip_score",
        "nsfw",
        "watermark",
        "recaption",
        "fuse_captions",
    }
    assert info["plan"]["cluster"]["source"] == plan_source
    devices = {s["name"]: s["device"] for p in info["plan"]["phases"] for s in p["stages"]}
    assert devices["clip_score"] == devices["recaption"] == "cpu"  # no GPU here: the plan says CPUs
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))])
    rows = table.to_pylist()
    assert len(rows) == ROWS  # every input row is accounted for
    status = [r["status"] for r in rows]
    assert status.count("ok") == ROWS - 2 and "http_404" in status and "invalid_url" in status
    kept = [r for r in rows if r["status"] == "ok" and r["drop_reason"] is None]
    assert kept, "dedup left nothing to caption"
    for r in kept:
        assert r["clip_model"] == "ViT-B-32/openai (stand-in)"
        assert r["nsfw_model"].endswith("(stand-in)")
        assert r["caption_vlm_model"] == "Qwen/Qwen2-VL-2B-Instruct (stand-in)"
        assert r["caption_fused_model"] == "Qwen/Qwen2.5-1.5B-Instruct (stand-in)"
        assert r["watermark_score"] is not None and r["aesthetic_score"] is not None
    dropped = [r for r in rows if r["status"] == "ok" and r["drop_reason"] is not None]
    assert all(r["drop_reason"].startswith("duplicate:") for r in dropped), dropped  # only dedup drops
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
    for name in ("clip_score", "recaption", "fuse_captions"):
        assert all(s["stages"][name]["peak_rss"] > 200 << 20 for s in stats)  # the worker's peak, recorded
    return info


def test_the_flagship_runs_end_to_end_with_stand_ins_locally(cli, world):
    out = _run(cli, world, "local")
    info = _check(out, "this machine")
    assert "one process holds every model" in " ".join(info["plan"]["notes"])
    html = (out / "report" / "report.html").read_text()
    assert "stand-in" in html and "mean nothing" in html


def test_the_flagship_runs_end_to_end_with_stand_ins_under_ray(cli, world, ray_cluster):
    info = _check(_run(cli, world, "ray"), "the Ray cluster")
    phases = info["plan"]["phases"]
    # After dedup, recaption and fusion run in one worker that holds both models, placed by its memory.
    last = phases[-1]["operators"][0]
    assert last["reads_writes"] and last["stages"] == ["dedup", "recaption", "fuse_captions"]
    assert last["memory"] > 900 << 20  # the process and both captioners, reserved in Ray
