"""A small real HTTP proxy for tests: absolute-form requests forwarded, CONNECT tunnels for https.

The download stage's proxy support has to be proven against a proxy that does what proxies do: read the
request line, connect to the target itself, and relay bytes. This one listens on 127.0.0.1, serves each
client connection in a thread, records every request line it gets (``seen``) and the whole head
(``heads``), and relays until either side closes or ``cap`` seconds pass. It has no access control:
whatever a client asks for, it connects to, which is why the client must check targets itself.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from urllib.parse import urlsplit

__all__ = ["Proxy"]


class Proxy:
    def __init__(self, cap: float = 10.0) -> None:
        self.cap = cap
        self.seen: list[str] = []
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Proxy:
        self._start(self._accept)
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(2)
        self._listener.close()

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            with self._lock:
                self.seen.append(f"{method} {target}")
                self.heads.append(head)
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = rest
            else:
                parts = urlsplit(target)
                upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=5)
                origin_form = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                lines = head.split(b"\r\n")[1:]
                lines = [h for h in lines if not h.lower().startswith(b"proxy-")]
                request_line = f"{method} {origin_form} {version}".encode("latin-1")
                first = b"\r\n".join([request_line, *lines]) + b"\r\n\r\n" + rest
            if first:
                upstream.sendall(first)
            self._relay(client, upstream)
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        finally:
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until one side closes (or the cap, or the proxy stops)."""
        end = time.monotonic() + self.cap
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while time.monotonic() < end and not self._stopping.is_set():
                for key, _ in sel.select(0.1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
