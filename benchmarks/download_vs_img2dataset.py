"""Download throughput and memory: curate vs img2dataset, same machine, same URLs, same run.

Serves generated photo-like images (100-300 KB, 512-1536 px a side, ~10% PNG) from a local HTTP server
in a separate process, then runs img2dataset (from its own venv, created on first use) and curate one
after the other on the same URL list: resize to 256 px (center crop), JPEG quality 95, WebDataset shards
of 1,000. Prints images written, wall seconds, images/s and the peak memory of each tool's process tree
(polled every 0.1 s): RSS summed over the tree, which counts the pages forked workers share once per
process, and PSS, which splits them; and the ratios curate / img2dataset. Offline: nothing but
127.0.0.1 is contacted once the peer venv exists.

The server counts, per host, the most connections it held open at once: with ``--hosts N`` it serves the
same images from N loopback addresses (127.0.0.2, 127.0.0.3, ...), each a distinct host to the tools, the
URLs spread over them in turn, which shows curate's per-host limit (``--max-per-host``, the download
stage's ``max_per_host``) holding while img2dataset has none; ``--delay`` makes each answer wait, as a far
host's does, so that connections stay open long enough for the limit to matter.

``--slow-share 0.03 --slow-delay 6`` makes a fixed, seeded 3% of the images answer only after 6 s, as slow
hosts on the web do: a tool whose shard waits for its slowest URL while its sockets idle pays that tail in
every shard. ``--executors local,ray`` runs curate under each executor against the same img2dataset run
(``ray-warm``: on a Ray head started before the run, as ``curate run --address`` joins a cluster a user keeps
running, so that Ray's start-up is not in the run's time);
``--baseline DIR`` also runs curate from an earlier copy of its sources (``DIR/curate``, with ``stages/`` and
``pipelines/`` copied to ``DIR/curate/stages`` and ``DIR/curate/pipelines``), so before and after are measured
in one invocation, under the same load.

    .venv/bin/python benchmarks/download_vs_img2dataset.py --images 5000 --json bench.json
    .venv/bin/python benchmarks/download_vs_img2dataset.py --images 3000 --hosts 8 --max-per-host 2 --delay 0.2
    .venv/bin/python benchmarks/download_vs_img2dataset.py --images 3000 --slow-share 0.03 --slow-delay 6 \
        --executors local,ray

Both hold the same number of sockets: curate's ``concurrency`` per worker is img2dataset's processes x threads
divided by its workers (the local executor: one; Ray: one download actor per CPU). ``--shards-in-flight 2,4``
runs curate once per value of the download stage's ``shards_in_flight`` (how many shards a worker downloads at
once), each against the same img2dataset run.

curate runs ``pipelines/download_only.yaml``, whose download computes no perceptual hash
(``perceptual_hash: false``), as img2dataset computes none; ``--perceptual-hash true`` measures it with the
hash (and its full-size decode). The report says which settings each curate run had.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / ".bench-venv" / "img2dataset"  # shared with tests/support/peers.py
IMG2DATASET = "img2dataset==1.47.0"
CURATE = REPO / ".venv" / "bin" / "curate"
PIPELINE = REPO / "pipelines" / "download_only.yaml"
CACHE = Path(tempfile.gettempdir()) / "curate-bench-images"

IMAGE_SIZE = 256
SHARD_SIZE = 1000
PROCESSES = 2
THREADS = 32
QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations checks PyPI for updates on import
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


# ---------------------------------------------------------------- images


def _field(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    """Smooth random colour variation: a coarse random grid upsampled bicubically, centred on 0."""
    cw, ch = max(2, cells * w // max(w, h)), max(2, cells * h // max(w, h))
    small = (rng.uniform(-amp, amp, (ch, cw, 3)) + 128).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128


def _scene(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradients and soft-edged shapes: drawn at half size and upsampled, which blurs the edges."""
    sw, sh = w // 2, h // 2
    pixels = (
        rng.uniform(70, 180, 3).astype(np.float32) + _field(rng, sw, sh, 3, 80) + _field(rng, sw, sh, 12, 35)
    )
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 14)):
        x0, y0 = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        box = (x0, y0, x0 + int(rng.integers(10, sw // 2)), y0 + int(rng.integers(10, sh // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return np.asarray(img.resize((w, h), Image.BICUBIC), np.float32)


def _detail(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Fine texture and sensor-like noise: what makes a photo expensive to compress."""
    side = max(w, h)
    noise = rng.integers(-50, 51, (h, w, 3), dtype=np.int8).astype(np.float32)
    return _field(rng, w, h, side // 16, 60) + _field(rng, w, h, side // 4, 60) + noise


def _encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 6}))
    return buf.getvalue()


def _fit(render: Callable[[float], bytes], target: int, tol: float = 0.05, steps: int = 8) -> bytes:
    """Search a knob in [0, 1] (file size grows with it) for an encoding within ``tol`` of ``target``."""
    data = render(0.0)
    lo, lo_size = 0.0, len(data)
    if lo_size >= target:
        return data
    big = render(1.0)
    hi, hi_size = 1.0, len(big)
    if hi_size <= target:
        return big
    for _ in range(steps):
        t = min(max((target - lo_size) / (hi_size - lo_size), 0.1), 0.9)  # interpolate, but always move
        knob = lo + t * (hi - lo)
        data = render(knob)
        if abs(len(data) - target) <= tol * target:
            break
        if len(data) < target:
            lo, lo_size = knob, len(data)
        else:
            hi, hi_size = knob, len(data)
    return data


def make_image(job: tuple[int, int, str]) -> dict:
    """Image ``index`` of the set: its own seeded RNG, so any worker makes the same bytes."""
    index, seed, folder = job
    rng = np.random.default_rng([seed, index])
    ratio = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]))
    long = int(rng.integers(int(512 * ratio), 1537))
    w, h = (long, round(long / ratio)) if rng.random() < 0.6 else (round(long / ratio), long)
    png = rng.random() < 0.1
    target = int(rng.integers(110_000, 280_000))
    scene, detail = _scene(rng, w, h), _detail(rng, w, h)
    if png:  # a flat-colour graphic with a photo inset whose area sets the size
        flat = (scene // 32) * 32 + 16
        x0, y0 = rng.uniform(0, 1, 2)

        def render(knob: float) -> bytes:
            iw, ih = int(w * knob**0.5), int(h * knob**0.5)
            x, y = int(x0 * (w - iw)), int(y0 * (h - ih))
            pixels = flat.copy()
            pixels[y : y + ih, x : x + iw] = (
                scene[y : y + ih, x : x + iw] + 0.3 * detail[y : y + ih, x : x + iw]
            )
            return _encode(pixels, "PNG", 0)

    else:
        quality = int(rng.integers(80, 93))

        def render(knob: float) -> bytes:
            return _encode(scene + 3 * knob * detail, "JPEG", quality)

    data = _fit(render, target)
    name = f"{index:06d}.{'png' if png else 'jpg'}"
    (Path(folder) / name).write_bytes(data)
    return {"name": name, "width": w, "height": h, "bytes": len(data)}


def image_set(count: int, seed: int) -> tuple[Path, list[dict]]:
    """The cached image folder for (count, seed); made with every core if absent or incomplete."""
    folder = CACHE / f"{count}-{seed}"
    manifest = folder / "manifest.json"
    if manifest.exists():
        return folder, json.loads(manifest.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating {count:,} images into {folder} ...", flush=True)
    start = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool:
        jobs = [(i, seed, str(folder)) for i in range(count)]
        images = pool.map(make_image, jobs, chunksize=16)
    manifest.write_text(json.dumps(images))  # written last: its presence means the set is complete
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return folder, images


def image_stats(images: list[dict]) -> dict:
    sizes = np.array([i["bytes"] for i in images]) / 1000
    sides = np.array([(i["width"], i["height"]) for i in images])
    pngs = sum(i["name"].endswith(".png") for i in images)
    return {
        "count": len(images),
        "png": pngs,
        "kb_min": round(float(sizes.min()), 1),
        "kb_median": round(float(np.median(sizes)), 1),
        "kb_mean": round(float(sizes.mean()), 1),
        "kb_max": round(float(sizes.max()), 1),
        "side_min": int(sides.min()),
        "side_max": int(sides.max()),
        "megapixels_mean": round(float((sides[:, 0] * sides[:, 1]).mean() / 1e6), 2),
        "total_mb": round(float(sizes.sum() / 1000), 1),
    }


def slow_images(images: list[dict], share: float, seed: int) -> frozenset[str]:
    """The names of ``share`` of the images, a fixed seeded choice spread over the whole list."""
    count = round(share * len(images))
    rng = np.random.default_rng([seed, 6])
    return frozenset(images[i]["name"] for i in rng.choice(len(images), size=count, replace=False))


def write_url_list(path: Path, images: list[dict], hosts: list[str], seed: int) -> None:
    """The URL list, the images spread over ``hosts`` (``address:port``) in turn."""
    rng = np.random.default_rng(seed)
    things = ["dog", "mountain lake", "city street", "bowl of fruit", "old car", "forest path", "beach"]
    looks = ["at dusk", "in the rain", "on a sunny day", "from above", "in winter", "close up"]
    captions = [f"a photo of a {rng.choice(things)} {rng.choice(looks)}" for _ in images]
    urls = [f"http://{hosts[k % len(hosts)]}/{i['name']}" for k, i in enumerate(images)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


# ---------------------------------------------------------------- server


class _QuietHandler(SimpleHTTPRequestHandler):
    delay = 0.0  # seconds before each answer: a host far away, whose connections stay open longer
    slow: frozenset[str] = frozenset()  # file names answered only after ``slow_delay`` seconds
    slow_delay = 0.0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        wait = self.delay + (self.slow_delay if self.path.rsplit("/", 1)[-1] in self.slow else 0.0)
        if wait:
            time.sleep(wait)
        super().do_GET()

    def handle(self) -> None:
        """Serve the connection, counting it open while it lasts (keep-alive requests included)."""
        server: _Server = self.server  # type: ignore[assignment]
        with server.count_lock:
            server.active += 1
            server.peak = max(server.peak, server.active)
        try:
            super().handle()
        finally:
            with server.count_lock:
                server.active -= 1


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default backlog of 5 is small for 64 concurrent client threads
    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count_lock = threading.Lock()
        self.active = self.peak = 0


def _serve(folder: str, conn, hosts: int, delay: float, slow: frozenset[str], slow_delay: float) -> None:
    """Serve ``folder`` from 127.0.0.1, or from ``hosts`` addresses 127.0.0.2, ...; send their
    ``address:port``; then answer each "peaks" on ``conn`` with the peak connections per host (and reset)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    addresses = [f"127.0.0.{2 + i}" for i in range(hosts)] if hosts else ["127.0.0.1"]
    settings = {"delay": delay, "slow": slow, "slow_delay": slow_delay}
    handler = functools.partial(type("_Handler", (_QuietHandler,), settings), directory=folder)
    servers = [_Server((address, 0), handler) for address in addresses]
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    conn.send([f"{h.server_address[0]}:{h.server_address[1]}" for h in servers])
    with contextlib.suppress(EOFError, OSError):
        while conn.recv() == "peaks":
            peaks = {}
            for httpd in servers:
                with httpd.count_lock:
                    peaks[f"{httpd.server_address[0]}:{httpd.server_address[1]}"] = httpd.peak
                    httpd.peak = httpd.active
            conn.send(peaks)


class ImageServer:
    """A static file server in its own process: its CPU is not in either tool's tree but shares the box."""

    def __init__(
        self,
        folder: Path,
        hosts: int = 0,
        delay: float = 0.0,
        slow: frozenset[str] = frozenset(),
        slow_delay: float = 0.0,
    ):
        self.folder, self.hosts_count, self.delay = folder, hosts, delay
        self.slow, self.slow_delay = slow, slow_delay
        self.process: mp.Process | None = None
        self.hosts: list[str] = []
        self._conn = None

    def __enter__(self) -> ImageServer:
        parent, child = mp.Pipe()
        self.process = mp.Process(
            target=_serve,
            args=(str(self.folder), child, self.hosts_count, self.delay, self.slow, self.slow_delay),
            daemon=True,
        )
        self.process.start()
        child.close()
        if not parent.poll(30):
            raise RuntimeError("the image server did not start")
        self.hosts, self._conn = parent.recv(), parent
        return self

    def peaks(self) -> dict[str, int]:
        """The most connections each host held at once since the last call."""
        assert self._conn is not None
        self._conn.send("peaks")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


# ---------------------------------------------------------------- tools


def ensure_img2dataset() -> Path:
    """img2dataset's pins clash with curate's (webdataset<0.3, pandas<3): it gets a venv of its own."""
    exe = PEER_VENV / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print(f"creating {PEER_VENV} with {IMG2DATASET} (once) ...", flush=True)
    for cmd in (
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(PEER_VENV / "bin" / "pip"), "install", "-q", IMG2DATASET],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(PEER_VENV, ignore_errors=True)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return exe


@dataclass
class Result:
    tool: str
    images_ok: int
    images_total: int
    wall_s: float
    images_per_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    returncode: int
    peak_connections_per_host: int = 0  # the most any one host held open at once
    download: dict | None = None  # curate's download settings beyond img2dataset's work (perceptual_hash)


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """RSS and PSS of ``proc`` and all its descendants, in bytes (PSS from smaps_rollup: cheap)."""
    rss = pss = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in family:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            mem = p.memory_full_info()
            rss, pss = rss + mem.rss, pss + mem.pss
    return rss, pss


def _kill_tree(popen: subprocess.Popen) -> None:
    try:
        family = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=5)
        if not alive:
            break
        family = alive
    popen.wait()


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[float, tuple[int, int], int]:
    """Run ``cmd`` (output to ``log``) in an empty folder beside ``log``, polling its tree's memory: (wall s,
    peak (RSS, PSS) bytes, exit). Not in this checkout, nor beside an output folder named ``curate``: Ray's
    workers put the driver's folder on their path, and either would shadow the curate that is meant."""
    env = env or {**os.environ, **QUIET_ENV}
    cwd = log.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    with log.open("wb") as out:
        start = time.perf_counter()
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
        )
        try:
            proc, peak_rss, peak_pss = psutil.Process(popen.pid), 0, 0
            while popen.poll() is None:
                rss, pss = _tree_memory(proc)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                time.sleep(0.1)
            wall = time.perf_counter() - start
        finally:
            if popen.poll() is None:  # Ctrl-C or an error here: take the tool down with us
                _kill_tree(popen)
            with contextlib.suppress(ProcessLookupError):  # and anything it left behind in its session
                os.killpg(popen.pid, signal.SIGKILL)
    return wall, (peak_rss, peak_pss), popen.returncode


def count_jpgs(tars: list[Path]) -> int:
    count = 0
    for path in tars:
        with tarfile.open(path) as tar:
            count += sum(1 for m in tar if m.isfile() and m.name.endswith(".jpg"))
    return count


def measure(
    tool: str, cmd: list[str], tar_dir: Path, log: Path, total: int, env: dict[str, str] | None = None
) -> Result:
    wall, peak, rc = run_measured(cmd, log, env)
    ok = count_jpgs(sorted(tar_dir.glob("*.tar"))) if tar_dir.exists() else 0
    if rc != 0 or ok == 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"{tool} exited with {rc}, {ok} images written; log tail:\n  " + "\n  ".join(tail))
    rss, pss = (round(b / 2**20) for b in peak)
    return Result(tool, ok, total, round(wall, 2), round(ok / wall, 1), rss, pss, rc)


def run_img2dataset(exe: Path, url_list: Path, out: Path, total: int) -> Result:
    cmd = [
        str(exe),
        f"--url_list={url_list}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--output_folder={out}",
        f"--image_size={IMAGE_SIZE}",
        "--resize_mode=center_crop",
        f"--processes_count={PROCESSES}",
        f"--thread_count={THREADS}",
        f"--number_sample_per_shard={SHARD_SIZE}",
        "--encode_format=jpg",
        "--encode_quality=95",
        "--distributor=multiprocessing",
        "--enable_wandb=False",
    ]
    return measure("img2dataset", cmd, out, out.with_suffix(".log"), total)


def curate_pipeline(source: Path | None) -> Path:
    """The pipeline a curate run uses: a baseline's own copy where it has one (an earlier curate may not
    know a setting of today's), else this checkout's."""
    earlier = source / "curate" / "pipelines" / PIPELINE.name if source is not None else None
    return earlier if earlier is not None and earlier.exists() else PIPELINE


def download_settings(pipeline: Path, perceptual_hash: bool | None) -> dict:
    """What the download stage of ``pipeline`` computes beyond img2dataset's work, with this run's
    ``--perceptual-hash``: the perceptual hash (and its full-size decode) and PDQ (the stage's defaults
    where the YAML says nothing)."""
    import yaml

    stages = yaml.safe_load(pipeline.read_text()).get("stages") or []
    stage = next((s for s in stages if s.get("stage") == "download"), {})
    on = stage.get("perceptual_hash", True) if perceptual_hash is None else perceptual_hash
    return {"pipeline": pipeline.name, "perceptual_hash": bool(on), "pdq": bool(stage.get("pdq", False))}


def curate_sets(
    url_list: Path,
    out: Path,
    hosts: list[str],
    max_per_host: int | None,
    executor: str = "local",
    perceptual_hash: bool | None = None,
    in_flight: int | None = None,
) -> list[str]:
    allowed = ",".join(f'"{h}"' for h in hosts)
    sets = [
        f"input.path={url_list}",
        "input.url_col=url",
        "input.caption_col=caption",
        f"output.path={out}",
        f"shard_size={SHARD_SIZE}",
        f"stages.download.allow_private=[{allowed}]",
        f"executor.kind={'local' if executor == 'local' else 'ray'}",
        f"stages.download.concurrency={curate_sockets(executor)}",
    ]
    if in_flight is not None:
        sets.append(f"stages.download.shards_in_flight={in_flight}")
    if max_per_host is not None:
        sets.append(f"stages.download.max_per_host={max_per_host}")
    if perceptual_hash is not None:
        sets.append(f"stages.download.perceptual_hash={str(perceptual_hash).lower()}")
    return [arg for s in sets for arg in ("--set", s)]


SOCKETS: list[int] = []  # --curate-sockets: curate's sockets in all, when not img2dataset's


def curate_sockets(executor: str) -> int:
    """curate's sockets per worker, so that it holds as many in all as img2dataset's PROCESSES x THREADS
    (or ``--curate-sockets``): the local executor is one worker; Ray runs one download actor per CPU."""
    total = SOCKETS[0] if SOCKETS else PROCESSES * THREADS
    workers = 1 if executor == "local" else os.cpu_count() or 1
    return max(1, total // workers)


_WARM: list[str] = []  # the address of the running head, once started


def warm_address(stack: contextlib.ExitStack) -> str:
    """A Ray head of the benchmark's own (its temp dir, ports, process group; tests/raycluster.py), started
    once and stopped when the benchmark ends; its address."""
    if not _WARM:
        sys.path.insert(0, str(REPO / "tests"))
        from raycluster import Cluster, cluster_env

        cpus = os.cpu_count() or 1
        cluster = stack.enter_context(
            Cluster(cluster_env(), worker_node=False, dashboard=False, head_cpus=cpus)
        )
        _WARM.append(cluster.address)
    return _WARM[0]


def curate_problem(pipeline: Path, sets: list[str], env: dict[str, str]) -> str | None:
    """Why the curate side cannot run (``curate validate`` fails), or None."""
    if not pipeline.exists():
        return f"{pipeline} does not exist"
    done = subprocess.run(
        [str(CURATE), "validate", str(pipeline), *sets], capture_output=True, text=True, env=env
    )
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return "curate validate failed: " + (lines[-1] if lines else f"exit code {done.returncode}")


def curate_env(source: Path | None) -> dict[str, str]:
    """The environment of a curate run: quiet, offline, and with ``source`` (an earlier copy of curate's
    sources) ahead of the installed package. Run from a neutral folder, so that neither the driver nor Ray's
    workers (which get the driver's folder on their path) import this checkout instead."""
    env = {**os.environ, **QUIET_ENV}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def run_curate(
    tool: str,
    url_list: Path,
    out: Path,
    hosts: list[str],
    total: int,
    max_per_host: int | None,
    executor: str = "local",
    source: Path | None = None,
    perceptual_hash: bool | None = None,
    in_flight: int | None = None,
    address: str | None = None,
) -> Result | None:
    pipeline = curate_pipeline(source)
    sets = curate_sets(url_list, out, hosts, max_per_host, executor, perceptual_hash, in_flight)
    if address:
        sets += ["--set", f"executor.address={address}"]
    env = curate_env(source)
    problem = curate_problem(pipeline, sets, env)
    if problem:
        print(f"skipping {tool}: {problem}")
        return None
    cmd = [str(CURATE), "run", str(pipeline), "--overwrite", "-q", *sets]
    result = measure(tool, cmd, out / "shards", out.with_suffix(".log"), total, env)
    result.download = download_settings(pipeline, perceptual_hash)
    result.download["concurrency"] = curate_sockets(executor)
    if in_flight is not None:
        result.download["shards_in_flight"] = in_flight
    return result


# ---------------------------------------------------------------- report


def ratios(results: dict[str, Result]) -> dict[str, dict[str, float]]:
    """Each curate run against img2dataset: throughput and peak memory, curate / img2dataset."""
    if "img2dataset" not in results:
        return {}
    ref = asdict(results["img2dataset"])
    keys = {"throughput": "images_per_s", "peak_rss": "peak_rss_mib", "peak_pss": "peak_pss_mib"}
    out = {}
    for tool, result in results.items():
        if tool != "img2dataset":
            cur = asdict(result)
            out[tool] = {
                name: round(cur[k] / ref[k], 2) if ref[k] else float("nan") for name, k in keys.items()
            }
    return out


def print_report(
    stats: dict, results: dict[str, Result], ratio: dict[str, dict[str, float]], hosts: list[str], slow: str
) -> None:
    print(
        f"\n{stats['count']:,} images ({stats['png']} PNG), {stats['kb_min']:.0f}-{stats['kb_max']:.0f} KB "
        f"(median {stats['kb_median']:.0f}), {stats['side_min']}-{stats['side_max']} px a side, "
        f"{stats['total_mb']:,.0f} MB; -> {IMAGE_SIZE} px center crop, JPEG q95; "
        f"{os.cpu_count()} CPUs; img2dataset {PROCESSES} processes x {THREADS} threads, "
        f"curate as in {PIPELINE.relative_to(REPO)}; served by {len(hosts)} host(s){slow}\n"
    )
    row = "{:<16} {:>11} {:>8} {:>9} {:>13} {:>13} {:>15}".format
    print(row("tool", "images ok", "wall s", "images/s", "peak RSS MiB", "peak PSS MiB", "peak conn/host"))
    for r in results.values():
        ok = f"{r.images_ok}/{r.images_total}"
        print(
            row(
                r.tool,
                ok,
                f"{r.wall_s:.1f}",
                f"{r.images_per_s:.1f}",
                r.peak_rss_mib,
                r.peak_pss_mib,
                r.peak_connections_per_host,
            )
        )
    for r in results.values():
        if r.download is not None:
            d = r.download
            extra = [name for name in ("perceptual_hash", "pdq") if d[name]]
            print(
                f"{r.tool}: {d['pipeline']}, perceptual_hash {str(d['perceptual_hash']).lower()}, "
                f"pdq {str(d['pdq']).lower()}: "
                + (
                    f"computes {' and '.join(extra)} too (img2dataset computes no perceptual hash)"
                    if extra
                    else "no perceptual hash, as img2dataset"
                )
            )
    for tool, r in ratio.items():
        print(
            f"\n{tool} / img2dataset: throughput {r['throughput']:.2f}x, "
            f"peak RSS {r['peak_rss']:.2f}x, peak PSS {r['peak_pss']:.2f}x",
            end="",
        )
    print()


def main() -> None:
    global SHARD_SIZE, CURATE  # --shard-size sets it for both tools; --curate-env, curate's environment
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="how many images to serve")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated image set")
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--skip-curate", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (their folder is printed)")
    ap.add_argument("--json", type=Path, help="also save the figures here")
    ap.add_argument(
        "--hosts", type=int, default=0, help="serve from this many loopback addresses (127.0.0.2..)"
    )
    ap.add_argument("--max-per-host", type=int, help="curate's max_per_host (default: the stage's default)")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds the server waits before each answer")
    ap.add_argument(
        "--slow-share", type=float, default=0.0, help="share of the images answered only after --slow-delay"
    )
    ap.add_argument("--slow-delay", type=float, default=6.0, help="seconds a slow image waits (default 6)")
    ap.add_argument(
        "--executors",
        default="local",
        help="curate's executors, comma-separated: local, ray, ray-warm (default local)",
    )
    ap.add_argument(
        "--shards-in-flight",
        default="",
        help="curate's download.shards_in_flight, comma-separated, each a run (auto: the stage's default)",
    )
    ap.add_argument(
        "--curate-sockets",
        type=int,
        help="curate's sockets in all (default: img2dataset's processes x threads, the same number)",
    )
    ap.add_argument("--baseline", type=Path, help="also run curate from this earlier copy of its sources")
    ap.add_argument(
        "--curate-env",
        type=Path,
        help="run curate from this environment (its bin/curate) instead of the checkout's .venv: e.g. one made "
        "as users install curate, `UV_PROJECT_ENVIRONMENT=DIR uv sync --locked`, whose Ray lacks the dashboard "
        "packages that the dev extra (ray[default]) brings, and so starts fewer processes",
    )
    ap.add_argument(
        "--shard-size", type=int, default=SHARD_SIZE, help="rows a shard, both tools (default 1000)"
    )
    ap.add_argument(
        "--perceptual-hash",
        choices=["true", "false"],
        help="curate's download.perceptual_hash (default: as the pipeline says; download_only.yaml: false, "
        "as img2dataset, which computes none)",
    )
    args = ap.parse_args()
    if args.curate_env is not None:
        CURATE = args.curate_env / "bin" / "curate"
        if not CURATE.exists():
            ap.error(f"--curate-env: {CURATE} does not exist")
    perceptual_hash = None if args.perceptual_hash is None else args.perceptual_hash == "true"
    SHARD_SIZE = args.shard_size
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if not executors or set(executors) - {"local", "ray", "ray-warm"}:
        ap.error("--executors takes local, ray, ray-warm")
    SOCKETS.extend([args.curate_sockets] if args.curate_sockets else [])
    depths = [None if v.strip() == "auto" else int(v) for v in args.shards_in_flight.split(",") if v.strip()]
    depths = depths or [None]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on kill too

    exe = None if args.skip_img2dataset else ensure_img2dataset()
    folder, images = image_set(args.images, args.seed)
    stats = image_stats(images)
    slow = slow_images(images, args.slow_share, args.seed)
    slow_note = f"; {len(slow)} images answer after {args.slow_delay:g} s" if slow else ""
    work = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    results: dict[str, Result] = {}
    try:
        with (
            contextlib.ExitStack() as stack,
            ImageServer(folder, args.hosts, args.delay, slow, args.slow_delay) as server,
        ):
            url_list = work / "urls.parquet"
            write_url_list(url_list, images, server.hosts, args.seed)
            if exe is not None:
                server.peaks()
                results["img2dataset"] = run_img2dataset(exe, url_list, work / "img2dataset", len(images))
                results["img2dataset"].peak_connections_per_host = max(server.peaks().values())
            sources = [("curate", None)] + ([("baseline", args.baseline)] if args.baseline else [])
            for (name, source), executor, depth in itertools.product(
                sources if not args.skip_curate else [], executors, depths
            ):
                tool = name if executor == "local" else f"{name}-{executor}"
                tool += "" if depth is None else f"-k{depth}"
                address = warm_address(stack) if executor == "ray-warm" else None
                server.peaks()
                curate = run_curate(
                    tool,
                    url_list,
                    work / tool,
                    server.hosts,
                    len(images),
                    args.max_per_host,
                    executor,
                    source,
                    perceptual_hash,
                    depth,
                    address,
                )
                if curate is not None:
                    curate.peak_connections_per_host = max(server.peaks().values())
                    results[tool] = curate
    finally:
        if args.keep:
            print(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ratio = ratios(results)
    print_report(stats, results, ratio, server.hosts, slow_note)
    if args.json:
        doc = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "settings": {
                "image_size": IMAGE_SIZE,
                "resize_mode": "center_crop",
                "encode_quality": 95,
                "shard_size": SHARD_SIZE,
                "processes": PROCESSES,
                "threads": THREADS,
                "hosts": len(server.hosts),
                "server_delay_s": args.delay,
                "slow_images": len(slow),
                "slow_delay_s": args.slow_delay,
                "executors": executors,
                "baseline": str(args.baseline) if args.baseline else None,
                "curate_max_per_host": args.max_per_host,
                "curate_download": {name: r.download for name, r in results.items() if r.download},
            },
            "images": stats,
            "results": {name: asdict(r) for name, r in results.items()},
            "ratios": ratio,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server and any running tool were stopped on the way out
        sys.exit("interrupted")
