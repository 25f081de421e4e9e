"""CLIP embedding on the CPU: curate's clip_score stage vs clip-retrieval's clip_inference, same images, same run.

Both sides load the same weights file: random weights of the real open_clip ViT-B-32 (``create_model("ViT-B-32",
pretrained=None)``, seed 0, saved once as safetensors), since no pretrained tag can be downloaded here. Both
compute image AND text embeddings of the same photo-like JPEGs (crops of the sample photos that matplotlib and
scikit-learn ship, where installed, and smooth synthetic scenes; long side 256-512 px) with captions, laid out as
WebDataset tars (<key>.jpg + <key>.txt), and write them out as they normally do:

- clip-retrieval (its own venv, ``.bench-venv/clip-retrieval``, made with uv on first use): its python API
  ``clip_retrieval.clip_inference.main(input_format="webdataset", enable_image=True, enable_text=True,
  clip_model="open_clip:ViT-B-32/<weights file>")``: its reader (a torch DataLoader over webdataset with
  ``num_prepro_workers`` worker processes decoding, preprocessing and tokenising), its mapper and its writer
  (.npy embeddings, metadata parquet). Its ``input_format="files"`` is not used: with images and text it
  fails on a key mismatch (clip-retrieval issue 352).
- curate: the tars read into one shard table (uid, url, caption, status, drop_reason, image bytes), then
  ``ClipScore(model="ViT-B-32", pretrained=<weights file>, text_embeddings=True)`` called on it as an
  executor calls a stage (``ensure_setup()``, ``stage(table)``), then the shard written by ``ShardWriter``
  (tar, parquet sidecar with the embeddings, stats).

Timed: reading the tars through writing the output, in a fresh process per run. Not timed, on both sides:
loading the model and warming it up (clip-retrieval's ``load_clip`` warms up with two passes of a batch; its
cache means ``main`` reuses the model loaded before the clock starts; curate is warmed up by one call of the
stage on the first batch's rows). Same CPU budget: the torch threads are each tool's default (torch's: the
cores) and images are decoded the way each tool does it (clip-retrieval: ``--workers`` DataLoader processes;
curate: ``decode_threads`` default, the cores); same batch size on both. The sides run interleaved,
``--repeats`` times each; the ratio is curate's images/s over clip-retrieval's, per run pair and its median.
On a shared machine wall time follows the other work running, so it also prints images per CPU second (each
side's process and its children: clip-retrieval's DataLoader workers and logger processes) as a ratio.
Then the embeddings of the last run of each side are compared image by image (cosine), also after removing
the set's mean embedding (random weights map all images close together, so raw cosines alone say little).

    .venv/bin/python benchmarks/clip_vs_clip_retrieval.py --images 512 --repeats 3 --json clip.json

The peer venv needs uv (``make`` puts it in ``.uv/``) and the package registry once; afterwards it runs offline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / ".bench-venv" / "clip-retrieval"
UV = REPO / ".uv" / "bin" / "uv"
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
# open_clip: the last release below 3 (clip-retrieval's cap). clip-anytorch, which clip-retrieval imports,
# imports pkg_resources: gone from setuptools 81 on. torch, torchvision and Pillow: curate's own releases.
PEER_PINS = ("open_clip_torch==2.32.0", "setuptools<81")
PEER_PACKAGES = ("clip-retrieval", "open_clip_torch", "torch", "torchvision", "pillow", "numpy", "webdataset")
CACHE = Path(tempfile.gettempdir()) / "curate-bench-clip"
ARCH = "ViT-B-32"
TAR_SIZE = 64  # samples per input tar: enough tars that every DataLoader worker gets some
ENV = {
    "CUDA_VISIBLE_DEVICES": "",  # the CPU, even where a GPU is
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


# ---------------------------------------------------------------- the peer's venv


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def ensure_clip_retrieval() -> Path:
    """clip-retrieval in a venv of its own (it pins numpy<2, pyarrow<16, open_clip<3), with curate's torch
    and Pillow, so that both sides run the same kernels and the same JPEG decoder."""
    python = PEER_VENV / "bin" / "python"
    spec = [
        CLIP_RETRIEVAL,
        f"torch=={_version('torch')}",
        f"torchvision=={_version('torchvision')}",
        f"pillow=={_version('pillow')}",
        *PEER_PINS,
    ]
    stamp = PEER_VENV / ".installed"  # written last: the venv is complete and holds this spec
    if stamp.exists() and stamp.read_text() == "\n".join(spec):
        return python
    if not UV.exists():
        raise SystemExit(f"{UV.relative_to(REPO)} is missing: `make .uv/bin/uv` installs it")
    print(f"creating {PEER_VENV.relative_to(REPO)} with {' '.join(spec)} (once) ...", flush=True)
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    for cmd in (
        [str(UV), "venv", "-q", "--clear", "--python", sys.executable, str(PEER_VENV)],
        [str(UV), "pip", "install", "-q", "--python", str(python), *spec],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            shutil.rmtree(PEER_VENV, ignore_errors=True)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    stamp.write_text("\n".join(spec))
    return python


def peer_versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps({{p: m.version(p) for p in {list(PEER_PACKAGES)!r}}}))"
    )
    return json.loads(
        subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    )


def curate_versions() -> dict[str, str]:
    out = {p: _version(p) for p in ("open_clip_torch", "torch", "torchvision", "pillow", "numpy", "pyarrow")}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "curate", "stages"], capture_output=True, text=True
        )
        out["curate"] = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    return out


# ---------------------------------------------------------------- images and captions


def sample_photos() -> list[Path]:
    """Real photos shipped inside packages, where installed: matplotlib's and scikit-learn's samples."""
    found = []
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        found.append(Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    found += sorted(PEER_VENV.glob("lib/python3*/site-packages/sklearn/datasets/images/*.jpg"))
    return [p for p in found if p.exists()]


def _field(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    """Smooth colour variation: a coarse random grid upsampled bicubically, centred on 0."""
    from PIL import Image

    cw, ch = max(2, cells * w // max(w, h)), max(2, cells * h // max(w, h))
    small = (rng.uniform(-amp, amp, (ch, cw, 3)) + 128).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128


def _scene(rng: np.random.Generator, w: int, h: int):
    """Gradients, soft-edged shapes and fine texture: drawn at half size, upsampled, then grain added."""
    from PIL import Image, ImageDraw

    sw, sh = w // 2, h // 2
    base = (
        rng.uniform(70, 180, 3).astype(np.float32) + _field(rng, sw, sh, 3, 80) + _field(rng, sw, sh, 12, 35)
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        box = (x0, y0, x0 + int(rng.integers(10, sw // 2)), y0 + int(rng.integers(10, sh // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32)
    pixels += _field(rng, w, h, max(w, h) // 8, 25) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _photo_crop(rng: np.random.Generator, photo, w: int, h: int):
    """A random crop of ``photo`` with the aspect of w x h (35-100 % of the largest such box), resized,
    maybe mirrored, its brightness and saturation jittered."""
    from PIL import Image, ImageEnhance, ImageOps

    pw, ph = photo.size
    scale = min(pw / w, ph / h) * rng.uniform(0.35, 1.0)
    cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.LANCZOS)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))


WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "of",
    "with",
    "and",
    "in",
    "on",
    "at",
    "near",
    "by",
    "for",
    "from",
    "old",
    "new",
    "vintage",
    "modern",
    "small",
    "large",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "brown",
    "dog",
    "cat",
    "bird",
    "horse",
    "car",
    "bike",
    "boat",
    "house",
    "street",
    "city",
    "beach",
    "sea",
    "lake",
    "mountain",
    "forest",
    "tree",
    "flower",
    "garden",
    "table",
    "chair",
    "bowl",
    "fruit",
    "cake",
    "coffee",
    "cup",
    "woman",
    "man",
    "child",
    "family",
    "people",
    "playing",
    "walking",
    "sitting",
    "standing",
    "sunset",
    "sunrise",
    "winter",
    "summer",
    "snow",
    "rain",
    "sky",
    "clouds",
    "light",
    "night",
    "poster",
    "logo",
    "design",
    "print",
    "t-shirt",
    "sale",
    "shipping",
    "free",
    "size",
    "cotton",
    "wooden",
    "metal",
    "glass",
    "kitchen",
    "room",
    "bedroom",
    "wedding",
    "party",
    "portrait",
    "landscape",
    "view",
    "close-up",
    "illustration",
    "vector",
    "art",
    "painting",
    "watercolor",
    "drawing",
    "stock",
]


def _caption(rng: np.random.Generator) -> str:
    """Alt-text-like: median about 9 words, a long tail (2-60)."""
    n = int(np.clip(rng.lognormal(np.log(9), 0.7), 2, 60))
    return " ".join(rng.choice(WORDS, n))


def image_set(count: int, seed: int) -> tuple[Path, dict]:
    """The cached input folder for (count, seed): WebDataset tars of TAR_SIZE samples, <key>.jpg + <key>.txt."""
    from PIL import Image

    photos = sample_photos()
    tag = "-".join(p.stem for p in photos) or "none"
    folder = CACHE / f"images-{count}-{seed}-{tag}"
    manifest = folder / "manifest.json"
    if manifest.exists():
        return folder, json.loads(manifest.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating {count} images into {folder} ...", flush=True)
    sources = [Image.open(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    sizes, sides, n_photo, words = [], [], 0, []
    for start in range(0, count, TAR_SIZE):
        with tarfile.open(folder / f"{start // TAR_SIZE:05d}.tar", "w") as tar:
            for i in range(start, min(start + TAR_SIZE, count)):
                long = int(rng.integers(256, 513))
                ratio = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
                w, h = (long, round(long / ratio)) if rng.random() < 0.6 else (round(long / ratio), long)
                photo = bool(sources) and rng.random() < 0.5
                img = (
                    _photo_crop(rng, sources[rng.integers(len(sources))], w, h)
                    if photo
                    else _scene(rng, w, h)
                )
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
                caption = _caption(rng)
                for name, data in ((f"{i:05d}.jpg", buf.getvalue()), (f"{i:05d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sizes.append(len(buf.getvalue()))
                sides += [w, h]
                n_photo += photo
                words.append(len(caption.split()))
    stats = {
        "count": count,
        "tars": len(list(folder.glob("*.tar"))),
        "photo_crops": n_photo,
        "photos": [p.name for p in photos],
        "side_min": min(sides),
        "side_max": max(sides),
        "kb_median": round(float(np.median(sizes)) / 1000, 1),
        "caption_words_median": float(np.median(words)),
        "caption_words_max": max(words),
    }
    manifest.write_text(json.dumps(stats))  # written last: its presence means the set is complete
    return folder, stats


def make_weights(path: Path) -> None:
    """Random ViT-B-32 weights (seed 0) as safetensors: what both sides load."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(path)


# ---------------------------------------------------------------- the two sides (each in its own process)


def _timed(fn, into: dict, key: str, clock=time.perf_counter):
    """``fn``, adding the time each call takes on ``clock`` to ``into[key]`` (thread_time: the calling
    thread's CPU seconds, for calls made in several threads at once)."""
    lock = threading.Lock()

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                into[key] = into.get(key, 0.0) + clock() - start

    return wrapper


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _cpu_since(before: tuple[float, float]) -> dict[str, float]:
    now = _cpu_s()
    return {"self": now[0] - before[0], "children": now[1] - before[1]}


def _peak_rss_mib() -> dict[str, int]:
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
    }


def run_curate(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import torch

    import curate
    from curate.core.output import OutputFolder
    from curate.core.registry import STAGES  # registers the builtin stages and their columns
    from curate.core.schema import uid_for
    from curate.core.writer import ShardWriter
    from curate.kit import image_batches

    def read_shard(tars: list[Path]) -> pa.Table:
        keys, captions, images = [], [], []
        for path in tars:
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile():
                        key, ext = m.name.rsplit(".", 1)
                        members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, parts in members.items():
                keys.append(key)
                captions.append(parts["txt"].decode())
                images.append(parts["jpg"])
        n = len(keys)
        return pa.table(
            {
                "uid": [uid_for(k, c) for k, c in zip(keys, captions, strict=True)],
                "url": keys,
                "caption": captions,
                "status": ["ok"] * n,
                "drop_reason": pa.nulls(n, pa.string()),
                "image": pa.array(images, pa.binary()),
            }
        )

    tars = sorted(Path(args.input).glob("*.tar"))
    start = time.perf_counter()
    cls = STAGES["clip_score"]  # as a pipeline finds it by its YAML name
    config = {"model": ARCH, "pretrained": str(args.weights), "text_embeddings": True, "device": "cpu"}
    stage = cls(cls.Config(**config, batch_size=args.batch_size))
    stage.ensure_setup()
    stage(read_shard(tars[:1]).slice(0, args.batch_size))  # warm-up, as clip-retrieval's load_clip does
    load_s = time.perf_counter() - start

    parts: dict[str, float] = {}
    stage.clip.encode_images = _timed(stage.clip.encode_images, parts, "encode_image")
    stage.clip.encode_texts = _timed(stage.clip.encode_texts, parts, "encode_text")
    # CPU seconds of the decode threads (measured only: iter_batches looks both names up at each call)
    threads_cpu: dict[str, float] = {}
    image_batches.decode_rgb = _timed(image_batches.decode_rgb, threads_cpu, "decode", time.thread_time)
    stage.clip.preprocess = _timed(stage.clip.preprocess, threads_cpu, "preprocess", time.thread_time)
    cpu, start = _cpu_s(), time.perf_counter()
    table = read_shard(tars)
    parts["read"] = time.perf_counter() - start
    mark = time.perf_counter()
    table = stage(table)
    parts["stage"] = time.perf_counter() - mark
    mark = time.perf_counter()
    ShardWriter(str(args.out)).write("00000", table, {})
    parts["write"] = time.perf_counter() - mark
    run_s, cpu = time.perf_counter() - start, _cpu_since(cpu)
    cpu["decode_threads"] = threads_cpu
    parts["stage_other"] = parts.pop("stage") - parts["encode_image"] - parts["encode_text"]
    return {
        "images": table.num_rows,
        "load_s": load_s,
        "run_s": run_s,
        "cpu_s": cpu,
        "parts_s": parts,
        "torch_threads": torch.get_num_threads(),
        "decode_threads": stage.config.decode_threads or os.cpu_count(),
        "curate_from": str(Path(curate.__file__).parent),
        "output": OutputFolder(str(args.out)).shard_files("00000")["parquet"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def run_clip_retrieval(args: argparse.Namespace) -> dict:
    import torch
    from all_clip import load_clip
    from clip_retrieval.clip_inference.main import main

    tars = sorted(Path(args.input).glob("*.tar"))
    shards = f"{args.input}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"  # a brace pattern, as its users give it
    # Its loader's parser: "open_clip:<arch>/<checkpoint>", everything after the first "/" is the checkpoint.
    clip_model = f"open_clip:{ARCH}/{args.weights}"
    start = time.perf_counter()
    # The same call, argument for argument, that its worker and mapper make: main() finds it in the cache.
    model, _, _ = load_clip(
        clip_model=clip_model, use_jit=False, warmup_batch_size=args.batch_size, clip_cache_path=None
    )
    load_s = time.perf_counter() - start

    parts: dict[str, float] = {}
    model.encode_image = _timed(model.encode_image, parts, "encode_image")
    model.encode_text = _timed(model.encode_text, parts, "encode_text")
    cpu, start = _cpu_s(), time.perf_counter()
    main(
        input_dataset=shards,
        output_folder=str(args.out),
        input_format="webdataset",
        batch_size=args.batch_size,
        num_prepro_workers=args.workers,
        enable_text=True,
        enable_image=True,
        clip_model=clip_model,
        use_jit=False,
        wds_number_file_per_input_file=TAR_SIZE,
        enable_wandb=False,
    )
    run_s, cpu = time.perf_counter() - start, _cpu_since(cpu)  # children: DataLoader workers, loggers
    stats = json.loads((Path(args.out) / "stats" / "0.json").read_text())
    parts["read"] = stats["read_duration"]  # waiting on the DataLoader
    parts["write"] = stats["write_duration"]
    parts["mapper_other"] = stats["inference_duration"] - parts["encode_image"] - parts["encode_text"]
    parts["outside_loop"] = run_s - stats["total_duration"]  # key listing, logger processes, flush
    if load_clip.cache_info().hits < 2:
        raise SystemExit("clip-retrieval loaded the model again inside main(): the timing would include it")
    return {
        "images": int(stats["sample_count"]),
        "load_s": load_s,
        "run_s": run_s,
        "cpu_s": cpu,
        "parts_s": parts,
        "torch_threads": torch.get_num_threads(),
        "decode_workers": args.workers,
        "output": str(args.out),
        "peak_rss_mib": _peak_rss_mib(),
    }


# ---------------------------------------------------------------- orchestration


def run_side(
    side: str, python: Path, args: argparse.Namespace, folder: Path, weights: Path, out: Path
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = out.with_suffix(".json")
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--role",
        side,
        "--input",
        str(folder),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--result",
        str(result),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
    ]
    env = {**os.environ, **ENV}
    if side == "clip-retrieval":
        env.pop("PYTHONPATH", None)
    log = out.with_suffix(".log")
    load_before = os.getloadavg()[0]
    with log.open("wb") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-20:]
        raise SystemExit(f"{side} exited with {done.returncode}; log tail:\n  " + "\n  ".join(tail))
    return {**json.loads(result.read_text()), "loadavg_1min": [load_before, os.getloadavg()[0]]}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def agreement(curate_out: str, peer_out: str) -> dict:
    """Cosine of the two sides' embeddings of each image (and caption), raw and with the set mean removed."""
    import pyarrow.parquet as pq

    side = pq.read_table(curate_out, columns=["url", "image_embedding", "text_embedding"]).to_pydict()
    peer_keys = pq.read_table(Path(peer_out) / "metadata" / "metadata_0.parquet")["image_path"].to_pylist()
    at = {k: i for i, k in enumerate(side["url"])}
    order = [at[k] for k in peer_keys]
    out = {"images_compared": len(order)}
    for name, col, npy in (
        ("image", "image_embedding", "img_emb/img_emb_0.npy"),
        ("text", "text_embedding", "text_emb/text_emb_0.npy"),
    ):
        a = np.array([side[col][i] for i in order], np.float32)
        b = np.load(Path(peer_out) / npy).astype(np.float32)
        mean = a.mean(axis=0)
        cos = np.sum(_unit(a) * _unit(b), axis=1)
        centred = np.sum(_unit(a - mean) * _unit(b - mean), axis=1)
        ua = _unit(a)
        between = ua @ ua.T
        out[name] = {
            "cosine_min": round(float(cos.min()), 5),
            "cosine_median": round(float(np.median(cos)), 5),
            "centred_cosine_min": round(float(centred.min()), 5),
            "centred_cosine_median": round(float(np.median(centred)), 5),
            "different_items_cosine_mean": round(float(between[~np.eye(len(a), dtype=bool)].mean()), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved")
    ap.add_argument("--batch-size", type=int, default=64, help="both sides (curate's default)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="clip-retrieval's num_prepro_workers")
    ap.add_argument("--json", type=Path, help="also save the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the last outputs (their folder is printed)")
    # the sides' own processes
    ap.add_argument("--role", choices=["curate", "clip-retrieval", "weights"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        if args.role == "weights":
            make_weights(args.weights)
            return
        run = run_curate if args.role == "curate" else run_clip_retrieval
        args.result.write_text(json.dumps(run(args)))
        return

    peer_python = ensure_clip_retrieval()
    folder, images = image_set(args.images, args.seed)
    weights = CACHE / f"{ARCH}-random-seed0.safetensors"
    if not weights.exists():
        print(f"writing random {ARCH} weights to {weights} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--role", "weights", "--weights", str(weights)], check=True)
    work = Path(tempfile.mkdtemp(prefix="curate-bench-clip-"))
    sides = {"curate": Path(sys.executable), "clip-retrieval": peer_python}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    try:
        for r in range(args.repeats):
            order = list(sides) if r % 2 else list(sides)[::-1]  # clip-retrieval first in runs 1, 3, ...
            for side in order:
                res = run_side(side, sides[side], args, folder, weights, work / f"{side}-{r}")
                res["images_per_s"] = res["images"] / res["run_s"]
                res["images_per_cpu_s"] = res["images"] / (res["cpu_s"]["self"] + res["cpu_s"]["children"])
                runs[side].append(res)
                parts = ", ".join(f"{k} {v:.1f}" for k, v in res["parts_s"].items())
                print(
                    f"run {r + 1} {side:>14}: {res['images']} images in {res['run_s']:.1f} s "
                    f"({res['images_per_s']:.2f}/s; CPU {res['cpu_s']['self']:.0f} s + children "
                    f"{res['cpu_s']['children']:.0f} s; model load {res['load_s']:.1f} s not timed) [{parts}] "
                    f"load average {res['loadavg_1min'][0]:.1f} -> {res['loadavg_1min'][1]:.1f}",
                    flush=True,
                )
        agree = agreement(runs["curate"][-1]["output"], runs["clip-retrieval"][-1]["output"])
    finally:
        if args.keep:
            print(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if Path(runs["curate"][0]["curate_from"]) != REPO / "curate":
        print(f"curate was imported from {runs['curate'][0]['curate_from']}, not from this checkout")
    pairs = list(zip(runs["curate"], runs["clip-retrieval"], strict=True))
    ratios = [c["images_per_s"] / p["images_per_s"] for c, p in pairs]
    cpu_ratios = [c["images_per_cpu_s"] / p["images_per_cpu_s"] for c, p in pairs]
    versions = {"curate": curate_versions(), "clip-retrieval": peer_versions(peer_python)}
    print(
        f"\n{images['count']} images ({images['photo_crops']} crops of {', '.join(images['photos']) or 'no photo'}, "
        f"the rest synthetic), {images['side_min']}-{images['side_max']} px, median {images['kb_median']} KB, "
        f"captions median {images['caption_words_median']:.0f} words (max {images['caption_words_max']}); "
        f"{ARCH} random weights, batch {args.batch_size}, {os.cpu_count()} CPUs; curate: torch threads "
        f"{runs['curate'][0]['torch_threads']}, decode threads {runs['curate'][0]['decode_threads']}; "
        f"clip-retrieval: torch threads {runs['clip-retrieval'][0]['torch_threads']}, {args.workers} workers"
    )
    print(f"versions: {json.dumps(versions)}")
    for name in ("image", "text"):
        a = agree[name]
        print(
            f"{name} embeddings, curate vs clip-retrieval over {agree['images_compared']}: cosine min "
            f"{a['cosine_min']}, with the mean removed min {a['centred_cosine_min']} (different items: mean "
            f"cosine {a['different_items_cosine_mean']})"
        )
    print("curate / clip-retrieval images/s per run: " + ", ".join(f"{x:.2f}x" for x in ratios))
    print(f"median: {statistics.median(ratios):.2f}x")
    # Wall time depends on what else the machine runs; CPU seconds a side spends per image much less.
    print(
        "curate / clip-retrieval images per CPU second (both processes' trees) per run: "
        + ", ".join(f"{x:.2f}x" for x in cpu_ratios)
        + f"; median {statistics.median(cpu_ratios):.2f}x"
    )
    if args.json:
        doc = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "settings": {
                "batch_size": args.batch_size,
                "workers": args.workers,
                "arch": ARCH,
                "tar_size": TAR_SIZE,
            },
            "images": images,
            "versions": versions,
            "runs": runs,
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "cpu_ratios": cpu_ratios,
            "median_cpu_ratio": statistics.median(cpu_ratios),
            "agreement": agree,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
