"""Reading and re-scoring existing shards: `curate run` on img2dataset-layout tars vs webdataset's own loop.

Makes ``--images`` photo-like JPEGs (flagship.py's ``photo_like``, stored as its download stage stores them:
256 px on the short side, JPEG q95) into tars laid out as img2dataset writes them (``00000.tar`` with
``<key>.jpg/.txt/.json``, ``00000.parquet`` and ``00000_stats.json`` beside it; keys ``SSSSSIIII``), then
measures rows/s on the same tars, one after the other, on this machine:

- ``webdataset``: the floor. ``wds.WebDataset(tars).decode("pil")`` iterated in one process (every image
  decoded to PIL, the json parsed, the txt read), and the same through a torch DataLoader with 2 workers.
- ``curate``: ``curate run`` with ``input.format: webdataset``, ``input.uid_col: key`` and a download stage,
  on the local executor and under Ray (``--executor ray --set executor.num_cpus=2``), in three variants:
  ``passthrough`` (``resize_mode: no``, ``encode_format: original``: each image is decoded and checked,
  sha256 and pHash computed, and the very bytes stored; the fair match of the floor, which decodes each
  image too), ``re-encode`` (``keep_ratio`` to 256, JPEG q95: a decode, resize and encode per image) and
  ``re-score`` (passthrough plus a ``clip_score`` stage with a tiny random CLIP,
  tests/support/data.py's ``make_tiny_clip``: the path of re-scoring a corpus with a new model). Each run
  writes its own tars, parquet sidecars and stats.

Two rates for each: ``wall``, over the whole process (interpreter start, imports, planning, Ray's start,
model loading, writing), and ``work``, over webdataset's loop alone, or over curate's stage seconds added
up over its shards (from the shards' stats; under Ray that is per worker, two running at once).
Ratios are to webdataset in one process, measured in the same invocation. Offline; nothing is fetched.

    .venv/bin/python benchmarks/read_existing_shards.py --images 2000 --json /tmp/read_existing_shards.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "curate-bench-existing-shards"
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "CURATE_OFFLINE": "1"}
VARIANTS = {
    "passthrough": [{"stage": "download", "resize_mode": "no", "encode_format": "original"}],
    "re-encode": [
        {"stage": "download", "image_size": 256, "resize_mode": "keep_ratio", "encode_format": "jpg"}
    ],
    "re-score": [
        {"stage": "download", "resize_mode": "no", "encode_format": "original"},
        {"stage": "clip_score", "model": "local-dir:{clip}", "batch_size": 64, "device": "cpu"},
    ],
}


# --- the shards ----------------------------------------------------------------------------------------


def make_shards(n: int, per_tar: int, seed: int) -> tuple[Path, dict]:
    """img2dataset-layout tars of ``n`` stored photo-like JPEGs, cached by (n, per_tar, seed)."""
    folder = CACHE / f"{n}-{per_tar}-{seed}"
    manifest = folder / "manifest.json"
    if manifest.exists():
        return folder, json.loads(manifest.read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from flagship import photo_like, stored
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"making {n:,} images into {folder} ...", flush=True)
    start = time.perf_counter()
    total_bytes = 0
    for s, first in enumerate(range(0, n, per_tar)):
        rows = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, (original, caption) in enumerate(
                photo_like(min(per_tar, n - first), seed=seed * 7919 + s)
            ):
                key = f"{s:05d}{i:04d}"
                image = stored(original)
                total_bytes += len(image)
                ow, oh = Image.open(io.BytesIO(original)).size
                w, h = Image.open(io.BytesIO(image)).size
                meta = {
                    "url": f"https://images.example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": w,
                    "height": h,
                    "original_width": ow,
                    "original_height": oh,
                    "exif": "{}",
                    "sha256": hashlib.sha256(original).hexdigest(),
                    "similarity": round(0.2 + (i % 100) / 1000, 3),
                }
                rows.append(meta)
                for ext, data in (
                    ("jpg", image),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta, indent=4).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
        (folder / f"{s:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    info = {"images": n, "tars": -(-n // per_tar), "mean_kb": round(total_bytes / n / 1000, 1)}
    manifest.write_text(json.dumps(info))  # written last: the set is complete
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return folder, info


# --- the floor: webdataset's own iteration --------------------------------------------------------------


def wds_loop(folder: str, workers: int) -> dict:
    """In a fresh process: iterate the tars with webdataset, decoding every image to PIL."""
    import webdataset as wds

    tars = sorted(str(p) for p in Path(folder).glob("*.tar"))
    start = time.perf_counter()
    n = pixels = 0
    if workers == 0:
        ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil")
        for sample in ds:
            img, meta = sample["jpg"], sample["json"]
            assert meta["key"] == sample["__key__"] and sample["txt"]
            pixels += img.width * img.height
            n += 1
    else:
        import torch

        torch.set_num_threads(1)
        ds = (
            wds.WebDataset(tars, shardshuffle=False, empty_check=False, nodesplitter=None)
            .decode("pil")
            .map(_summary)
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        for _key, w, h in loader:
            pixels += w * h
            n += 1
    return {"rows": n, "seconds": time.perf_counter() - start, "pixels": pixels}


def _summary(sample: dict) -> tuple[str, int, int]:
    """What a DataLoader worker sends back: decoding happened in the worker, the pixels stay there."""
    return sample["__key__"], sample["jpg"].width, sample["jpg"].height


def run_wds(folder: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--wds", str(folder), str(workers)]
    start = time.perf_counter()
    got = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    wall = time.perf_counter() - start
    if got.returncode:
        raise SystemExit(f"webdataset loop failed:\n{got.stderr[-3000:]}")
    result = json.loads(got.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


# --- curate run -----------------------------------------------------------------------------------------


def write_pipeline(
    path: Path, shards: Path, out: Path, variant: str, clip: Path | None, shard_size: int
) -> None:
    import yaml

    stages = json.loads(json.dumps(VARIANTS[variant]).replace("{clip}", str(clip)))
    doc = {
        "name": f"read-existing-{variant}",
        "input": {"path": str(shards), "format": "webdataset", "uid_col": "key"},
        "output": {"path": str(out), "report": False},
        "shard_size": shard_size,
        "stages": stages,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_curate(
    work: Path, shards: Path, variant: str, executor: str, clip: Path | None, shard_size: int
) -> dict:
    from curate.core.output import collect_output

    out = work / f"out-{variant}-{executor}"
    pipeline = work / f"{variant}.yaml"
    write_pipeline(pipeline, shards, out, variant, clip, shard_size)
    cmd = [sys.executable, "-m", "curate", "run", str(pipeline), "--overwrite", "-q", "--executor", executor]
    if executor == "ray":
        cmd += ["--set", "executor.num_cpus=2"]
    start = time.perf_counter()
    got = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    wall = time.perf_counter() - start
    if got.returncode:
        raise SystemExit(
            f"curate run ({variant}, {executor}) exited with {got.returncode}:\n{got.stderr[-4000:]}"
        )
    summary = collect_output(out)
    run_json = json.loads((out / "run.json").read_text())
    result = {
        "rows": summary.counts["rows"],
        "ok": summary.counts["ok"],
        "kept": summary.counts["kept"],
        "wall_s": wall,
        "run_s": run_json["seconds"],
        "stage_s": sum(v["seconds"] for v in summary.stages.values()),
        "stages": {k: {"seconds": v["seconds"], "rows": v["rows"]} for k, v in summary.stages.items()},
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


# --- report ---------------------------------------------------------------------------------------------


def best(runs: list[dict], key: str) -> dict:
    return min(runs, key=lambda r: r[key])


def table(doc: dict) -> str:
    """Wall: the whole process (interpreter, imports, planning, Ray's start, writing). Work: webdataset's
    loop, or curate's stage seconds added up over shards (per worker under Ray, where two run at once)."""
    n = doc["images"]["images"]
    floor = doc["webdataset"]["1 process"]
    floor_wall, floor_work = floor["rows"] / floor["wall_s"], floor["rows"] / floor["seconds"]
    lines = [
        f"{n:,} images, 256 px JPEG q95 (mean {doc['images']['mean_kb']} KB), {doc['images']['tars']} "
        f"img2dataset-layout tars; {doc['machine']['cpus']} CPUs; curate shard_size {doc['shard_size']}; "
        f"best of {doc['repeat']}",
        "",
        "| reader | executor | wall s | rows/s wall | rows/s work | x webdataset wall | x webdataset work |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in doc["webdataset"].items():
        wall, work = r["rows"] / r["wall_s"], r["rows"] / r["seconds"]
        lines.append(
            f"| webdataset, decode to PIL, {name} | - | {r['wall_s']:.1f} | {wall:,.0f} | {work:,.0f} | "
            f"{wall / floor_wall:.2f} | {work / floor_work:.2f} |"
        )
    for variant, by_executor in doc["curate"].items():
        for executor, r in by_executor.items():
            wall, work = r["rows"] / r["wall_s"], r["rows"] / r["stage_s"]
            lines.append(
                f"| curate run, {variant} | {executor} | {r['wall_s']:.1f} | {wall:,.0f} | {work:,.0f} | "
                f"{wall / floor_wall:.2f} | {work / floor_work:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--wds":
        print(json.dumps(wds_loop(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-tar", type=int, default=500, help="samples per input tar")
    ap.add_argument("--shard-size", type=int, default=500, help="curate's shard_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the best is kept")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "read_existing_shards.json")
    args = ap.parse_args()

    shards, info = make_shards(args.images, args.per_tar, args.seed)
    work = Path(tempfile.mkdtemp(prefix="curate-bench-existing-"))
    clip = None
    try:
        if "re-score" in args.variants:
            sys.path.insert(0, str(ROOT / "tests"))
            from support.data import make_tiny_clip

            clip = make_tiny_clip(work / "tiny-clip")
        doc: dict = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "images": info,
            "shard_size": args.shard_size,
            "repeat": args.repeat,
            "webdataset": {},
            "curate": {},
        }
        for label, workers in (("1 process", 0), ("DataLoader, 2 workers", 2)):
            runs = [run_wds(shards, workers) for _ in range(args.repeat)]
            doc["webdataset"][label] = best(runs, "seconds")
            r = doc["webdataset"][label]
            print(
                f"webdataset {label}: {r['rows'] / r['wall_s']:,.0f} rows/s wall, "
                f"{r['rows'] / r['seconds']:,.0f} in its loop",
                flush=True,
            )
        for variant in args.variants.split(","):
            doc["curate"][variant] = {}
            for executor in args.executors.split(","):
                runs = [
                    run_curate(work, shards, variant, executor, clip, args.shard_size)
                    for _ in range(args.repeat)
                ]
                r = doc["curate"][variant][executor] = best(runs, "wall_s")
                if r["rows"] != args.images or r["ok"] != args.images:
                    raise SystemExit(f"curate ({variant}, {executor}) read {r['rows']} rows, {r['ok']} ok")
                print(
                    f"curate {variant} {executor}: {r['rows'] / r['wall_s']:,.0f} rows/s wall, "
                    f"{r['rows'] / r['stage_s']:,.0f} in its stages",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["table"] = table(doc)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + doc["table"])
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
