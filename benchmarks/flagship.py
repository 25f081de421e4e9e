"""The flagship at real size, rehearsed offline: `curate run pipelines/laion_subset.yaml` with stand-in models.

Stand-ins are random weights of the real architectures (CLIP ViT-L/14, LAION's heads and watermark net,
Qwen2-VL-2B-Instruct, Qwen2.5-1.5B-Instruct), written by `curate models stand-in`: the real size, memory and
FLOPs, and outputs that mean nothing. Two measurements:

1. ``stages``: each model stage of laion_subset.yaml alone in a fresh process, on the same photo-like images
   (256 px, JPEG, as the download stage stores them), the stages chained as in the pipeline (each reads what
   the one before wrote). Per stage: the process before the model loads, after, its peak while scoring,
   images/s (model loading excluded), and the plan's estimate (``Stage.memory``) beside the measured peak.
2. ``run``: the whole pipeline, `curate run pipelines/laion_subset.yaml`, on the images served over HTTP by a
   local server, with the local executor and under Ray. The quality filter's thresholds are opened
   (``clip_score >= -1``): a stand-in's scores are noise, and the point is that every stage runs at real size.
   Per stage: rows/s and the worker's peak memory (from the shards' stats), and the run's wall time.

    python benchmarks/flagship.py --images 36 --work /tmp/flagship [--skip-run] [--skip-stages]

Writes ``flagship.json`` in --work and prints tables; benchmarks/RESULTS.md quotes them. Needs about 20 GB
of memory for the local run (one process holds every model, in fp32) and 10 GB of disk for the stand-ins.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "laion_subset.yaml"
MODEL_STAGES = ("clip_score", "nsfw", "watermark", "aesthetic", "recaption", "fuse_captions")
OPEN_FILTER = "stages.quality_filter.rules=['clip_score >= -1']"
BF16_CAPTIONERS = ("stages.recaption.precision=bf16", "stages.fuse_captions.precision=bf16")


# --- images ------------------------------------------------------------------------------------------


def photo_like(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` photo-like JPEGs of 320 to 800 px with captions: random crops of the real photos that ship
    inside installed packages (matplotlib's Grace Hopper, scikit-learn's samples), mirrored and jittered, as
    the CLIP benchmark makes them."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from clip_vs_clip_retrieval import _photo_crop, sample_photos

    photos = [Image.open(p).convert("RGB") for p in sample_photos()]
    if not photos:
        raise SystemExit("no sample photos found (matplotlib's sample_data): pip install matplotlib")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(320, 801)), int(rng.integers(320, 801))
        buf = io.BytesIO()
        _photo_crop(rng, photos[i % len(photos)], w, h).save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), f"photo number {i} of a person in a room, stock image {2000 + i}"))
    return out


def stored(jpeg: bytes, side: int = 256) -> bytes:
    """The image as laion_subset's download stage stores it: at most ``side`` px on its short side... as
    ``keep_ratio`` does, re-encoded as JPEG at quality 95."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = side / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


# --- per stage ---------------------------------------------------------------------------------------


def rss(key: str = "VmRSS") -> int:
    """This process's memory now (VmRSS) or at its peak since the last reset (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Start VmHWM again from the memory held now (Linux: clear_refs 5), to tell scoring from loading."""
    Path("/proc/self/clear_refs").write_text("5")


def one_stage(name: str, source: str, target: str) -> dict:
    """In a fresh process: load ``name`` of laion_subset.yaml, score the table at ``source``, write it to
    ``target``; what it held and how fast it went."""
    import pyarrow.parquet as pq

    from curate.cli.options import load_pipeline
    from curate.core.pipeline import Pipeline

    pipeline = Pipeline(load_pipeline(str(PIPELINE), [OPEN_FILTER]))
    bound = next(b for b in pipeline.stages if b.name == name)
    table = pq.read_table(source)
    import torch  # noqa: F401 - the libraries every model stage imports, before any weights

    if name in ("recaption", "fuse_captions"):
        import transformers  # noqa: F401
    else:
        import open_clip  # noqa: F401
    base = rss()
    start = time.perf_counter()
    bound.stage.ensure_setup()
    load_s = time.perf_counter() - start
    load_peak, loaded = rss("VmHWM"), rss()
    reset_peak()
    start = time.perf_counter()
    out = bound.stage(table)
    seconds = time.perf_counter() - start
    peak = rss("VmHWM")
    pq.write_table(out, target)
    config = bound.stage.config
    if getattr(config, "batch_size", None):  # the estimate for the batch that ran
        config.batch_size = min(config.batch_size, table.num_rows)
    estimate = bound.memory("cpu")
    return {
        "stage": name,
        "images": table.num_rows,
        "images_per_s": table.num_rows / seconds,
        "load_s": load_s,
        "process_base": base,
        "load_peak": load_peak,
        "after_load": loaded,
        "peak": max(peak, load_peak),
        "scoring_peak": peak,
        "working_set": peak - loaded,
        "estimate": estimate.host if estimate else None,
        "estimate_parts": list(estimate.parts) if estimate else [],
        "batch_size": getattr(bound.stage.config, "batch_size", None),
    }


def stages(work: Path, images: list[tuple[bytes, str]]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(images)
    table = pa.table(
        {
            "uid": [f"{i:016x}" for i in range(n)],
            "caption": [c for _, c in images],
            "status": ["ok"] * n,
            "drop_reason": pa.nulls(n, pa.string()),
            "image": [stored(b) for b, _ in images],
        }
    )
    source = work / "stage-input.parquet"
    pq.write_table(table, source)
    results = []
    for name in MODEL_STAGES:
        target = work / f"after-{name}.parquet"
        cmd = [sys.executable, __file__, "--one", name, str(source), str(target)]
        got = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        if got.returncode:
            raise SystemExit(f"{name} failed:\n{got.stderr[-4000:]}")
        result = json.loads(got.stdout.strip().splitlines()[-1])
        results.append(result)
        print(_stage_line(result), flush=True)
        source = target
    return results


def _stage_line(r: dict) -> str:
    gib = 1 << 30
    est = f"{r['estimate'] / gib:.2f}" if r["estimate"] else "-"
    return (
        f"{r['stage']:<14} {r['images_per_s']:7.2f} img/s  load {r['load_s']:5.1f} s  base {r['process_base'] / gib:.2f}"
        f"  loading peak {r['load_peak'] / gib:.2f}  loaded {r['after_load'] / gib:.2f}  scoring peak "
        f"{r['scoring_peak'] / gib:.2f} GiB  (plan's estimate {est} GiB)"
    )


# --- the whole run -----------------------------------------------------------------------------------


def run(
    work: Path, images: list[tuple[bytes, str]], executor: str, shard_size: int, extra: tuple[str, ...] = ()
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core.output import OutputFolder, collect_output
    from curate.demo.server import WorldServer

    with WorldServer() as server:
        urls = [server.add(f"/img/{i}.jpg", body, "image/jpeg") for i, (body, _) in enumerate(images)]
        source = work / "laion-part.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": [c for _, c in images]}), source)
        out = work / f"out-{executor}"
        cmd = [
            sys.executable,
            "-m",
            "curate",
            "run",
            str(PIPELINE),
            "--overwrite",
            "--executor",
            executor,
            "--set",
            f"input.path={source}",
            "--set",
            f"output.path={out}",
            "--set",
            f"shard_size={shard_size}",
            "--set",
            OPEN_FILTER,
            "--set",
            f"stages.download.allow_private=['{server.host_port}']",
        ]
        if executor == "ray":
            cmd += ["--set", "executor.num_cpus=2"]
        for item in extra:
            cmd += ["--set", item]
        start = time.perf_counter()
        got = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        wall = time.perf_counter() - start
    print(got.stderr[-6000:], flush=True)
    if got.returncode == 2:  # refused before any work: nothing to collect
        return {
            "executor": executor,
            "sets": list(extra),
            "exit_code": 2,
            "wall_s": wall,
            "stderr_tail": got.stderr[-1500:],
        }
    summary = collect_output(OutputFolder(str(out)))
    info = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    return {
        "executor": executor,
        "sets": list(extra),
        "exit_code": got.returncode,
        "stderr_tail": got.stderr[-1500:] if got.returncode else "",
        "wall_s": wall,
        "counts": summary.counts,
        "stages": summary.stages,
        "stand_ins": info.get("stand_ins"),
        "plan": info.get("plan"),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one_stage(*sys.argv[2:5])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=36)
    ap.add_argument("--shard-size", type=int, default=12)
    ap.add_argument("--work", type=Path, default=Path("flagship-work"))
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--skip-run", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CURATE_MODEL_DIR", str(args.work / "models"))
    os.environ["CURATE_OFFLINE"] = "1"
    from curate.cli.options import load_pipeline
    from curate.core.pipeline import Pipeline
    from curate.models.stand_in import write_stand_ins

    start = time.perf_counter()
    written = write_stand_ins(Pipeline(load_pipeline(str(PIPELINE), [OPEN_FILTER])))
    # Parts measured earlier (--skip-stages, --skip-run) stay in flagship.json.
    saved = args.work / "flagship.json"
    doc: dict = json.loads(saved.read_text()) if saved.exists() else {}
    doc |= {
        "stand_ins": [
            {
                "stage": w.stage,
                "model": w.model,
                "parameters": w.parameters,
                "bytes": w.bytes,
                "action": w.action,
            }
            for w in written
        ],
        "stand_in_seconds": time.perf_counter() - start,
    }
    images = photo_like(args.images)
    if not args.skip_stages:
        doc["stages"] = stages(args.work, images)
        saved.write_text(json.dumps(doc, indent=2, default=str))
    if not args.skip_run:
        doc["runs"] = []
        for ex in args.executors.split(","):
            doc["runs"].append(run(args.work, images, ex, args.shard_size))
            if doc["runs"][-1]["exit_code"] == 2:
                # Where the machine cannot hold both captioners in fp32 in one worker (with the CLIP and the
                # watermark net, for the local executor), the plan says so before any work; in bf16 they fit.
                doc["runs"].append(run(args.work, images, ex, args.shard_size, BF16_CAPTIONERS))
            saved.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {saved}")


if __name__ == "__main__":
    main()
