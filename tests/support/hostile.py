"""A corpus of hostile inputs and the raw HTTP server that serves them, for tests and benchmarks.

:func:`corpus` registers each kind on a :class:`HostileServer` and returns its rows: ``(name, url, caption,
expected status, expected drop reason)``, for a download stage allowed to reach the server's port and a
port nobody listens on, with ``basic_filter`` (``required_columns: [caption]``, ``min_caption_length: 1``)
before it and ``max_bytes`` below 50 MB. :func:`write_inputs` writes them as a CSV (as bytes, so a caption can
be invalid UTF-8) and a parquet (for the nulls).

The server speaks raw HTTP from its own socket handlers so that it can misbehave in ways no HTTP library
will: a response a byte a second from the status line on, headers that never end, a Content-Length that
lies, bytes that are not HTTP at all. It listens on 127.0.0.1 (or another loopback address given as
``host``), speaks TLS with ``tls`` (a server context, e.g. from trustme), and records every request head; every handler ends within ``cap``
seconds (default 30) whatever the client does, and the endless body within ``endless_bytes`` if set. Three redirects point off the machine (cloud metadata, a
private address, ``file:``): a client without an SSRF guard would follow them, so peers that have none must
be given :data:`OFF_MACHINE` removed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "CAPTION_CASES",
    "DEADLINE",
    "OFF_MACHINE",
    "HostileServer",
    "closed_port",
    "corpus",
    "first_stages",
    "write_inputs",
]

HANDLER_CAP = 30.0  # no handler of the server runs longer than this, whatever the client does
BIG = 50 << 20
OFF_MACHINE = ("redirect_metadata", "redirect_private", "redirect_file")
DEADLINE = 3.0  # total_timeout of the download stage of first_stages()


def first_stages(port: int, closed: int, **download) -> list[dict]:
    """The stages the corpus's expected statuses are for: ``basic_filter`` and ``download`` (a 3 s deadline
    per URL, one retry, 64 px), allowed to reach the server's ``port`` and the ``closed`` one; ``download``
    overrides or adds download settings."""
    return [
        {"stage": "basic_filter", "required_columns": ["caption"], "min_caption_length": 1},
        {
            "stage": "download",
            "connect_timeout": 2,
            "read_timeout": 2,
            "total_timeout": DEADLINE,
            "retries": 1,
            "image_size": 64,
            "resize_mode": "center_crop",
            "allow_private": [f"127.0.0.1:{port}", f"127.0.0.1:{closed}"],
            **download,
        },
    ]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) claims width x height: a decompression bomb's header."""
    import zlib

    data = encode(Image.new("RGB", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


# --- the server --------------------------------------------------------------------------------------


class Conn:
    """One accepted connection, as a route handler sees it (``head``: the request line and headers)."""

    def __init__(self, sock: socket.socket, server: HostileServer, head: bytes = b""):
        self.sock, self.server, self.head = sock, server, head

    def send(self, data: bytes) -> bool:
        """Send it all; False once the client has gone (or the server stops)."""
        if self.server.stopping.is_set():
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def respond(self, status: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        head = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in head.items())]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False at once when the client closes its side (or the server stops)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not self.server.stopping.is_set():
            self.sock.settimeout(min(left, 0.05))
            try:
                if not self.sock.recv(4096):
                    return False
            except TimeoutError:
                continue
            except OSError:
                return False
        return not self.server.stopping.is_set()


class HostileServer:
    """HTTP/1.1 on 127.0.0.1: one thread per connection, one request per connection, routes by path.

    ``spans[path]`` records, per request, the seconds from the request's arrival to the moment the server
    was done with the connection: for the routes that stall, that is when the client let go. ``heads``
    keeps each request's head (request line and headers), in arrival order.
    """

    def __init__(
        self,
        cap: float = HANDLER_CAP,
        endless_bytes: int | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.cap, self.endless_bytes, self.tls = cap, endless_bytes, tls
        self.routes: dict[str, Callable[[Conn], None]] = {}
        self.spans: dict[str, list[float]] = {}
        self.heads: list[bytes] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0), backlog=128)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.host_port = f"{host}:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host_port}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HostileServer:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(2)
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        start = time.monotonic()
        path = None
        try:
            sock.settimeout(5)
            if self.tls is not None:  # a client that rejects the certificate ends here
                sock = self.tls.wrap_socket(sock, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                request += chunk
            head = request.split(b"\r\n\r\n", 1)[0]
            with self._lock:
                self.heads.append(head)
            path = request.split(b" ", 2)[1].decode("latin-1").split("?")[0]
            handler = self.routes.get(path)
            conn = Conn(sock, self, head)
            if handler is None:
                conn.respond("404 Not Found", b"not found", {"Content-Type": "text/plain"})
            else:
                handler(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            if path is not None:
                with self._lock:
                    self.spans.setdefault(path, []).append(time.monotonic() - start)


# --- the routes --------------------------------------------------------------------------------------


def static(body: bytes, content_type: str, **headers: str) -> Callable[[Conn], None]:
    return lambda c: c.respond("200 OK", body, {"Content-Type": content_type, **headers})


def redirect(location: str) -> Callable[[Conn], None]:
    return lambda c: c.respond("302 Found", b"", {"Location": location})


def status(code: str) -> Callable[[Conn], None]:
    return lambda c: c.respond(code, b"nope", {"Content-Type": "text/plain"})


def big(with_length: bool) -> Callable[[Conn], None]:
    """50 MB of JPEG-looking bytes, declared up front or chunked without a length."""

    def handle(c: Conn) -> None:
        block = b"\xff\xd8\xff" + bytes(CHUNK - 3)
        if with_length:
            c.send(f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {BIG}\r\n\r\n".encode())
            for _ in range(BIG // CHUNK):
                if not c.send(block):
                    return
        else:
            c.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(BIG // CHUNK):
                if not c.send(b"%x\r\n%s\r\n" % (CHUNK, block)):
                    return
            c.send(b"0\r\n\r\n")

    return handle


CHUNK = 64 << 10


def endless(c: Conn) -> None:
    """A 200 whose body never ends (until the client goes, or the caps)."""
    c.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n\xff\xd8\xff")
    end = time.monotonic() + c.server.cap
    left = c.server.endless_bytes or float("inf")
    while time.monotonic() < end and left > 0 and c.send(bytes(CHUNK)):
        left -= CHUNK


def byte_a_second(body: bytes) -> Callable[[Conn], None]:
    """The whole response, status line included, one byte a second."""

    def handle(c: Conn) -> None:
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        end = time.monotonic() + c.server.cap
        for i in range(len(response)):
            if time.monotonic() > end or not c.send(response[i : i + 1]) or not c.wait(1):
                return

    return handle


def endless_headers(c: Conn) -> None:
    """A status line, then a new header line every 0.2 s, never the blank line that ends them."""
    c.send(b"HTTP/1.1 200 OK\r\n")
    end = time.monotonic() + c.server.cap
    i = 0
    while time.monotonic() < end and c.send(b"X-Pad-%d: %s\r\n" % (i, b"a" * 20)) and c.wait(0.2):
        i += 1


def silent(c: Conn) -> None:
    """Reads the request, never answers."""
    c.wait(c.server.cap)


def lying_length(body: bytes) -> Callable[[Conn], None]:
    """Claims ten times the bytes it sends, then closes."""

    def handle(c: Conn) -> None:
        c.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (10 * len(body))
        )
        c.send(body)

    return handle


def garbage(c: Conn) -> None:
    c.send(b"\x00\x01SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")


def many_headers(c: Conn) -> None:
    headers = "".join(f"X-H{i}: {i}\r\n" for i in range(500))
    c.send(f"HTTP/1.1 200 OK\r\n{headers}Content-Length: 0\r\n\r\n".encode())


def long_header(c: Conn) -> None:
    c.send(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n")


# --- the payloads ------------------------------------------------------------------------------------


def noise(seed: int, size=(48, 40), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def gif_claiming(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen claims width x height."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encode(noise(99, (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def payloads() -> dict[str, bytes]:
    photo = encode(noise(1, (320, 240)), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = noise(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [noise(7), noise(8)]
    webp_frames = [noise(11), noise(12)]
    sixteen = Image.fromarray(np.random.default_rng(4).integers(0, 65535, (40, 48)).astype(np.uint16))
    return {
        "photo": photo,
        "cmyk": encode(noise(2, mode="CMYK"), "JPEG"),
        "sixteen": encode(sixteen, "PNG"),
        "palette": encode(pal, "PNG", transparency=0),
        "rotated": encode(noise(6, (60, 20)), "JPEG", exif=exif),
        "anim_gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "anim_webp": encode(
            webp_frames[0], "WEBP", save_all=True, append_images=webp_frames[1:], duration=50
        ),
        "mislabelled": encode(noise(9), "PNG"),
        "tiff": encode(noise(10), "TIFF"),
    }


# --- the corpus: (name, url path or full url, caption, expected status, expected drop reason) ------------


CAPTION_CASES = ("non_utf8", "ten_mb", "nul_bytes", "controls", "null_caption", "empty_caption")


def corpus(
    srv: HostileServer, canary_port: int, closed: int
) -> list[tuple[str, str | None, str | None, str, str | None]]:
    p = payloads()
    routes: dict[str, tuple[Callable[[Conn], None], str, str | None]] = {
        # name: (handler, expected status, expected drop reason)
        "png_bomb": (static(png_claiming(100_000, 100_000), "image/png"), "too_many_pixels", None),
        "gif_bomb": (static(gif_claiming(65_535, 65_535), "image/gif"), "too_many_pixels", None),
        "jpeg_bomb": (static(jpeg_claiming(65_500, 65_500), "image/jpeg"), "too_many_pixels", None),
        "truncated": (static(p["photo"][: len(p["photo"]) // 2], "image/jpeg"), "decode_error", None),
        "zero_bytes": (static(b"", "image/jpeg"), "not_an_image", None),
        "html_as_jpeg": (
            static(b"<!DOCTYPE html><html><body>gone</body></html>", "image/jpeg"),
            "not_an_image",
            None,
        ),
        "svg": (
            static(
                b'<svg xmlns="http://www.w3.org/2000/svg" width="9999999" height="9999999"/>', "image/svg+xml"
            ),
            "not_an_image",
            None,
        ),
        "gzip_bomb": (
            static(gzip.compress(bytes(100 << 20)), "image/jpeg", **{"Content-Encoding": "gzip"}),
            "not_an_image",
            None,
        ),
        "wrong_content_type": (static(p["mislabelled"], "text/html"), "ok", None),
        "cmyk": (static(p["cmyk"], "image/jpeg"), "ok", None),
        "sixteen_bit": (static(p["sixteen"], "image/png"), "ok", None),
        "palette_transparency": (static(p["palette"], "image/png"), "ok", None),
        "exif_rotated": (static(p["rotated"], "image/jpeg"), "ok", None),
        "animated_gif": (static(p["anim_gif"], "image/gif"), "ok", None),
        "animated_webp": (static(p["anim_webp"], "image/webp"), "ok", None),
        "tiff": (static(p["tiff"], "image/tiff"), "unsupported_format", None),
        "big_50mb": (big(with_length=True), "too_large", None),
        "big_50mb_chunked": (big(with_length=False), "too_large", None),
        "endless_body": (endless, "too_large", None),
        "byte_a_second": (byte_a_second(p["photo"]), "timeout", None),
        "endless_headers": (endless_headers, "timeout", None),
        "never_answers": (silent, "timeout", None),
        "lying_length": (lying_length(p["photo"]), "connection_error", None),
        "not_http": (garbage, "connection_error", None),
        "500_headers": (many_headers, "connection_error", None),
        "200k_header": (long_header, "connection_error", None),
        "http_404": (status("404 Not Found"), "http_404", None),
        "http_503": (status("503 Service Unavailable"), "http_503", None),
        "redirect_loop": (redirect("/redirect_loop"), "too_many_redirects", None),
        "redirect_metadata": (redirect("http://169.254.169.254/latest/meta-data/"), "blocked_address", None),
        "redirect_private": (redirect("http://10.0.0.1/a.jpg"), "blocked_address", None),
        "redirect_loopback": (redirect(f"http://127.0.0.1:{canary_port}/a.jpg"), "blocked_address", None),
        "redirect_decimal_ip": (redirect(f"http://2130706433:{canary_port}/a.jpg"), "blocked_address", None),
        "redirect_ipv6_mapped": (
            redirect(f"http://[::ffff:127.0.0.1]:{canary_port}/"),
            "blocked_address",
            None,
        ),
        "redirect_file": (redirect("file:///etc/passwd"), "blocked_address", None),
    }
    rows = []
    for name, (handler, want, reason) in routes.items():
        srv.routes[f"/{name}"] = handler
        rows.append((name, f"/{name}", f"hostile case {name.replace('_', ' ')}", want, reason))
    # Caption and field cases, each with an image of its own (distinct, so that dedup keeps them all).
    for i, name in enumerate(CAPTION_CASES):
        srv.routes[f"/img_{name}"] = static(encode(noise(100 + i), "JPEG"), "image/jpeg")
    rows += [
        ("non_utf8", "/img_non_utf8", None, "ok", None),  # its caption bytes are written raw into the CSV
        ("ten_mb", "/img_ten_mb", "word " * 2_000_000, "ok", None),
        ("nul_bytes", "/img_nul_bytes", "a caption\x00 with NUL\x00 bytes", "ok", None),
        ("controls", "/img_controls", "bell\x07 escape\x1b[31m and\x85 C1 controls", "ok", None),
        ("null_caption", "/img_null_caption", None, "ok", "missing:caption"),
        ("empty_caption", "/img_empty_caption", "", "ok", "caption_length<1"),
        ("null_url", None, "a row without a url", "invalid_url", None),
        ("empty_url", "", "a row with an empty url", "invalid_url", None),
        ("javascript_url", "javascript:alert(1)", "a script for a url", "invalid_url", None),
        ("bad_port", "http://127.0.0.1:99999/x.jpg", "a port out of range", "invalid_url", None),
        (
            "closed_port",
            f"http://127.0.0.1:{closed}/x.jpg",
            "nobody listens",
            "connection_error",
            None,
        ),
    ]
    return [(n, srv.url + u if u and u.startswith("/") else u, c, s, r) for n, u, c, s, r in rows]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NON_UTF8 = b"caf\xe9 cr\xe8me br\xfbl\xe9e \xff\xfe with bytes"


def write_inputs(folder: Path, rows) -> None:
    """The rows with a string caption and url go to a CSV, written as bytes (so a caption can be invalid
    UTF-8); those with a null go to a parquet, where null is not an empty string."""
    folder.mkdir()
    lines = [b"URL,TEXT"]
    nulls = []
    for name, url, caption, _, _ in rows:
        if name == "non_utf8":
            lines.append(url.encode() + b',"' + NON_UTF8 + b'"')
        elif url is None or caption is None:
            nulls.append((url, caption))
        else:
            lines.append(url.encode() + b',"' + caption.replace('"', '""').encode() + b'"')
    (folder / "a.csv").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(
        pa.table(
            {
                "URL": pa.array([u for u, _ in nulls], pa.string()),
                "TEXT": pa.array([c for _, c in nulls], pa.string()),
            }
        ),
        folder / "b.parquet",
    )
