"""HTTP fetching for downloads: guarded against SSRF, bounded in time and bytes, polite to opt-outs.

- Only http and https. The host is resolved here and every address is checked: loopback, private,
  link-local (cloud metadata at 169.254.169.254 included), CGNAT, multicast, reserved, unspecified and IPv6
  unique-local / link-local addresses are refused, however the URL spells them (decimal ``2130706433``,
  octal, hex, IPv4-mapped IPv6: the resolver turns them all into addresses, and addresses are what is
  checked). The connection goes to the address that was checked, so DNS cannot change it in between. Every
  redirect hop is checked again. ``allow_private`` entries (``host:port``) open exceptions, for tests and
  local servers.
- A connect timeout, a read timeout per socket read, and a total deadline per URL that covers retries,
  redirects, and a status line, headers or body trickling in a byte at a time: a watchdog thread shuts a
  connection down at its deadline, because http.client reads headers with a timeout per ``recv`` only.
  ``max_bytes`` is enforced while streaming; a body shorter than its Content-Length is an error.
- Retries with exponential backoff for transient failures only: timeouts, connection errors, 429 and 5xx.
- robots.txt is fetched once per origin and cached (RFC 9309: a 4xx means no rules, an unreachable or 5xx
  robots.txt means disallow: a 5xx one is reported as ``opted_out``, an unreachable host as the network
  failure it was); ``X-Robots-Tag: noai|noimageai|noindex|noimageindex`` opts an image out.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

__all__ = ["FetchPolicy", "FetchResult", "Fetcher", "address_problem"]

TRANSIENT = ("timeout", "connection_error", "http_429")
OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


@dataclass(frozen=True)
class FetchPolicy:
    user_agent: str
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_bytes: int = 20 << 20
    retries: int = 2
    backoff: float = 0.5
    max_redirects: int = 5
    robots_txt: bool = True
    x_robots_tag: bool = True
    allow_private: tuple[str, ...] = ()


@dataclass
class FetchResult:
    status: str  # "ok" or a status code of the download taxonomy
    error: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 1


class _Fail(Exception):
    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status, self.error = status, error


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be fetched from, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_problem(embedded)
    checks = [
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("CGNAT", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not global", not ip.is_global),
    ]
    for name, hit in checks:
        if hit:
            return f"{ip} is a {name} address"
    return None


class Fetcher:
    """Fetches URLs under a :class:`FetchPolicy`. Thread-safe; one per worker, shared by its threads."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._ssl = ssl.create_default_context()
        self._robots: dict[str, RobotFileParser | _Fail] = {}
        self._robots_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._allowed = self._resolve_allowlist(policy.allow_private)
        self._watchdog = _Watchdog()

    @staticmethod
    def _resolve_allowlist(entries: tuple[str, ...]) -> set[tuple[str, int]]:
        allowed = set()
        for entry in entries:
            host, _, port = entry.rpartition(":")
            host = host.strip("[]")
            for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
                allowed.add((ipaddress.ip_address(info[4][0]).compressed, int(port)))
        return allowed

    # --- the public entry ------------------------------------------------------------------------

    def fetch(self, url: str) -> FetchResult:
        deadline = time.monotonic() + self.policy.total_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._fetch_once(url, deadline)
                result.attempts = attempt
                return result
            except _Fail as f:
                transient = f.status in TRANSIENT or f.status.startswith("http_5")
                wait = self.policy.backoff * 2 ** (attempt - 1)
                if not transient or attempt > self.policy.retries or time.monotonic() + wait >= deadline:
                    return FetchResult(f.status, f.error, attempts=attempt)
                time.sleep(wait)

    # --- one attempt: redirects, checks, body ----------------------------------------------------

    def _fetch_once(self, url: str, deadline: float) -> FetchResult:
        current = url
        for _ in range(self.policy.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https"):
                raise _Fail("blocked_address", f"scheme {parts.scheme!r} is not http or https: {current}")
            if self.policy.robots_txt:
                self._check_robots(current, deadline)
            response, conn = self._request(current, deadline)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise _Fail(f"http_{response.status}", "redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                if response.status != 200:
                    raise _Fail(f"http_{response.status}", f"HTTP {response.status} {response.reason}")
                if self.policy.x_robots_tag:
                    tag = _opt_out(response.getheaders())
                    if tag:
                        raise _Fail("opted_out", f"X-Robots-Tag: {tag}")
                body = self._read_body(response, conn, deadline)
                return FetchResult(
                    "ok", body=body, content_type=response.getheader("Content-Type"), final_url=current
                )
            finally:
                conn.close()
        raise _Fail("too_many_redirects", f"more than {self.policy.max_redirects} redirects from {url}")

    def _connect_address(self, host: str, port: int, deadline: float) -> str:
        """Resolve ``host`` and return the address to connect to, or fail if any address is refused."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise _Fail("connection_error", f"cannot resolve {host}: {e.strerror}") from None
        except UnicodeError as e:
            raise _Fail("connection_error", f"bad host name {host!r}: {e}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for ip in addresses:
            if (ip.compressed, port) in self._allowed:
                continue
            problem = address_problem(ip)
            if problem:
                raise _Fail("blocked_address", f"{host}:{port}: {problem}")
        if time.monotonic() >= deadline:
            raise _Fail("timeout", "total deadline passed")
        return addresses[0].compressed

    def _request(self, url: str, deadline: float) -> tuple[http.client.HTTPResponse, _Conn]:
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise _Fail("blocked_address", f"bad port in {url}: {e}") from None
        if not host:
            raise _Fail("blocked_address", f"no host in {url}")
        port = port or (443 if parts.scheme == "https" else 80)
        address = self._connect_address(host, port, deadline)
        timeout = min(self.policy.connect_timeout, max(deadline - time.monotonic(), 0.001))
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPS(
                host, port, address, timeout=timeout, context=self._ssl
            )
        else:
            conn = _PinnedHTTP(host, port, address, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        watched: _Conn | None = None
        try:
            conn.connect()
            # getresponse() hands a close-delimited body's socket to the response and drops conn.sock: keep it.
            watched = _Conn(conn, conn.sock, self._watchdog, self._watchdog.watch(conn.sock, deadline))
            conn.request(
                "GET", path, headers={"User-Agent": self.policy.user_agent, "Accept": "image/*,*/*;q=0.5"}
            )
            watched.sock.settimeout(min(self.policy.read_timeout, max(deadline - time.monotonic(), 0.001)))
            return conn.getresponse(), watched
        except TimeoutError:
            (watched or conn).close()
            raise _Fail("timeout", f"no response from {host}:{port} in time") from None
        except ssl.SSLError as e:
            (watched or conn).close()
            raise _Fail("connection_error", f"TLS: {e.reason or e}") from None
        except (OSError, http.client.HTTPException) as e:
            (watched or conn).close()
            if time.monotonic() >= deadline - 0.05:  # the watchdog cut it
                raise _Fail(
                    "timeout",
                    f"total deadline of {self.policy.total_timeout:g}s passed before the headers ended",
                ) from None
            raise _Fail("connection_error", f"{type(e).__name__}: {e}") from None

    def _read_body(self, response: http.client.HTTPResponse, conn: _Conn, deadline: float) -> bytes:
        limit = self.policy.max_bytes
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise _Fail("too_large", f"Content-Length {int(length):,} > max_bytes {limit:,}")
        chunks, size = [], 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Fail(
                        "timeout", f"total deadline of {self.policy.total_timeout:g}s passed mid-body"
                    )
                conn.sock.settimeout(min(self.policy.read_timeout, remaining))  # the socket the body comes on
                chunk = response.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _Fail("too_large", f"body exceeds max_bytes {limit:,}")
                chunks.append(chunk)
        except TimeoutError:
            if time.monotonic() >= deadline - 0.05:  # the socket timeout was clipped to the deadline
                raise _Fail(
                    "timeout", f"total deadline of {self.policy.total_timeout:g}s passed after {size:,} bytes"
                ) from None
            raise _Fail(
                "timeout", f"no data for {self.policy.read_timeout:g}s after {size:,} bytes"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline - 0.05:  # the watchdog cut it
                raise _Fail(
                    "timeout", f"total deadline of {self.policy.total_timeout:g}s passed after {size:,} bytes"
                ) from None
            raise _Fail("connection_error", f"{type(e).__name__} after {size:,} bytes: {e}") from None
        if time.monotonic() >= deadline:  # a close-delimited body the watchdog cut looks like its end
            raise _Fail(
                "timeout", f"total deadline of {self.policy.total_timeout:g}s passed after {size:,} bytes"
            )
        if length and length.isdigit() and size < int(length):
            raise _Fail("connection_error", f"body ended after {size:,} of its {int(length):,} bytes")
        return b"".join(chunks)

    # --- robots.txt ------------------------------------------------------------------------------

    def _check_robots(self, url: str, deadline: float) -> None:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            lock = self._robots_locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per origin, however many threads ask at once
            rules = self._robots.get(origin)
            if rules is None:
                rules = self._load_robots(origin, deadline)
                self._robots[origin] = rules
        if isinstance(rules, _Fail):
            raise _Fail(rules.status, rules.error)
        if not rules.can_fetch(self.policy.user_agent, url):
            raise _Fail("opted_out", f"robots.txt of {origin} disallows this path")

    def _load_robots(self, origin: str, deadline: float) -> RobotFileParser | _Fail:
        """The parsed rules, or the failure every URL of the origin gets. RFC 9309: an unreachable robots.txt
        or a 5xx means disallow everything. A 5xx is an answer (``opted_out``); a host that cannot be
        reached gets the network failure (``connection_error``, ``timeout``): nothing was opted out, and
        ``curate retry`` retries those."""
        parser = RobotFileParser()
        try:
            response, conn = self._request(f"{origin}/robots.txt", min(deadline, time.monotonic() + 10))
        except _Fail as f:
            if f.status == "blocked_address":
                raise
            return _Fail(
                f.status, f"robots.txt of {origin} unreachable ({f.error}); RFC 9309: assume disallow"
            )
        try:
            if response.status >= 500:
                return _Fail(
                    "opted_out",
                    f"robots.txt of {origin} answered HTTP {response.status}; RFC 9309: assume disallow",
                )
            if response.status != 200:  # 3xx is not followed here; 4xx: no rules
                parser.parse([])
                return parser
            body = self._read_body(response, conn, min(deadline, time.monotonic() + 10))[:500_000]
            parser.parse(body.decode("utf-8", errors="replace").splitlines())
            return parser
        except _Fail as f:
            return _Fail(
                "opted_out", f"robots.txt of {origin} unreadable ({f.error}); RFC 9309: assume disallow"
            )
        finally:
            conn.close()


def _opt_out(headers: list[tuple[str, str]]) -> str | None:
    """The first opt-out directive of the X-Robots-Tag headers that applies to every crawler or to curate."""
    for name, value in headers:
        if name.lower() != "x-robots-tag":
            continue
        for part in value.split(","):
            token = part.strip().lower()
            if ":" in token:
                agent, _, token = token.partition(":")
                if agent.strip() not in ("*", "curate"):
                    continue
                token = token.strip()
            if token in OPT_OUT_TAGS:
                return token
    return None


@dataclass
class _Conn:
    conn: http.client.HTTPConnection
    sock: socket.socket
    watchdog: _Watchdog
    ticket: int

    def close(self) -> None:
        self.watchdog.release(self.ticket)
        self.conn.close()
        self.sock.close()


class _Watchdog:
    """Shuts a socket down when its deadline passes, so that a blocked read returns at once.

    Socket timeouts bound each ``recv``, not a response: http.client reads the status line and headers a
    line at a time, and a server sending a byte a second would hold a URL for as long as its headers last.
    One thread per fetcher, started on first use and ended after a minute with nothing to watch.
    """

    IDLE_EXIT = 60.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._tickets = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            ticket = next(self._tickets)
            heapq.heappush(self._heap, (deadline, ticket))
            self._socks[ticket] = sock
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="curate-fetch-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return ticket

    def release(self, ticket: int) -> None:
        with self._cond:
            self._socks.pop(ticket, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)  # released before its deadline
                if not self._heap:
                    if not self._cond.wait(self.IDLE_EXIT) and not self._heap:
                        self._thread = None
                        return
                    continue
                deadline, ticket = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(min(wait, 1.0))  # woken early by a new, nearer deadline
                    continue
                heapq.heappop(self._heap)
                sock = self._socks.pop(ticket)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked; sends the URL's host name in the Host header."""

    def __init__(self, host: str, port: int, address: str, **kw):
        super().__init__(host, port, **kw)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """Like _PinnedHTTP, with TLS verified against the URL's host name (SNI and certificate)."""

    def __init__(self, host: str, port: int, address: str, *, context: ssl.SSLContext, **kw):
        super().__init__(host, port, context=context, **kw)
        self._address = address
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
