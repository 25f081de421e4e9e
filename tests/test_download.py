"""The download stage against a real local HTTP server: every status from a real request, SSRF attempts
that never reach a canary listener, a whole pipeline run, and `curate retry`."""

import dataclasses
import io
import json
import socket
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import shard_files, sidecars, write_pipeline
from PIL import Image
from support.hostile import HostileServer, encode, png_claiming, static
from support.tls import make_ca, server_context

from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.demo.server import WorldServer
from curate.kit.imaging import Processed
from curate.stages.download import Download, DownloadConfig


@pytest.fixture(scope="module")
def server():
    with WorldServer() as s:
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        jpg = encode(photo, "JPEG")
        s.add("/ok.jpg", jpg, "image/jpeg")
        s.add("/photo.png", encode(photo, "PNG"), "image/png")
        s.add("/html.jpg", b"<!DOCTYPE html><html><body>Not here</body></html>", "image/jpeg")
        s.add("/truncated.jpg", jpg[: len(jpg) // 2], "image/jpeg")
        s.add("/bomb.png", png_claiming(100_000, 100_000), "image/png")
        s.add("/cmyk.jpg", encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), "image/jpeg")
        s.add(
            "/16bit.png",
            encode(Image.fromarray(np.full((48, 64), 30000, dtype=np.uint16)), "PNG"),
            "image/png",
        )
        exif = Image.Exif()
        exif[0x0112] = 6
        s.add("/rotated.jpg", encode(Image.new("RGB", (120, 40), "green"), "JPEG", exif=exif), "image/jpeg")
        frames = [Image.new("RGB", (50, 50), c) for c in ("red", "blue")]
        s.add("/anim.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif")
        yield s


def download(server, paths, **cfg):
    """Run the stage on ``server.url + path`` for each path; returns the output rows by path."""
    cfg = {"allow_private": [server.host_port], "image_size": 32, "resize_mode": "keep_ratio", **cfg}
    stage = Download(DownloadConfig(**cfg))
    stage.ensure_setup()
    urls = [p if "://" in p else server.url + p for p in paths]
    n = len(urls)
    t = pa.table(
        {
            "url": urls,
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "drop_reason": pa.nulls(n, pa.string()),
        }
    )
    return dict(zip(paths, stage(t).to_pylist(), strict=True))


def test_every_column_written_is_a_field_of_the_processed_image():
    # The stage copies each column of ``writes`` from the field of the same name.
    writes = Download(DownloadConfig(pdq=True)).writes
    assert set(writes) <= {f.name for f in dataclasses.fields(Processed)}
    assert writes[:2] == ("status", "error")  # in place; the others are appended in this order
    assert {"pdq", "pdq_quality"} & set(Download().writes) == set()  # only when asked for


def test_rows_not_downloaded_keep_their_status_and_get_nulls(server):
    # robots_txt off: the server's robots.txt hits are counted by another test.
    rows = download(server, ["/ok.jpg"], robots_txt=False)
    assert rows["/ok.jpg"]["status"] == "ok" and rows["/ok.jpg"]["mime"] == "image/jpeg"
    stage = Download(DownloadConfig(allow_private=[server.host_port], robots_txt=False))
    stage.ensure_setup()
    t = pa.table(
        {
            "url": [server.url + "/ok.jpg"],
            "status": ["invalid_url"],
            "error": ["from the reader"],
            "drop_reason": pa.nulls(1, pa.string()),
        }
    )
    (row,) = stage(t).to_pylist()
    assert (row["status"], row["error"]) == ("invalid_url", "from the reader")
    assert all(row[c] is None for c in stage.writes[2:])


def test_without_perceptual_hash_the_phash_columns_are_null(server):
    paths = ["/ok.jpg", "/photo.png", "/rotated.jpg"]
    on = download(server, paths, robots_txt=False)
    off = download(server, paths, robots_txt=False, perceptual_hash=False)
    assert Download(DownloadConfig(perceptual_hash=False)).writes == Download().writes  # null, not absent
    for path in paths:
        assert on[path]["phash"] and on[path]["phash_mirror"], path
        assert off[path]["status"] == "ok" and off[path]["phash"] is off[path]["phash_mirror"] is None
        same = ("width", "height", "orig_width", "orig_height", "sha256", "md5", "mime")
        assert {c: off[path][c] for c in same} == {c: on[path][c] for c in same}, path
    # Stored at 32 px, the 320x240 JPEG decodes at a reduced scale (tests/test_imaging.py); the PNG cannot.
    assert off["/photo.png"]["image"] == on["/photo.png"]["image"]
    assert off["/ok.jpg"]["image"] != on["/ok.jpg"]["image"]
    assert Download(DownloadConfig(perceptual_hash=False)).leaves_null.keys() == {"phash", "phash_mirror"}
    assert Download().leaves_null == {}


def test_good_images_of_every_kind(server):
    rows = download(
        server,
        [
            "/ok.jpg",
            "/photo.png",
            "/cmyk.jpg",
            "/16bit.png",
            "/rotated.jpg",
            "/anim.gif",
            "/redirect/3/ok.jpg",
        ],
    )
    for path, row in rows.items():
        assert row["status"] == "ok", (path, row["error"])
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 32
        assert (row["width"], row["height"]) == img.size
    assert (rows["/ok.jpg"]["orig_width"], rows["/ok.jpg"]["orig_height"]) == (320, 240)
    assert (rows["/rotated.jpg"]["orig_width"], rows["/rotated.jpg"]["orig_height"]) == (40, 120)
    assert rows["/photo.png"]["mime"] == "image/png" and rows["/anim.gif"]["mime"] == "image/gif"
    assert rows["/ok.jpg"]["sha256"] == rows["/redirect/3/ok.jpg"]["sha256"]
    assert server.hits["/robots.txt"] == 1  # once per origin, for seven URLs on eight threads


def test_every_failure_has_its_status(server):
    rows = download(
        server,
        [
            "/status/404",
            "/status/403",
            "/html.jpg",
            "/truncated.jpg",
            "/bomb.png",
            "/loop",
            "/optout/noai/a.jpg",
            "/optout/noimageindex/b.jpg",
            "/private/c.jpg",
            "/endless",
            "/slow/5",
        ],
        max_bytes=1 << 20,
        read_timeout=1,
        retries=0,
        total_timeout=4,
    )
    got = {p: r["status"] for p, r in rows.items()}
    assert got == {
        "/status/404": "http_404",
        "/status/403": "http_403",
        "/html.jpg": "not_an_image",
        "/truncated.jpg": "decode_error",
        "/bomb.png": "too_many_pixels",
        "/loop": "too_many_redirects",
        "/optout/noai/a.jpg": "opted_out",
        "/optout/noimageindex/b.jpg": "opted_out",
        "/private/c.jpg": "opted_out",
        "/endless": "too_large",
        "/slow/5": "timeout",
    }
    assert rows["/optout/noai/a.jpg"]["error"] == "X-Robots-Tag: noai"
    assert "robots.txt" in rows["/private/c.jpg"]["error"]
    assert all(r["image"] is None for p, r in rows.items() if r["status"] != "ok")
    assert rows["/status/404"]["error"].startswith("HTTP 404")


def test_x_robots_tag_parsing():
    from curate.kit.net import _opt_out

    assert _opt_out([("X-Robots-Tag", "noarchive, NoAI")]) == "noai"
    assert _opt_out([("x-robots-tag", "googlebot: noindex")]) is None  # for another crawler
    assert _opt_out([("X-Robots-Tag", "curate: noimageai")]) == "noimageai"
    assert _opt_out([("X-Robots-Tag", "*: noindex"), ("Content-Type", "image/jpeg")]) == "noindex"
    assert _opt_out([("X-Robots-Tag", "nofollow")]) is None


def test_retries_only_transient_failures(server):
    before = dict(server.hits)
    rows = download(
        server, ["/flaky/a/2", "/status/500", "/status/404", "/status/429"], retries=2, backoff=0.01
    )
    assert (
        rows["/flaky/a/2"]["status"] == "ok" and server.hits["/flaky/a/2"] - before.get("/flaky/a/2", 0) == 3
    )
    assert (
        rows["/status/500"]["status"] == "http_500"
        and server.hits["/status/500"] - before.get("/status/500", 0) == 3
    )
    assert (
        rows["/status/429"]["status"] == "http_429"
        and server.hits["/status/429"] - before.get("/status/429", 0) == 3
    )
    assert server.hits["/status/404"] - before.get("/status/404", 0) == 1  # a 4xx is never retried


def test_a_trickling_body_is_cut_by_the_total_deadline(server):
    start = time.monotonic()
    rows = download(server, ["/trickle"], total_timeout=2, read_timeout=5, retries=3)
    took = time.monotonic() - start
    assert rows["/trickle"]["status"] == "timeout" and "deadline" in rows["/trickle"]["error"]
    assert took < 3.0  # the deadline covers retries: one second of grace at most


@pytest.fixture
def canary():
    """A listener on a loopback port that records every connection it gets."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.1)
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, addr = sock.accept()
                seen.append(addr)
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], seen
    stop.set()
    thread.join()
    sock.close()


def test_ssrf_attempts_never_connect(server, canary):
    port, seen = canary
    attempts = [
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        f"http://2130706433:{port}/x.jpg",  # 127.0.0.1 in decimal
        f"http://0x7f000001:{port}/x.jpg",  # in hex
        f"http://0177.0.0.1:{port}/x.jpg",  # in octal
        f"http://[::ffff:127.0.0.1]:{port}/x.jpg",  # IPv4-mapped IPv6
        f"http://localhost:{port}/x.jpg",
        f"http://10.0.0.1:{port}/x.jpg",
        f"http://100.64.0.1:{port}/x.jpg",  # CGNAT
        f"http://[fd00::1]:{port}/x.jpg",  # unique local
        f"/redirect-to?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fsecret",  # the allowed server redirects away
        "/redirect-to?url=file%3A%2F%2F%2Fetc%2Fpasswd",
    ]
    rows = download(server, attempts, robots_txt=False)
    for url, row in rows.items():
        assert row["status"] == "blocked_address", (url, row)
    assert seen == []
    assert "127.0.0.1 is a loopback address" in rows[f"http://2130706433:{port}/x.jpg"]["error"]


def test_allow_private_is_host_and_port_exact(server, canary):
    port, seen = canary
    rows = download(server, [f"http://127.0.0.1:{port}/x.jpg"], robots_txt=False)
    assert rows[f"http://127.0.0.1:{port}/x.jpg"]["status"] == "blocked_address" and seen == []
    with pytest.raises(ValueError, match="not host:port"):
        DownloadConfig(allow_private=["127.0.0.1"])


def world_pipeline(tmp_path, server, paths, after=(), **download):
    n = len(paths)
    captions = [f"a test picture number {i}" for i in range(n)]
    pa_table = pa.table({"url": [server.url + p for p in paths], "caption": captions})
    pq.write_table(pa_table, tmp_path / "in.parquet")
    stage = {"stage": "download", "allow_private": [server.host_port], "image_size": 32, **download}
    return write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [stage, *after],
        shard_size=10,
        input={"url_col": "url", "caption_col": "caption"},
    )


def test_a_pipeline_run_accounts_for_every_row(tmp_path, server):
    paths = ["/ok.jpg", "/status/404", "/html.jpg", "/photo.png", "/loop"] * 5
    p = world_pipeline(tmp_path, server, paths)
    summary = run_pipeline(load_config(p), show_progress=False)
    assert summary.exit_code == 0 and summary.counts["rows"] == 25
    assert summary.counts["status"] == {"http_404": 5, "not_an_image": 5, "ok": 10, "too_many_redirects": 5}
    side = sidecars(tmp_path / "out")
    assert "image" not in side.column_names and side["sha256"].null_count == 10
    samples = list(
        wds.WebDataset(sorted(str(x) for x in (tmp_path / "out/shards").glob("*.tar")), shardshuffle=False)
    )
    assert len(samples) == 10 and all(
        Image.open(io.BytesIO(s["jpg"])).size == (42, 32) or Image.open(io.BytesIO(s["jpg"])).size == (32, 32)
        for s in samples
    )
    assert {json.loads(s["json"])["status"] for s in samples} == {"ok"}


def test_retry_refetches_only_transient_failures(tmp_path, server, cli):
    # shard 00000: all fine; shard 00001: two URLs that fail twice, then work; and a 404 that stays
    paths = ["/ok.jpg"] * 10 + ["/flaky/r1/2", "/flaky/r2/2", "/status/404"] + ["/ok.jpg"] * 7
    p = world_pipeline(tmp_path, server, paths, retries=0)
    assert cli("run", p, "-q").code == 0
    shards = tmp_path / "out/shards"
    untouched = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in shards.glob("00000*")}
    before = json.loads((shards / "00001_stats.json").read_text())
    assert before["status"] == {"http_404": 1, "http_500": 2, "ok": 17 - 10}

    r = cli("retry", tmp_path / "out")  # first try: each flaky URL fails a second time
    assert (
        r.code == 0 and "retried 2 row(s) in 1 shard(s): 0 recovered; still failing: http_500: 2" in r.out
    ), r
    r = cli("retry", tmp_path / "out", "--status", "http_5xx")
    assert r.code == 0 and "2 recovered" in r.out, r

    after = json.loads((shards / "00001_stats.json").read_text())
    assert after["status"] == {"http_404": 1, "ok": 9} and after["kept"] == 9 and len(after["retries"]) == 2
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in shards.glob("00000*")} == untouched
    side = sidecars(tmp_path / "out")
    assert (
        sorted(side["input_index"].to_pylist()) == list(range(20))
        and side["status"].to_pylist().count("ok") == 19
    )
    tar = list(wds.WebDataset(str(shards / "00001.tar"), shardshuffle=False))
    assert len(tar) == 9 and all("jpg" in s for s in tar)
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert info["counts"]["ok"] == 19 and len(info["retries"]) == 2
    assert cli("retry", tmp_path / "out", "--status", "http_404").out.startswith("retried 1 row(s)")


def test_retry_keeps_the_thumbnails_of_rows_dropped_before(tmp_path, server, cli):
    paths = ["/ok.jpg"] * 3 + ["/flaky/r3/1"] + ["/ok.jpg"] * 6
    drop_late_rows = {"stage": "filter", "rules": ["input_index < 7"]}
    p = world_pipeline(tmp_path, server, paths, retries=0, after=[drop_late_rows])
    assert cli("run", p, "-q").code == 0
    audit = tmp_path / "out/dropped/00000.tar"
    before = audit.read_bytes()
    with tarfile.open(audit) as tar:
        assert len([n for n in tar.getnames() if n.endswith(".jpg")]) == 3  # rows 7, 8 and 9

    r = cli("retry", tmp_path / "out")
    assert r.code == 0 and "1 recovered" in r.out, r
    with tarfile.open(audit) as tar:
        names = tar.getnames()
        assert len([n for n in names if n.endswith(".jpg")]) == 3
        for name in names:
            if name.endswith(".jpg"):
                with Image.open(io.BytesIO(tar.extractfile(name).read())) as img:
                    assert max(img.size) <= 128
    stats = json.loads((tmp_path / "out/shards/00000_stats.json").read_text())
    assert stats["status"] == {"ok": 10} and stats["drop_reason"] == {"input_index>=7": 3}
    assert stats["written"]["dropped_thumbnails"] == 3 and len(before) > 0


def test_ray_and_local_download_the_same_bytes(tmp_path, server, ray_cluster):
    from conftest import shard_files

    paths = ["/ok.jpg", "/photo.png", "/status/404", "/cmyk.jpg", "/anim.gif"] * 6
    p = world_pipeline(tmp_path, server, paths)
    local = run_pipeline(load_config(p, [f"output.path={tmp_path / 'local'}"]), show_progress=False)
    ray = run_pipeline(
        load_config(p, [f"output.path={tmp_path / 'ray'}", "executor.kind=ray"]), show_progress=False
    )
    assert local.exit_code == ray.exit_code == 0 and ray.counts == local.counts
    assert (
        shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
        and len(shard_files(tmp_path / "ray")) == 6
    )


def test_the_sample_world_downloads_to_its_ground_truth(tmp_path, world_server):
    world, server = world_server
    paths = world.write(tmp_path / "world", server.url)
    stage = {"stage": "download", "allow_private": [server.host_port], "image_size": 64, "backoff": 0.05}
    p = write_pipeline(
        tmp_path / "p.yaml",
        paths["input"],
        tmp_path / "out",
        [stage],
        shard_size=50,
        input={"url_col": "url", "caption_col": "caption"},
    )
    assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    truth = {r["uid"]: r for r in pq.read_table(paths["truth"]).to_pylist()}
    side = sidecars(tmp_path / "out").to_pylist()
    assert len(side) == len(truth) == 200
    for row in side:
        assert row["status"] == truth[row["uid"]]["expected_status"], (row["url"], row["error"])
    # exact duplicates share the sha256 of their original's bytes: what exact dedup will rely on
    sha = {r["uid"]: r["sha256"] for r in side}
    dups = [t for t in truth.values() if t["kind"] == "exact_duplicate"]
    assert dups and all(sha[t["uid"]] == sha[t["duplicate_of_uid"]] for t in dups)


def test_avif_and_heic_are_decoded_and_the_accept_header_lists_what_is_decoded(tmp_path):
    import pillow_heif

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    heic = io.BytesIO()
    pillow_heif.from_pillow(photo).save(heic, quality=60)
    with HostileServer() as srv:
        srv.routes["/a.avif"] = static(encode(photo, "AVIF", quality=60, speed=10), "image/avif")
        srv.routes["/b.heic"] = static(heic.getvalue(), "image/heic")
        rows = download(srv, ["/a.avif", "/b.heic"], robots_txt=False, tdmrep=False)
        only_jpeg = download(srv, ["/a.avif"], robots_txt=False, tdmrep=False, formats=["jpeg"])
    for path, mime in (("/a.avif", "image/avif"), ("/b.heic", "image/heic")):
        row = rows[path]
        assert (row["status"], row["mime"]) == ("ok", mime), row
        assert (row["orig_width"], row["orig_height"], row["width"], row["height"]) == (64, 48, 43, 32)
        assert Image.open(io.BytesIO(row["image"])).format == "JPEG"
    assert only_jpeg["/a.avif"]["status"] == "unsupported_format"
    accept = [h for h in srv.heads[0].split(b"\r\n") if h.startswith(b"Accept:")]
    assert accept == [
        b"Accept: image/jpeg,image/png,image/webp,image/gif,image/avif,image/heic,image/heif,*/*;q=0.1"
    ]
    assert b"Accept: image/jpeg,*/*;q=0.1" in srv.heads[-1]


def test_https_end_to_end_with_the_ca_bundle_of_the_config(tmp_path):
    ca, pem = make_ca(tmp_path)
    with HostileServer(tls=server_context(ca, "127.0.0.1")) as srv:
        srv.routes["/ok.jpg"] = static(encode(Image.new("RGB", (64, 48), "red"), "JPEG"), "image/jpeg")
        rows = download(srv, ["/ok.jpg"], ca_bundle=pem)
        untrusted = download(srv, ["/ok.jpg"])
    assert rows["/ok.jpg"]["status"] == "ok" and rows["/ok.jpg"]["width"] == 43
    assert untrusted["/ok.jpg"]["status"] == "tls_error"
    assert "robots.txt" in untrusted["/ok.jpg"]["error"]  # robots.txt, over TLS too, failed first


def test_the_network_options_are_checked_in_the_config():
    with pytest.raises(ValueError, match="is not an http://host:port proxy"):
        DownloadConfig(proxy="socks5://127.0.0.1:1080")
    assert DownloadConfig(proxy="proxy.internal:3128").proxy == "proxy.internal:3128"
    with pytest.raises(ValueError):
        DownloadConfig(max_per_host=0)


# --- shards overlap: the next shard's downloads take the sockets the current shard's tail leaves idle ---


class TimedServer(HostileServer):
    """Serves ``/slow*`` after ``slow`` seconds, every other path at once, the same small JPEG; keeps each
    request's path with the time it arrived and the time it was answered, and the most requests open at
    once."""

    def __init__(self, slow: float):
        super().__init__()
        self.body = encode(Image.new("RGB", (40, 30), "red"), "JPEG")
        self.slow, self.log, self.open, self.most_open = slow, [], 0, 0
        self.routes = _AnyPath(self.answer)

    def answer(self, c):
        path = c.head.split(b" ", 2)[1].decode()
        with self._lock:  # counted until just before the answer: the client cannot reuse its socket sooner
            arrived = time.monotonic()
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        if "/slow" in path:
            c.wait(self.slow)
        with self._lock:
            self.open -= 1
            self.log.append((path, arrived, time.monotonic()))
        c.respond("200 OK", self.body, {"Content-Type": "image/jpeg"})

    def times(self, path):
        (found,) = [(a, d) for p, a, d in self.log if p == path]
        return found


@pytest.fixture
def timed():
    with TimedServer(slow=2.0) as srv:
        yield srv


class _AnyPath(dict):
    """Routes that send every path to one handler."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def get(self, path, default=None):
        return self.handler


def overlap_pipeline(tmp_path, srv, paths, shard_size=4, **download):
    pq.write_table(
        pa.table({"url": [srv.url + p for p in paths], "caption": [f"picture {p}" for p in paths]}),
        tmp_path / "in.parquet",
    )
    stage = {
        "stage": "download",
        "allow_private": [srv.host_port],
        "image_size": 16,
        "robots_txt": False,
        "tdmrep": False,
        "concurrency": 8,
        **download,
    }
    return write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [stage],
        shard_size=shard_size,
        input={"url_col": "url", "caption_col": "caption"},
    )


def sequential(config_path, out):
    """Every shard through the phase on its own, one after another: the path without overlap."""
    from curate.core.pipeline import Pipeline

    pipeline = Pipeline(load_config(config_path, [f"output.path={out}"]))
    job = pipeline.job(0)
    for spec in pipeline.reader.plan(pipeline.config.shard_size):
        job.process(spec)
    return shard_files(out)


# shard 00000: one URL 2 s slow and three fast; 00001 and 00002: four fast each
SHARDED = (
    ["/slow/a", "/s0/b", "/s0/c", "/s0/d"] + [f"/s1/{i}" for i in range(4)] + [f"/s2/{i}" for i in range(4)]
)


@pytest.mark.parametrize("in_flight", [2, 4])
def test_the_next_shards_download_while_the_slowest_url_of_this_one_finishes(tmp_path, timed, in_flight):
    paths = SHARDED + [f"/s{k}/{i}" for k in (3, 4) for i in range(4)]  # five shards
    p = overlap_pipeline(tmp_path, timed, paths, shards_in_flight=in_flight)
    summary = run_pipeline(load_config(p), show_progress=False)
    assert summary.exit_code == 0 and summary.counts["status"] == {"ok": 20}
    _, slow_done = timed.times("/slow/a")
    # shards 00001 .. in_flight - 1 were fetched while shard 00000 waited on its slow URL: no socket idled
    ahead = [f"/s{k}/{i}" for k in range(1, in_flight) for i in range(4)]
    assert all(timed.times(path)[1] < slow_done - 1.0 for path in ahead), timed.log
    # and no further: the next shard starts only once 00000 is done (in_flight shards held at most)
    assert all(timed.times(f"/s{in_flight}/{i}")[0] >= slow_done for i in range(4)), timed.log
    assert shard_files(tmp_path / "out") == sequential(p, tmp_path / "sequential")


def test_under_ray_an_actor_takes_the_next_shards_while_the_slowest_urls_finish(tmp_path, timed, ray_cluster):
    # One actor (the stage asks for both CPUs of the test cluster), so the overlap is within one worker. It
    # holds three shards at once (shards_in_flight): 00002 downloads while both 00000 and 00001 wait on a slow
    # URL each; with two in flight it would have waited for one of them.
    paths = ["/slow/a", "/s0/b", "/s0/c", "/s0/d", "/slow/b", "/s1/b", "/s1/c", "/s1/d"]
    paths += [f"/s2/{i}" for i in range(4)]
    p = overlap_pipeline(tmp_path, timed, paths, resources={"cpus": 2}, shards_in_flight=3)
    summary = run_pipeline(load_config(p, ["executor.kind=ray"]), show_progress=False)
    assert summary.exit_code == 0 and summary.counts["status"] == {"ok": 12}
    first_slow_done = min(timed.times(path)[1] for path in ("/slow/a", "/slow/b"))
    assert all(timed.times(f"/s2/{i}")[1] < first_slow_done - 0.5 for i in range(4)), timed.log
    assert shard_files(tmp_path / "out") == sequential(p, tmp_path / "sequential")


def test_shards_share_one_socket_budget(tmp_path, timed):
    paths = ["/slow/a", "/slow/b"] + [f"/s0/{i}" for i in range(4)] + [f"/s1/{i}" for i in range(6)]
    p = overlap_pipeline(tmp_path, timed, paths, shard_size=6, concurrency=3)
    assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    assert timed.most_open <= 3  # shards at once, never more sockets than one worker's concurrency
    # while both slow URLs held two sockets, shard 00001 went through the third
    assert max(timed.times(x)[1] for x in paths[6:]) < min(timed.times(x)[1] for x in paths[:2])


def test_a_run_killed_while_shards_overlap_resumes_to_the_same_bytes(tmp_path, timed):
    import os
    import signal
    import subprocess

    from raycluster import CURATE

    p = overlap_pipeline(tmp_path, timed, SHARDED)
    expected = sequential(p, tmp_path / "sequential")
    timed.log.clear()
    driver = subprocess.Popen([*CURATE, "run", str(p), "-q"], start_new_session=True)
    try:
        end = time.monotonic() + 60
        # killed while shard 00000 waits on its slow URL and 00001's downloads are done: nothing written yet
        while not any(path.startswith("/s1/3") for path, _, _ in timed.log) and time.monotonic() < end:
            time.sleep(0.02)
        assert not list((tmp_path / "out" / "shards").glob("*_stats.json"))
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    summary = run_pipeline(load_config(p), show_progress=False)
    assert summary.exit_code == 0 and summary.shards_done == ["00000", "00001", "00002"]
    assert shard_files(tmp_path / "out") == expected
    assert not [f for f in (tmp_path / "out").rglob("*") if ".tmp" in f.name]


def test_small_shards_get_a_deeper_lookahead_and_an_explicit_one_is_kept():
    auto = Download(DownloadConfig())
    # about 4,000 rows in flight per worker, at least two shards and at most eight
    assert [auto.shards_in_flight(rows) for rows in (100, 500, 1000, 3000, 10_000)] == [8, 8, 4, 2, 2]
    assert Download(DownloadConfig(shards_in_flight=3)).shards_in_flight(10_000) == 3
    with pytest.raises(ValueError):
        DownloadConfig(shards_in_flight=0)
