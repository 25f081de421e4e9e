"""A local HTTP server for the sample world: static files, plus routes that misbehave on purpose.

Download tests and demos run against it in process, with no network: every failure mode a crawler meets
(error codes, flaky hosts, slow and endless bodies, redirect chains and loops, robots.txt, X-Robots-Tag
opt-outs) is one URL away and reproducible.

Routes (GET and HEAD):

====================================  =====================================================================
``/robots.txt``                       200 text/plain, the ``robots_txt`` given (disallows /private/)
paths registered with ``add()``       200 with the registered body, Content-Type and headers
``/status/<code>``                    that status (200 to 599), a short text/plain body;
                                      429 adds ``Retry-After: 0``
``/flaky/<key>/<n>``                  500 for the first ``n`` requests with that key, then 200 JPEG
``/slow/<seconds>``                   waits, then 200 JPEG
``/endless``                          200 image/jpeg with no Content-Length, 64 KiB chunks until the
                                      client disconnects or the server stops
``/trickle``                          200 image/jpeg, ``Content-Length: 1000``, one byte a second
``/redirect/<n>/<rest>``              302 to ``/redirect/<n-1>/<rest>``; at n=0 to ``/<rest>``
``/loop``                             302 to ``/loop``
``/redirect-to?url=<url>``            302 to that URL (400 without one)
``/private/<anything>``               200 JPEG (disallowed by the default robots.txt)
``/optout/<tag>/<anything>``          200 JPEG with ``X-Robots-Tag: <tag>``
anything else                         404
====================================  =====================================================================

The JPEG of the built-in routes is :func:`sample_jpeg`, a 200x160 picture of
:data:`SAMPLE_JPEG_CAPTION`. Query strings are ignored for routing and for ``hits``, except by
``/redirect-to`` (which reads ``url``) and ``/redirect/`` (which passes the query on).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["SAMPLE_JPEG_CAPTION", "WorldServer", "sample_jpeg"]

logger = logging.getLogger(__name__)

SAMPLE_JPEG_CAPTION = "a red circle on a blue background"
DEFAULT_ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
CHUNK_BYTES = 64 * 1024
TRICKLE_BYTES = 1000
STOP_TIMEOUT = 2.0  # seconds stop() waits for the serving and handler threads, in all


@functools.cache
def sample_jpeg() -> bytes:
    """The JPEG of the built-in routes: a red circle on a blue background, 200x160."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 160), (40, 80, 220))
    ImageDraw.Draw(img).ellipse((60, 40, 140, 120), fill=(220, 40, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class WorldServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 and a free port, started and stopped in process.

    ``hits`` counts requests per path (without the query string); ``add()`` serves bytes at a path.
    ``stop()`` returns within about two seconds even while bodies are streaming or clients sit idle on
    keep-alive connections: it cuts every open connection.
    """

    def __init__(self, robots_txt: str = DEFAULT_ROBOTS_TXT):
        self.robots_txt = robots_txt
        self.hits: collections.Counter[str] = collections.Counter()
        self._files: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self._flaky: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> WorldServer:
        """Bind a free port and serve in a background thread; returns self."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"WorldServer:{self._httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and every open connection, join the threads. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        self._stopping.set()  # streaming and sleeping handlers check it
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        deadline = time.monotonic() + STOP_TIMEOUT
        thread.join(max(0.0, deadline - time.monotonic()))
        for handler in httpd.handler_threads():
            handler.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- addresses and content -----------------------------------------------------------------------

    @property
    def host_port(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the WorldServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def add(self, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> str:
        """Serve ``body`` at ``path`` (from "/", no query) with that Content-Type and extra headers.

        Returns the full URL (the server must be started for that).
        """
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if "?" in path or "#" in path:
            raise ValueError(f"path must have no query or fragment: {path!r}")
        self._files[path] = (bytes(body), content_type, dict(headers or {}))
        return self.url + path

    # --- used by the handler -------------------------------------------------------------------------

    def _hit(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def _flaky_count(self, key: str) -> int:
        """How many requests this key has had, this one included."""
        with self._lock:
            self._flaky[key] += 1
            return self._flaky[key]


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections, so stop() can cut them."""

    daemon_threads = True
    # stop() bounds its own wait: the stock join-everything would hang on an idle keep-alive client.
    block_on_close = False
    request_queue_size = 128  # a downloader opens dozens of connections at once

    def __init__(self, world: WorldServer):
        self.world = world
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handler_threads: list[threading.Thread] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._lock:
            self._handler_threads = [t for t in self._handler_threads if t.is_alive()]
            self._handler_threads.append(thread)
            self._connections.add(request)
        thread.start()

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut every open connection down: blocked reads and writes of handler threads return."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)

    def handler_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._handler_threads)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or stop() cut the connection
        logger.exception("WorldServer: error while handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every non-streaming reply has a Content-Length
    server_version = "curate-world/1"
    timeout = 30  # seconds an idle keep-alive connection is held
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:
        pass  # tests and demos stay quiet

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    # --- routing -------------------------------------------------------------------------------------

    def _serve(self, send_body: bool) -> None:
        world = self.server.world
        parts = urlsplit(self.path)
        path = parts.path
        world._hit(path)
        try:
            self._route(world, path, parts.query, send_body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away mid-reply, or stop() cut it

    def _route(self, world: WorldServer, path: str, query: str, send_body: bool) -> None:
        static = world._files.get(path) or world._files.get(unquote(path))
        if static is not None:
            body, content_type, headers = static
            return self._reply(200, body, content_type, headers, send_body=send_body)
        if path == "/robots.txt":
            return self._reply(
                200, world.robots_txt.encode(), "text/plain; charset=utf-8", send_body=send_body
            )
        if path == "/endless":
            return self._endless(world, send_body)
        if path == "/trickle":
            return self._trickle(world, send_body)
        if path == "/loop":
            return self._redirect("/loop", send_body)
        if path == "/redirect-to":
            urls = parse_qs(query).get("url")
            if not urls:
                return self._text(400, "missing ?url=\n", send_body)
            return self._redirect(urls[0], send_body)

        head, _, rest = path[1:].partition("/")
        if head == "status" and rest.isdigit() and 200 <= int(rest) <= 599:
            return self._status(int(rest), send_body)
        if head == "flaky":
            key, _, n = rest.rpartition("/")
            if key and n.isdigit():
                if world._flaky_count(key) <= int(n):
                    return self._text(500, f"flaky {key}: failing\n", send_body)
                return self._jpeg(send_body)
        if head == "slow":
            try:
                seconds = float(rest)
            except ValueError:
                seconds = -1.0
            if seconds >= 0:
                if world._stopping.wait(seconds):
                    self.close_connection = True
                    return None
                return self._jpeg(send_body)
        if head == "redirect":
            n, sep, target = rest.partition("/")
            if n.isdigit() and sep:
                location = f"/redirect/{int(n) - 1}/{target}" if int(n) > 0 else f"/{target}"
                return self._redirect(location + (f"?{query}" if query else ""), send_body)
        if head == "private" and path.startswith("/private/"):
            return self._jpeg(send_body)
        if head == "optout":
            tag, sep, _ = rest.partition("/")
            if tag and sep:
                return self._jpeg(send_body, {"X-Robots-Tag": unquote(tag)})
        return self._text(404, f"no such path: {path}\n", send_body)

    # --- replies -------------------------------------------------------------------------------------

    def _reply(
        self,
        code: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        send_body: bool,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _text(self, code: int, text: str, send_body: bool, headers: dict[str, str] | None = None) -> None:
        self._reply(code, text.encode(), "text/plain; charset=utf-8", headers, send_body=send_body)

    def _jpeg(self, send_body: bool, headers: dict[str, str] | None = None) -> None:
        self._reply(200, sample_jpeg(), "image/jpeg", headers, send_body=send_body)

    def _status(self, code: int, send_body: bool) -> None:
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Unknown"
        headers = {"Retry-After": "0"} if code == 429 else None
        if code in (204, 304):  # no body allowed
            return self._reply(code, b"", "text/plain; charset=utf-8", headers, send_body=False)
        return self._text(code, f"{code} {phrase}\n", send_body, headers)

    def _redirect(self, location: str, send_body: bool) -> None:
        self._text(302, f"redirecting to {location}\n", send_body, {"Location": location})

    def _endless(self, world: WorldServer, send_body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        if not send_body:
            return
        chunk = (sample_jpeg()[:4] + bytes(CHUNK_BYTES))[:CHUNK_BYTES]  # starts like a JPEG, never ends
        while not world._stopping.is_set():
            self.wfile.write(chunk)

    def _trickle(self, world: WorldServer, send_body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(TRICKLE_BYTES))
        self.send_header("Connection", "close")
        self.end_headers()
        if not send_body:
            return
        body = sample_jpeg()[:TRICKLE_BYTES].ljust(TRICKLE_BYTES, b"\0")  # starts like a JPEG
        for i in range(TRICKLE_BYTES):
            self.wfile.write(body[i : i + 1])
            if world._stopping.wait(1.0):
                return
