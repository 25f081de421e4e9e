import collections
import contextlib
import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.request
import urllib.robotparser
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.core.schema import uid_for
from curate.demo.server import SAMPLE_JPEG_CAPTION, WorldServer, sample_jpeg
from curate.demo.world import COLOURS, NOISE_RATES, World, build_world


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises HTTPError(302) and the Location can be read


def get(url: str, method: str = "GET", timeout: float = 5, follow: bool = True):
    """(status, headers, body) of a request; HTTP errors are answers, not exceptions."""
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method=method), timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def decode(body: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


@pytest.fixture(scope="module")
def server():
    with WorldServer() as s:
        yield s


# --- the server --------------------------------------------------------------------------------------


def test_robots_txt_and_hits(server):
    before = server.hits["/robots.txt"]
    for _ in range(2):
        status, headers, body = get(server.url + "/robots.txt")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert body == b"User-agent: *\nDisallow: /private/\n"
    assert server.hits["/robots.txt"] == before + 2
    assert server.hits["/canary"] == 0
    get(server.url + "/canary?x=1")
    assert server.hits["/canary"] == 1  # counted by path, without the query
    assert server.url == f"http://{server.host_port}" and server.host_port.startswith("127.0.0.1:")


def test_custom_robots_txt():
    with WorldServer(robots_txt="User-agent: *\nDisallow: /\n") as s:
        assert get(s.url + "/robots.txt")[2] == b"User-agent: *\nDisallow: /\n"


def test_add_serves_bytes_with_headers(server):
    url = server.add("/files/a.png", b"\x89PNG fake", "image/png", {"X-Extra": "yes"})
    assert url == server.url + "/files/a.png"
    status, headers, body = get(url)
    assert (status, body) == (200, b"\x89PNG fake")
    assert headers["Content-Type"] == "image/png" and headers["Content-Length"] == "9"
    assert headers["X-Extra"] == "yes"
    status, headers, body = get(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "9")
    server.add("/files/with space.jpg", b"x", "image/jpeg")
    assert get(server.url + "/files/with%20space.jpg")[2] == b"x"
    with pytest.raises(ValueError):
        server.add("no-slash.jpg", b"", "image/jpeg")


@pytest.mark.parametrize("code", [403, 404, 500, 503, 429, 200])
def test_status(server, code):
    status, headers, body = get(server.url + f"/status/{code}")
    assert status == code and headers["Content-Type"].startswith("text/plain")
    assert body.startswith(str(code).encode())
    assert headers.get("Retry-After") == ("0" if code == 429 else None)


def test_unknown_paths_are_404(server):
    for path in (
        "/nothing",
        "/status/abc",
        "/status/999",
        "/redirect/x/y",
        "/flaky/k/x",
        "/slow/abc",
        "/optout/",
    ):
        assert get(server.url + path)[0] == 404, path


def test_flaky_fails_n_times_per_key_then_serves_a_jpeg(server):
    assert [get(server.url + "/flaky/a/2")[0] for _ in range(4)] == [500, 500, 200, 200]
    assert get(server.url + "/flaky/b/1")[0] == 500  # another key, its own count
    _, headers, body = get(server.url + "/flaky/a/2")
    assert headers["Content-Type"] == "image/jpeg" and decode(body).size == (200, 160)


def test_flaky_counts_are_thread_safe(server):
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: get(server.url + "/flaky/many/10")[0], range(24)))
    assert collections.Counter(codes) == {500: 10, 200: 14}
    assert server.hits["/flaky/many/10"] == 24


def test_slow_waits_before_the_headers(server):
    start = time.monotonic()
    status, _, body = get(server.url + "/slow/0.3")
    assert 0.3 <= time.monotonic() - start < 2
    assert status == 200 and body == sample_jpeg()
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(server.url + "/slow/3", timeout=0.2)


def test_redirect_chain(server):
    status, headers, _ = get(server.url + "/redirect/3/status/404", follow=False)
    assert status == 302 and headers["Location"] == "/redirect/2/status/404"
    assert get(server.url + "/redirect/0/status/404", follow=False)[1]["Location"] == "/status/404"
    assert get(server.url + "/redirect/1/a?b=c", follow=False)[1]["Location"] == "/redirect/0/a?b=c"
    before = server.hits["/status/404"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/redirect/3/status/404", timeout=5)
    assert e.value.code == 404 and e.value.url.endswith("/status/404")
    assert server.hits["/status/404"] == before + 1
    assert all(server.hits[f"/redirect/{n}/status/404"] >= 1 for n in range(4))
    with urllib.request.urlopen(server.url + "/redirect/2/private/x.jpg", timeout=5) as r:
        assert r.url.endswith("/private/x.jpg") and r.read() == sample_jpeg()


def test_loop_and_redirect_to(server):
    assert get(server.url + "/loop", follow=False)[1]["Location"] == "/loop"
    with pytest.raises(urllib.error.HTTPError) as e:  # urllib gives up on the loop
        urllib.request.urlopen(server.url + "/loop", timeout=5)
    assert e.value.code == 302
    target = "http://127.0.0.1:1/far away?x=1&y=2"
    status, headers, _ = get(server.url + "/redirect-to?url=" + quote(target, safe=""), follow=False)
    assert status == 302 and headers["Location"] == target
    assert get(server.url + "/redirect-to", follow=False)[0] == 400


def test_private_is_served_but_disallowed(server):
    status, headers, body = get(server.url + "/private/secret/1.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body == sample_jpeg()
    robots = urllib.robotparser.RobotFileParser()
    robots.parse(get(server.url + "/robots.txt")[2].decode().splitlines())
    assert not robots.can_fetch("curate", server.url + "/private/secret/1.jpg")
    assert robots.can_fetch("curate", server.url + "/optout/noai/1.jpg")


@pytest.mark.parametrize("tag", ["noai", "noimageai", "noindex", "noimageindex"])
def test_optout_sets_x_robots_tag(server, tag):
    status, headers, body = get(server.url + f"/optout/{tag}/img/1.jpg")
    assert status == 200 and headers["X-Robots-Tag"] == tag and body == sample_jpeg()


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection(server.host_port, timeout=5)
    try:
        for path in ("/robots.txt", "/status/404", "/private/a.jpg", "/robots.txt"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.version == 11 and not response.will_close
    finally:
        conn.close()


def test_endless_streams_more_than_a_mebibyte(server):
    status, headers, _ = get(server.url + "/endless", method="HEAD")
    assert status == 200 and "Content-Length" not in headers
    with urllib.request.urlopen(server.url + "/endless", timeout=5) as r:
        assert r.headers["Content-Type"] == "image/jpeg" and r.headers["Content-Length"] is None
        received, deadline = 0, time.monotonic() + 3
        while received <= 1 << 20 and time.monotonic() < deadline:
            received += len(r.read(64 << 10))
    assert received > 1 << 20


def test_trickle_sends_a_byte_a_second(server):
    with urllib.request.urlopen(server.url + "/trickle", timeout=5) as r:
        assert r.headers["Content-Length"] == "1000" and r.headers["Content-Type"] == "image/jpeg"
        assert r.read(1) == sample_jpeg()[:1]
        start = time.monotonic()
        assert len(r.read(2)) == 2
        assert 1.5 < time.monotonic() - start < 3.5


def test_stop_is_prompt_while_streams_are_open():
    s = WorldServer().start()
    endless = urllib.request.urlopen(s.url + "/endless", timeout=5)
    endless.read(1 << 20)
    trickle = urllib.request.urlopen(s.url + "/trickle", timeout=5)
    trickle.read(1)
    idle = http.client.HTTPConnection(s.host_port, timeout=5)  # a keep-alive client that says nothing more
    idle.request("GET", "/robots.txt")
    idle.getresponse().read()

    def fetch_slow():
        with contextlib.suppress(OSError, http.client.HTTPException):  # stop() cuts the connection
            get(s.url + "/slow/30")

    slow = threading.Thread(target=fetch_slow, daemon=True)
    slow.start()
    time.sleep(0.2)  # the slow request is in its handler
    port = int(s.host_port.rsplit(":", 1)[1])
    start = time.monotonic()
    s.stop()
    assert time.monotonic() - start < 2
    with pytest.raises(OSError):  # the listening socket is closed
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # The open streams end (EOF or a reset) instead of going on.
    for stream in (endless, trickle):
        deadline = time.monotonic() + 2
        try:
            while stream.read(1 << 20) and time.monotonic() < deadline:
                pass
        except (OSError, http.client.HTTPException):
            pass
        assert time.monotonic() < deadline
        stream.close()
    slow.join(2)
    assert not slow.is_alive()
    idle.close()
    s.stop()  # idempotent


# --- the world ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(200, seed=1)


def kinds_of(world: World) -> collections.Counter:
    return collections.Counter(t["kind"] for t in world.truth)


def test_build_world_is_deterministic(world):
    again = build_world(200, seed=1)
    assert again.files == world.files and again.rows == world.rows and again.truth == world.truth
    other = build_world(30, seed=2)
    assert [r["caption"] for r in other.rows] != [r["caption"] for r in world.rows[:30]]


def test_kinds_come_at_the_stated_rates(world):
    n = len(world.rows)
    assert n == len(world.truth) == 200
    counts = kinds_of(world)
    for kind, rate in NOISE_RATES.items():
        assert 0.5 * rate * n <= counts[kind] <= 1.5 * rate * n, (kind, counts[kind])
    assert 1 <= counts["slow"] <= 5
    assert counts["clean"] >= 0.6 * n
    assert sum(counts.values()) == n
    assert all(
        t["path"] == r["path"] and t["caption"] == r["caption"]
        for t, r in zip(world.truth, world.rows, strict=True)
    )
    assert len({r["path"] for r in world.rows}) == n  # every URL unique, even the built-in routes


def test_expected_statuses(world):
    expected = {
        "truncated": "decode_error",
        "html_as_jpeg": "not_an_image",
        "http_404": "http_404",
        "http_500": "http_500",
    }
    for t in world.truth:
        assert t["expected_status"] == expected.get(t["kind"], "ok"), t
        if t["kind"] in ("http_404", "http_500", "slow"):
            route = {"http_404": "/status/404", "http_500": "/status/500", "slow": "/slow/0.5"}[t["kind"]]
            assert t["path"].split("?")[0] == route and t["path"] not in world.files


def test_clean_images_decode_and_match_their_captions(world):
    clean = [t for t in world.truth if t["kind"] == "clean" and t["path"].startswith("/img/")]
    formats = collections.Counter()
    for t in clean:
        body, content_type = world.files[t["path"]]
        img = decode(body)
        formats[img.format] += 1
        assert content_type == Image.MIME[img.format]
        w, h = img.size
        assert 160 <= w <= 640 and 160 <= h <= 640 and max(w, h) / min(w, h) <= 2.01, (t["path"], img.size)
        assert t["caption"] == t["true_caption"]
        # The background colour named in the caption is the colour of the corners.
        background = t["caption"].rsplit(" background", 1)[0].split()[-1]
        pixels = np.asarray(img.convert("RGB"), np.int16)
        corner = np.median(pixels[:4, :4].reshape(-1, 3), axis=0)
        assert np.abs(corner - COLOURS[background]).max() < 40, (t["path"], background, corner)
        # Every shape colour named is there, on a fair share of the pixels.
        for colour in {c for c in COLOURS if f" {c} " in " " + t["caption"].rsplit(" on ", 1)[0] + " "}:
            near = np.abs(pixels[::2, ::2] - COLOURS[colour]).max(axis=2) < 30
            assert near.mean() > 0.002, (t["path"], colour)
    assert formats["JPEG"] > formats["PNG"] > 0
    assert len(clean) >= 100


def test_broken_files_do_not_decode(world):
    for t in world.truth:
        if t["kind"] in ("truncated", "html_as_jpeg"):
            body, content_type = world.files[t["path"]]
            assert content_type == "image/jpeg"
            with pytest.raises(OSError):
                decode(body)
            if t["kind"] == "html_as_jpeg":
                assert body.lower().startswith((b"<!doctype html", b"<html")) and t["true_caption"] is None
            else:
                assert body.startswith(b"\xff\xd8\xff")


def test_duplicates_and_mismatched_captions(world):
    order = {t["path"]: i for i, t in enumerate(world.truth)}
    by_path = {t["path"]: t for t in world.truth}
    seen = set()
    for i, t in enumerate(world.truth):
        kind = t["kind"]
        if kind == "exact_duplicate" or kind.startswith("near_duplicate:"):
            original = by_path[t["duplicate_of"]]
            assert order[original["path"]] < i and original["kind"] == "clean"
            assert t["path"] != original["path"] and t["caption"] == original["caption"]
            body, original_body = world.files[t["path"]][0], world.files[original["path"]][0]
            if kind == "exact_duplicate":
                assert body == original_body
            else:
                seen.add(kind)
                assert body != original_body
                a, b = decode(body), decode(original_body)
                if kind == "near_duplicate:crop":
                    assert a.width <= b.width and a.height <= b.height and a.size != b.size
                elif kind == "near_duplicate:resize":
                    assert a.size != b.size and abs(a.width / a.height - b.width / b.height) < 0.02
                else:
                    assert a.size == b.size
                assert min(a.size) >= 150 and max(a.size) <= 640  # still passes a min-size filter
        else:
            assert t["duplicate_of"] is None
        if kind == "mismatched_caption":
            assert t["caption"] != t["true_caption"]
            assert t["caption"] in {u["true_caption"] for u in world.truth if u["kind"] == "clean"}
        if kind == "watermark":
            assert decode(world.files[t["path"]][0]).size[0] >= 160
        if kind == "slow":
            assert t["caption"] == SAMPLE_JPEG_CAPTION
    assert len(seen) == 5


def test_without_photos_there_are_no_photo_rows():
    assert not any(r["path"].startswith("/photo/") for r in build_world(60, seed=3, photos=False).rows)


def test_served_world_returns_the_right_bytes(world, tmp_path):
    with WorldServer() as s:
        world.serve(s)
        table = world.input_table(s.url)
        assert table.column_names == ["url", "caption"] and table.num_rows == len(world.rows)
        truth = world.truth_table(s.url)
        assert truth["uid"].to_pylist() == [
            uid_for(u, c) for u, c in zip(table["url"].to_pylist(), table["caption"].to_pylist(), strict=True)
        ]
        checked = collections.Counter()
        for row, url, t in zip(world.rows, table["url"].to_pylist(), world.truth, strict=True):
            kind = t["kind"]
            if (kind == "slow" and checked[kind]) or (kind == "clean" and checked[kind] >= 20):
                continue
            checked[kind] += 1
            status, headers, body = get(url)
            if kind == "http_404" or kind == "http_500":
                assert status == int(kind[-3:])
                continue
            assert status == 200
            expected = sample_jpeg() if kind == "slow" else world.files[row["path"]][0]
            assert body == expected and headers["Content-Type"] == (
                "image/jpeg" if kind == "slow" else world.files[row["path"]][1]
            )
        assert set(checked) == set(kinds_of(world))
        paths = world.write(tmp_path / "w", s.url)
    assert pq.read_table(paths["input"]).equals(table)
    written = pq.read_table(paths["truth"])
    assert written.equals(truth)
    assert {
        "uid",
        "url",
        "path",
        "caption",
        "kind",
        "true_caption",
        "duplicate_of",
        "expected_status",
    } <= set(written.column_names)
