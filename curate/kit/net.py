"""HTTP fetching for downloads: guarded against SSRF, bounded in time and bytes, polite to hosts and opt-outs.

- Only http and https. The host is resolved here and every address is checked: loopback, private,
  link-local (cloud metadata at 169.254.169.254 included), CGNAT, multicast, reserved, unspecified and IPv6
  unique-local / link-local addresses are refused, however the URL spells them (decimal ``2130706433``,
  octal, hex, IPv4-mapped IPv6: the resolver turns them all into addresses, and addresses are what is
  checked). The connection goes to an address that was checked, so DNS cannot change it in between; the
  addresses are tried in turn until one answers. Every redirect hop is checked again. ``allow_private``
  entries (``host:port``) open exceptions, for tests and local servers.
- Resolved addresses are kept per process for ``dns_cache_ttl`` seconds (:class:`DnsCache`): a shard of a
  crawl asks for the same hosts again and again, and the resolver should not be asked each time.
- A proxy (``proxy``, or ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` of the environment) carries the
  request: absolute-form GET for http, a CONNECT tunnel for https (TLS is end to end with the target). The
  target is resolved and checked here all the same, before the proxy is asked; the proxy resolves it again
  itself, as every proxied client lets it.
- A connect timeout, a read timeout per socket read, and a total deadline per URL that covers retries,
  redirects, waiting for a host's turn, a TLS handshake, and a status line, headers or body trickling in a
  byte at a time: a watchdog thread shuts a connection down at its deadline, because http.client reads
  headers with a timeout per ``recv`` only. ``max_bytes`` is enforced while streaming; a body shorter than
  its Content-Length is an error.
- Retries with exponential backoff for transient failures only: timeouts, connection errors, 429 and 5xx.
  ``Retry-After`` on a 429 or 503 (seconds or an HTTP date) is waited for when it falls within the URL's
  deadline; when it does not, the URL fails at once instead of sleeping to its deadline.
- Politeness per host: at most ``max_per_host`` connections to one host at once and, when set, at most
  ``per_host_rate`` new requests a second; a request waits for its turn within its deadline.
- TLS is verified against the system's CAs (or ``SSL_CERT_FILE``, or ``ca_bundle``); a certificate that
  does not verify, or names another host, is ``tls_error`` with OpenSSL's reason, never retried.
- robots.txt (RFC 9309, parsed by protego: ``*`` and ``$`` wildcards, the longest match wins, Allow wins a
  tie) is fetched once per origin and kept for 24 hours (RFC 9309 2.4). Redirects are followed up to five
  hops, each checked like any URL; more than five means no rules (2.3.1.2). A 4xx means no rules, a 5xx or
  an unreachable robots.txt means disallow (2.3.1.3, 2.3.1.4): a 5xx is reported as ``opted_out``, an
  unreachable host as the network failure it was. At most 500 KiB of it is parsed (2.5).
- ``X-Robots-Tag: noai|noimageai|noindex|noimageindex`` opts an image out, and so does W3C TDMRep: the
  ``tdm-reservation: 1`` response header, or the first rule of ``/.well-known/tdmrep.json`` (fetched once
  per origin, like robots.txt) whose ``location`` matches the path, robots.txt-style; the header, when it
  says 0 or 1, supersedes the file (TDMRep, processing priority).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import heapq
import http.client
import ipaddress
import itertools
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from protego import Protego

__all__ = [
    "PROCESS_DNS",
    "DnsCache",
    "FetchPolicy",
    "FetchResult",
    "Fetcher",
    "address_problem",
    "parse_proxy",
    "system_resolve",
]

TRANSIENT = ("timeout", "connection_error", "http_429")
OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)
RETRY_AFTER = (429, 503)
SITE_FILE_REDIRECTS = 5  # RFC 9309 2.3.1.2: follow at least five consecutive redirects
SITE_FILE_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least 500 KiB
SITE_FILE_TTL = 24 * 3600.0  # RFC 9309 2.4: a cached robots.txt is used for 24 hours at most
SITE_FILE_RETRY = 300.0  # a tdmrep.json that could not be reached is asked for again after this
SITE_FILE_SECONDS = 10.0  # a robots.txt or tdmrep.json gets this long at most, within the URL's deadline
CACHE_ENTRIES = 100_000  # per cache: hosts for DNS, origins for robots.txt and tdmrep.json
TDMREP_PATH = "/.well-known/tdmrep.json"
_CGNAT = ipaddress.ip_network("100.64.0.0/10")

Resolver = Callable[[str, int], list[str]]


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
    tdmrep: bool = True
    allow_private: tuple[str, ...] = ()
    accept: str = "image/*,*/*;q=0.5"
    dns_cache_ttl: float = 300.0
    proxy: str | None = None
    proxy_env: bool = True
    ca_bundle: str | None = None
    max_per_host: int = 16
    per_host_rate: float | None = None


@dataclass
class FetchResult:
    status: str  # "ok" or a status code of the download taxonomy
    error: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 1


class _Fail(Exception):
    def __init__(self, status: str, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.status, self.error, self.retry_after = status, error, retry_after


class _HopBlocked(_Fail):
    """A robots.txt or tdmrep.json that redirects to a refused address or scheme."""


class _Unreadable(_Fail):
    """A robots.txt or tdmrep.json whose body could not be read whole (up to its size limit)."""


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


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` in the resolver's order of preference, each once (IPv6 scope ids dropped).
    Raises ``socket.gaierror`` (and ``UnicodeError`` for a name IDNA cannot encode)."""
    seen: dict[str, None] = {}
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen.setdefault(str(info[4][0]).split("%")[0], None)
    return list(seen)


class _Cache:
    """Values by key for a time each, loaded once however many threads ask at once; the oldest entries go
    when there are more than ``max_entries``."""

    def __init__(self, max_entries: int = CACHE_ENTRIES):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._values: dict[Any, tuple[float, Any]] = {}  # key -> (expiry, value), oldest first
        self._loading: dict[Any, threading.Event] = {}

    def get(self, key: Any, load: Callable[[], tuple[Any, float]], now: float | None = None) -> Any:
        """The cached value, or ``load()``'s ``(value, seconds to keep it)``. An exception of ``load`` is
        not cached: it propagates to this caller, and a waiting thread loads again."""
        while True:
            at = time.monotonic() if now is None else now
            with self._lock:
                hit = self._values.get(key)
                if hit is not None and hit[0] > at:
                    return hit[1]
                event = self._loading.get(key)
                mine = event is None
                if mine:
                    event = self._loading[key] = threading.Event()
            if not mine:
                event.wait()
                continue
            try:
                value, ttl = load()
                with self._lock:
                    self._values.pop(key, None)
                    if ttl > 0:
                        self._values[key] = (at + ttl, value)
                        while len(self._values) > self.max_entries:
                            del self._values[next(iter(self._values))]
                return value
            finally:
                with self._lock:
                    del self._loading[key]
                event.set()


class DnsCache:
    """A host's addresses, kept for a TTL and shared by every thread (and by default every fetcher) of a
    process. Names that do not exist are kept as such for the same time; other resolver failures are not.
    ``resolve`` is the resolver behind it (tests give their own)."""

    def __init__(self, resolve: Resolver = system_resolve, max_entries: int = CACHE_ENTRIES):
        self.resolve = resolve
        self._cache = _Cache(max_entries)

    def lookup(self, host: str, port: int, ttl: float, now: float | None = None) -> list[str]:
        if ttl <= 0:
            return self.resolve(host, port)

        def load() -> tuple[list[str] | socket.gaierror, float]:
            try:
                return self.resolve(host, port), ttl
            except socket.gaierror as e:
                if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                    return e, ttl
                raise

        found = self._cache.get((host.lower(), port), load, now)
        if isinstance(found, socket.gaierror):
            raise socket.gaierror(found.errno, found.strerror)
        return found


PROCESS_DNS = DnsCache()


class Fetcher:
    """Fetches URLs under a :class:`FetchPolicy`. Thread-safe; one per worker, shared by its threads.

    ``resolve`` replaces the system resolver (behind a DNS cache of this fetcher's own); by default the
    process-wide :data:`PROCESS_DNS` is used."""

    def __init__(self, policy: FetchPolicy, *, resolve: Resolver | None = None):
        self.policy = policy
        self._dns = PROCESS_DNS if resolve is None else DnsCache(resolve)
        try:
            self._ssl = ssl.create_default_context(cafile=policy.ca_bundle)  # None: system CAs, SSL_CERT_FILE
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"ca_bundle {policy.ca_bundle}: {e}") from None
        self._agent = _product_token(policy.user_agent)
        self._sites = _Cache()  # (kind, origin) -> robots.txt rules or tdmrep.json rules
        self._allowed = self._resolve_allowlist(policy.allow_private, resolve or system_resolve)
        self._proxies = _Proxies(policy.proxy, policy.proxy_env)
        self._hosts = _HostGate(policy.max_per_host, policy.per_host_rate)
        self._watchdog = _Watchdog()

    @staticmethod
    def _resolve_allowlist(entries: tuple[str, ...], resolve: Resolver) -> set[tuple[str, int]]:
        allowed = set()
        for entry in entries:
            host, _, port = entry.rpartition(":")
            host = host.strip("[]")
            for address in resolve(host, int(port)):
                allowed.add((ipaddress.ip_address(address).compressed, int(port)))
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
                if f.retry_after is not None:
                    wait = max(wait, f.retry_after)
                if not transient or attempt > self.policy.retries:
                    return FetchResult(f.status, f.error, attempts=attempt)
                if time.monotonic() + wait >= deadline:
                    error = f.error
                    if f.retry_after is not None:
                        error += f"; Retry-After {f.retry_after:g}s ends past the deadline"
                    return FetchResult(f.status, error, attempts=attempt)
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
            tdm_rules = self._tdm_rules(current, deadline) if self.policy.tdmrep else []
            response, conn = self._request(current, deadline)
            try:
                if response.status in REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise _Fail(f"http_{response.status}", "redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                if response.status != 200:
                    wait = _retry_after(response) if response.status in RETRY_AFTER else None
                    raise _Fail(f"http_{response.status}", f"HTTP {response.status} {response.reason}", wait)
                if self.policy.x_robots_tag:
                    tag = _opt_out(response.getheaders())
                    if tag:
                        raise _Fail("opted_out", f"X-Robots-Tag: {tag}")
                if self.policy.tdmrep:
                    reserved = _tdm_reserved(response, tdm_rules, current)
                    if reserved:
                        raise _Fail("opted_out", reserved)
                body = self._read_body(response, conn, deadline)
                return FetchResult(
                    "ok", body=body, content_type=response.getheader("Content-Type"), final_url=current
                )
            finally:
                conn.close()
        raise _Fail("too_many_redirects", f"more than {self.policy.max_redirects} redirects from {url}")

    def _checked_addresses(self, host: str, port: int, deadline: float) -> list[str]:
        """Resolve ``host`` (through the DNS cache) and return its addresses, or fail if any is refused."""
        try:
            found = self._dns.lookup(host, port, self.policy.dns_cache_ttl)
        except socket.gaierror as e:
            raise _Fail("connection_error", f"cannot resolve {host}: {e.strerror}") from None
        except UnicodeError as e:
            raise _Fail("connection_error", f"bad host name {host!r}: {e}") from None
        addresses = [ipaddress.ip_address(a) for a in found]
        for ip in addresses:
            if (ip.compressed, port) in self._allowed:
                continue
            problem = address_problem(ip)
            if problem:
                raise _Fail("blocked_address", f"{host}:{port}: {problem}")
        if time.monotonic() >= deadline:
            raise _Fail("timeout", "total deadline passed")
        return [ip.compressed for ip in addresses]

    def _request(self, url: str, deadline: float) -> tuple[http.client.HTTPResponse, _Conn]:
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise _Fail("blocked_address", f"bad port in {url}: {e}") from None
        if not host:
            raise _Fail("blocked_address", f"no host in {url}")
        https = parts.scheme == "https"
        port = port or (443 if https else 80)
        addresses = self._checked_addresses(host, port, deadline)  # the target's, proxy or not
        proxy = self._proxies.for_url(parts.scheme, host)
        # It frames the request and the response; it never connects: it is given our socket.
        conn = (
            http.client.HTTPSConnection(host, port, context=self._ssl)
            if https
            else http.client.HTTPConnection(host, port)
        )
        release = self._hosts.acquire(host.lower(), deadline)
        watched: _Conn | None = None
        try:
            if proxy is None:
                sock = self._tcp(addresses, port, deadline, f"{host}:{port}")
            else:
                sock = self._tcp(self._proxy_addresses(proxy, deadline), proxy.port, deadline, proxy.name)
            watched = _Conn(conn, sock, self._watchdog, self._watchdog.watch(sock, deadline), release)
            sock.settimeout(self._read_timeout(deadline))  # for a CONNECT and a TLS handshake too
            if proxy is not None and https:
                self._tunnel(watched.sock, host, port, proxy)
            if https:
                tls = self._ssl.wrap_socket(watched.sock, server_hostname=host, do_handshake_on_connect=False)
                watched.swap(tls)
                tls.do_handshake()
            conn.sock = watched.sock
            headers = {"User-Agent": self.policy.user_agent, "Accept": self.policy.accept}
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if proxy is not None and not https:  # absolute-form through the proxy
                target = f"http://{_authority(_ascii_host(host), port, 80)}{target}"
                headers.update(proxy.headers)
            conn.request("GET", target, headers=headers)
            watched.sock.settimeout(self._read_timeout(deadline))
            return conn.getresponse(), watched
        except BaseException as e:
            if watched is not None:
                watched.close()
            else:
                release()
            if isinstance(e, _Fail):
                raise
            if isinstance(e, TimeoutError):
                raise _Fail("timeout", f"no response from {host}:{port} in time") from None
            if isinstance(e, (OSError, http.client.HTTPException)) and time.monotonic() >= deadline - 0.05:
                raise _Fail(  # the watchdog cut it (an SSLError too, when it cut a handshake)
                    "timeout",
                    f"total deadline of {self.policy.total_timeout:g}s passed before the headers ended",
                ) from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise _Fail("tls_error", f"certificate of {host}: {e.verify_message}") from None
            if isinstance(e, ssl.SSLError):
                raise _Fail("tls_error", f"TLS with {host}:{port}: {e.reason or e}") from None
            if isinstance(e, (OSError, http.client.HTTPException)):
                raise _Fail("connection_error", f"{type(e).__name__}: {e}") from None
            raise

    def _read_timeout(self, deadline: float) -> float:
        return min(self.policy.read_timeout, max(deadline - time.monotonic(), 0.001))

    def _tcp(self, addresses: list[str], port: int, deadline: float, what: str) -> socket.socket:
        """A connection to the first of ``addresses`` that accepts one, in turn."""
        error: OSError | None = None
        for address in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return socket.create_connection((address, port), min(self.policy.connect_timeout, left))
            except OSError as e:
                error = e
        tried = f" (tried {len(addresses)} addresses)" if len(addresses) > 1 else ""
        if error is None or isinstance(error, TimeoutError):
            raise _Fail("timeout", f"connecting to {what} timed out{tried}")
        raise _Fail("connection_error", f"{what}: {type(error).__name__}: {error}{tried}")

    def _proxy_addresses(self, proxy: _Proxy, deadline: float) -> list[str]:
        """The proxy's addresses: it is the operator's choice, so it is not held to the SSRF rules."""
        try:
            return self._dns.lookup(proxy.host, proxy.port, self.policy.dns_cache_ttl)
        except (socket.gaierror, UnicodeError) as e:
            raise _Fail("connection_error", f"cannot resolve the proxy {proxy.name}: {e}") from None

    def _tunnel(self, sock: socket.socket, host: str, port: int, proxy: _Proxy) -> None:
        authority = _authority(_ascii_host(host), port, None)
        lines = [
            f"CONNECT {authority} HTTP/1.1",
            f"Host: {authority}",
            f"User-Agent: {self.policy.user_agent}",
        ]
        lines += [f"{k}: {v}" for k, v in proxy.headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = http.client.HTTPResponse(sock, method="CONNECT")
        response.begin()  # status line and headers; a tunnel has no body before TLS starts
        if response.status != 200:
            raise _Fail(
                "connection_error",
                f"the proxy {proxy.name} answered {response.status} {response.reason} to CONNECT {authority}",
            )

    def _read_body(
        self,
        response: http.client.HTTPResponse,
        conn: _Conn,
        deadline: float,
        limit: int | None = None,
        truncate: bool = False,
    ) -> bytes:
        """The body, at most ``limit`` bytes (default ``max_bytes``): more is ``too_large``, or with
        ``truncate`` the first ``limit`` bytes."""
        limit = self.policy.max_bytes if limit is None else limit
        length = response.getheader("Content-Length")
        if not truncate and length and length.isdigit() and int(length) > limit:
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
                chunks.append(chunk)
                if size > limit:
                    if truncate:
                        return b"".join(chunks)[:limit]
                    raise _Fail("too_large", f"body exceeds max_bytes {limit:,}")
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

    # --- files of a site: robots.txt, tdmrep.json ------------------------------------------------

    def _site_file(self, origin: str, path: str, deadline: float) -> tuple[int | None, bytes]:
        """GET ``origin + path``, following up to five redirects (each hop checked like any URL, across
        origins too). Returns the final status and, for a 2xx, the first 500 KiB of the body; ``None`` for
        more than five redirects. Raises the failure of the first hop as it is, a redirect to a refused
        address as :class:`_HopBlocked`, and a body that cannot be read as :class:`_Unreadable`."""
        current = origin + path
        deadline = min(deadline, time.monotonic() + SITE_FILE_SECONDS)
        for hop in range(SITE_FILE_REDIRECTS + 1):
            try:
                response, conn = self._request(current, deadline)
            except _Fail as f:
                if hop and f.status == "blocked_address":
                    raise _HopBlocked(f.status, f"{origin}{path} redirects to {current}: {f.error}") from None
                raise
            try:
                location = response.getheader("Location")
                if response.status in REDIRECTS and location:
                    current = urljoin(current, location)
                    if urlsplit(current).scheme not in ("http", "https"):
                        raise _HopBlocked("blocked_address", f"{origin}{path} redirects to {current}")
                    continue
                body = b""
                if 200 <= response.status < 300:
                    try:
                        body = self._read_body(response, conn, deadline, SITE_FILE_BYTES, truncate=True)
                    except _Fail as f:
                        raise _Unreadable(f.status, f.error) from None
                return response.status, body
            finally:
                conn.close()
        return None, b""

    def _check_robots(self, url: str, deadline: float) -> None:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        rules = self._sites.get(
            ("robots", origin), lambda: (self._load_robots(origin, deadline), SITE_FILE_TTL)
        )
        if isinstance(rules, _Fail):
            raise _Fail(rules.status, rules.error)
        if rules is not None and not rules.can_fetch(url, self._agent):
            raise _Fail("opted_out", f"robots.txt of {origin} disallows this path")

    def _load_robots(self, origin: str, deadline: float) -> Protego | _Fail | None:
        """The parsed rules, None for no rules, or the failure every URL of the origin gets. RFC 9309: an
        unreachable robots.txt or a 5xx means disallow everything. A 5xx is an answer (``opted_out``); a host
        that cannot be reached gets the network failure (``connection_error``, ``timeout``, ``tls_error``):
        nothing was opted out, and ``curate retry`` retries those."""
        try:
            status, body = self._site_file(origin, "/robots.txt", deadline)
        except (_HopBlocked, _Unreadable) as f:
            if isinstance(f, _HopBlocked):
                return _Fail(f.status, f"robots.txt of {origin}: {f.error}")
            return _Fail(
                "opted_out", f"robots.txt of {origin} unreadable ({f.error}); RFC 9309: assume disallow"
            )
        except _Fail as f:
            if f.status == "blocked_address":
                raise  # the origin itself: the URL is refused as it would be without robots.txt
            return _Fail(
                f.status, f"robots.txt of {origin} unreachable ({f.error}); RFC 9309: assume disallow"
            )
        if status is None or 400 <= status < 500:
            return None  # unavailable (or more than five redirects): no rules
        if status >= 500:
            return _Fail(
                "opted_out", f"robots.txt of {origin} answered HTTP {status}; RFC 9309: assume disallow"
            )
        if not 200 <= status < 300:
            return None
        return Protego.parse(body.decode("utf-8", errors="replace"))

    def _tdm_rules(self, url: str, deadline: float) -> list[_TdmRule]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        return self._sites.get(("tdmrep", origin), lambda: self._load_tdmrep(origin, deadline))

    def _load_tdmrep(self, origin: str, deadline: float) -> tuple[list[_TdmRule], float]:
        """The rules of the origin's tdmrep.json and how long to keep them: none when it has none that can
        be read (TDMRep: a server that does not give the file does not implement the protocol); a file that
        could not be reached is asked for again after a few minutes rather than a day."""
        try:
            status, body = self._site_file(origin, TDMREP_PATH, deadline)
        except (_HopBlocked, _Unreadable):
            return [], SITE_FILE_TTL
        except _Fail as f:
            if f.status == "blocked_address":
                raise  # the origin itself
            return [], SITE_FILE_RETRY
        if status != 200:
            return [], SITE_FILE_TTL if status is None or status < 500 else SITE_FILE_RETRY
        try:
            doc = json.loads(body.decode("utf-8-sig"))
        except ValueError:
            return [], SITE_FILE_TTL
        return _tdm_rules(doc, origin), SITE_FILE_TTL


# --- robots.txt and TDMRep, as data -----------------------------------------------------------------


def _product_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against (RFC 9309 2.2.1): ``curate`` of
    ``curate/0.1.0 (+https://...)``."""
    return (user_agent.split() or [user_agent])[0].split("/")[0] or user_agent


@dataclass(frozen=True)
class _TdmRule:
    location: str
    reservation: int | None  # 0, 1, or None: unset (a protocol error in the file counts as unset)
    policy: str | None
    origin: str
    matcher: Protego

    def matches(self, url: str) -> bool:
        return not self.matcher.can_fetch(url, "*")


def _tdm_rules(doc: object, origin: str) -> list[_TdmRule]:
    """The rules of a tdmrep.json document in their order (the first that matches applies). A location is a
    path pattern with robots.txt's ``*`` and ``$`` (TDMRep reuses that syntax), matched by protego as a
    robots.txt line would be."""
    rules = []
    for item in doc if isinstance(doc, list) else []:
        if not isinstance(item, dict):
            continue
        location = item.get("location")
        if not isinstance(location, str) or not location.startswith(("/", "*")) or "\n" in location:
            continue
        value = item.get("tdm-reservation")
        reservation = value if type(value) is int and value in (0, 1) else None
        policy = item.get("tdm-policy") if isinstance(item.get("tdm-policy"), str) else None
        line = location.replace("\r", "").replace("#", "%23")
        matcher = Protego.parse(f"User-agent: *\nDisallow: {line}\n")
        rules.append(_TdmRule(location, reservation, policy, origin, matcher))
    return rules


def _tdm_reserved(response: http.client.HTTPResponse, rules: list[_TdmRule], url: str) -> str | None:
    """Why TDM rights are reserved on this response, or None. The header, when it says 0 or 1, supersedes
    the file; other header values are protocol errors, read as unset."""
    header = (response.getheader("tdm-reservation") or "").strip()
    if header in ("0", "1"):
        if header == "0":
            return None
        policy = response.getheader("tdm-policy")
        return "tdm-reservation: 1" + (f" (tdm-policy: {policy})" if policy else "")
    for rule in rules:
        if rule.matches(url):
            if rule.reservation != 1:
                return None
            policy = f" (tdm-policy: {rule.policy})" if rule.policy else ""
            return f"{rule.origin}{TDMREP_PATH}: location {rule.location!r} has tdm-reservation 1{policy}"
    return None


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


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    """Seconds from now that ``Retry-After`` asks for (delay-seconds or an HTTP date), or None."""
    value = (response.getheader("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _ascii_host(host: str) -> str:
    return host if host.isascii() else host.encode("idna").decode()


def _authority(host: str, port: int, default: int | None) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == default else f"{name}:{port}"


# --- proxies ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: dict[str, str]  # Proxy-Authorization, when the proxy URL has credentials

    @property
    def name(self) -> str:
        return f"proxy {_authority(self.host, self.port, None)}"


def parse_proxy(url: str) -> _Proxy:
    """An ``http://[user:password@]host[:port]`` proxy (port 80 by default); ValueError for anything else."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r} is not an http://host:port proxy")
    headers = {}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return _Proxy(parts.hostname, parts.port or 80, headers)


class _Proxies:
    """Which proxy, if any, carries a URL: ``proxy`` for both schemes, else (with ``from_env``) the
    environment's ``http_proxy`` / ``https_proxy`` (lower or upper case), skipping hosts ``no_proxy``
    names."""

    def __init__(self, proxy: str | None, from_env: bool):
        self._env = urllib.request.getproxies_environment() if from_env else {}
        self._fixed = parse_proxy(proxy) if proxy else None
        self._by_scheme = {s: parse_proxy(self._env[s]) for s in ("http", "https") if self._env.get(s)}

    def for_url(self, scheme: str, host: str) -> _Proxy | None:
        chosen = self._fixed or self._by_scheme.get(scheme)
        if chosen is None:
            return None
        if self._env.get("no") and urllib.request.proxy_bypass_environment(host, self._env):
            return None
        return chosen


# --- politeness -------------------------------------------------------------------------------------


class _HostGate:
    """At most ``limit`` connections to a host at once and, with ``rate``, at most ``rate`` new requests to
    it a second. A request waits its turn within its deadline; past it, the URL is a ``timeout``."""

    def __init__(self, limit: int, rate: float | None):
        self.limit, self.rate = limit, rate
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._next: dict[str, float] = {}  # the earliest start of the next request to a host

    def acquire(self, host: str, deadline: float) -> Callable[[], None]:
        """Wait for a turn; returns the function that gives the connection back (once, however often
        it is called)."""
        with self._cond:
            while self._active.get(host, 0) >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Fail("timeout", f"total deadline passed waiting for a connection to {host}")
                self._cond.wait(left)
            now = time.monotonic()
            start = now
            if self.rate:
                start = max(now, self._next.get(host, 0.0))
                if start >= deadline:
                    raise _Fail(
                        "timeout", f"{host}'s next turn (per_host_rate {self.rate:g}/s) is past the deadline"
                    )
                self._next[host] = start + 1.0 / self.rate
                if len(self._next) > CACHE_ENTRIES:
                    self._next = {h: t for h, t in self._next.items() if t > now}
            self._active[host] = self._active.get(host, 0) + 1
        done = threading.Event()

        def release() -> None:
            if done.is_set():
                return
            done.set()
            with self._cond:
                left = self._active[host] - 1
                if left:
                    self._active[host] = left
                else:
                    del self._active[host]
                self._cond.notify_all()

        if start > now:
            time.sleep(start - now)
        return release


# --- connections --------------------------------------------------------------------------------------


class _Conn:
    """An open request: the http.client connection, the socket its response comes on, the watchdog's
    ticket for that socket and the host's turn. ``close()`` gives everything back."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        sock: socket.socket,
        watchdog: _Watchdog,
        ticket: int,
        release: Callable[[], None],
    ):
        self.conn, self.sock, self.watchdog, self.ticket, self.release = conn, sock, watchdog, ticket, release

    def swap(self, sock: socket.socket) -> None:
        """The socket now is ``sock`` (TLS wraps the plain one, which it detaches)."""
        self.sock = sock
        self.watchdog.swap(self.ticket, sock)

    def close(self) -> None:
        self.watchdog.release(self.ticket)
        self.conn.close()
        self.sock.close()
        self.release()


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

    def swap(self, ticket: int, sock: socket.socket) -> None:
        with self._cond:
            if ticket in self._socks:
                self._socks[ticket] = sock
                return
        with contextlib.suppress(OSError):  # its deadline passed while it was being swapped
            sock.shutdown(socket.SHUT_RDWR)

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
