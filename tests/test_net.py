"""The fetcher's address rules, DNS cache and politeness, against real local servers: the SSRF address check
address by address, every address of a name tried in turn (a test resolver gives the names), connections and
request rate per host, Retry-After. robots.txt and TDMRep: test_net_optouts; proxies and TLS:
test_net_transport; the download stage's statuses: test_download."""

import email.utils
import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.hostile import HostileServer

from curate.kit.net import DnsCache, Fetcher, FetchPolicy, address_problem, system_resolve


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "private"),  # TEST-NET-1, documentation only
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd12:3456::1", "private"),  # unique local
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo around 10.0.0.1 (client bits inverted)
    ],
)
def test_non_public_addresses_are_refused(address, problem):
    found = address_problem(ipaddress.ip_address(address))
    assert found is not None and problem in found, found


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


# --- against real local servers: DNS cache, every address, politeness, Retry-After --------------------


def fetcher(*servers, resolve=None, **policy) -> Fetcher:
    """A fetcher allowed to reach the servers, with robots.txt and TDMRep off (their requests would count)."""
    allowed = tuple(s.host_port for s in servers) + tuple(policy.pop("allow_private", ()))
    base = {"robots_txt": False, "tdmrep": False, "retries": 0, "total_timeout": 5.0}
    return Fetcher(
        FetchPolicy(user_agent="curate/1.0", allow_private=allowed, **{**base, **policy}), resolve=resolve
    )


class Counting:
    """A resolver that answers some names itself, passes the rest to the system's, and counts calls."""

    def __init__(self, names: dict[str, list[str]]):
        self.names, self.calls = names, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host in self.names:
            return list(self.names[host])
        return system_resolve(host, port)


def test_the_dns_cache_keeps_answers_for_their_ttl():
    resolve = Counting({"a.test": ["93.184.215.14"]})
    cache = DnsCache(resolve)
    assert cache.lookup("a.test", 80, ttl=300, now=1000.0) == ["93.184.215.14"]
    assert cache.lookup("A.test", 80, ttl=300, now=1299.0) == ["93.184.215.14"]  # names are case-blind
    assert resolve.calls == ["a.test"]
    cache.lookup("a.test", 80, ttl=300, now=1300.5)  # expired
    assert resolve.calls == ["a.test", "a.test"]
    cache.lookup("a.test", 80, ttl=0)  # 0: no cache
    assert len(resolve.calls) == 3


def test_the_dns_cache_keeps_a_missing_name_but_not_a_failing_resolver():
    calls = []

    def resolve(host, port):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME if host == "gone.test" else socket.EAI_AGAIN, "no")

    cache = DnsCache(resolve)
    for host, expected_calls in (("gone.test", 1), ("flaky.test", 2)):
        for _ in range(2):
            with pytest.raises(socket.gaierror):
                cache.lookup(host, 80, ttl=300)
        assert calls.count(host) == expected_calls


def ok_route(c):
    c.respond("200 OK", b"body", {"Content-Type": "image/jpeg"})


def test_every_address_is_checked_and_tried_in_turn():
    with HostileServer() as srv:
        srv.routes["/x.jpg"] = ok_route
        port = srv.port
        resolve = Counting(
            {
                "multi.test": ["127.0.0.2", "127.0.0.1"],  # nobody listens on the first: refused
                "mixed.test": ["127.0.0.1", "10.0.0.1"],  # one allowed, one private
            }
        )
        f = fetcher(srv, resolve=resolve, allow_private=[f"127.0.0.2:{port}"])
        for _ in range(3):
            r = f.fetch(f"http://multi.test:{port}/x.jpg")
            assert (r.status, r.body) == ("ok", b"body"), r
        assert resolve.calls.count("multi.test") == 1  # cached
        assert f"Host: multi.test:{port}".encode() in srv.heads[-1]
        r = f.fetch(f"http://mixed.test:{port}/x.jpg")
        assert r.status == "blocked_address" and "10.0.0.1 is a private address" in r.error
        assert len(srv.heads) == 3  # the mixed name was never connected to
        r = fetcher(
            srv,
            resolve=Counting({"dead.test": ["127.0.0.2", "127.0.0.3"]}),
            allow_private=[f"127.0.0.2:{port}", f"127.0.0.3:{port}"],
        ).fetch(f"http://dead.test:{port}/x.jpg")
        assert r.status == "connection_error" and "tried 2 addresses" in r.error, r


class Holding:
    """A route that holds each request ``seconds`` and records, per server, how many were held at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.lock = threading.Lock()
        self.active: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.spans: dict[int, list[tuple[float, float]]] = {}
        self.starts: list[float] = []

    def __call__(self, c):
        port = c.server.port
        with self.lock:
            self.active[port] = self.active.get(port, 0) + 1
            self.peak[port] = max(self.peak.get(port, 0), self.active[port])
            self.starts.append(time.monotonic())
        start = time.monotonic()
        c.wait(self.seconds)
        with self.lock:
            self.active[port] -= 1
            self.spans.setdefault(port, []).append((start, time.monotonic()))
        ok_route(c)


def test_at_most_max_per_host_connections_to_a_host_and_hosts_do_not_wait_on_each_other():
    hold = Holding(0.3)
    with HostileServer() as a, HostileServer(host="127.0.0.2") as b:
        for s in (a, b):
            s.routes["/hold"] = hold
        f = fetcher(a, b, max_per_host=2)
        urls = [f"{s.url}/hold" for s in (a, b) for _ in range(4)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(f.fetch, urls))
        assert [r.status for r in results] == ["ok"] * 8
        assert hold.peak == {a.port: 2, b.port: 2}
        assert any(s1 < e2 and s2 < e1 for s1, e1 in hold.spans[a.port] for s2, e2 in hold.spans[b.port])


def test_per_host_rate_spaces_requests_and_a_turn_past_the_deadline_is_a_timeout():
    hold = Holding(0.0)
    with HostileServer() as srv:
        srv.routes["/hold"] = hold
        f = fetcher(srv, per_host_rate=10.0)
        with ThreadPoolExecutor(4) as pool:
            assert {r.status for r in pool.map(f.fetch, [f"{srv.url}/hold"] * 4)} == {"ok"}
        gaps = [b - a for a, b in zip(sorted(hold.starts), sorted(hold.starts)[1:], strict=False)]
        assert len(gaps) == 3 and min(gaps) > 0.08, gaps

        slow = fetcher(srv, per_host_rate=1.0, total_timeout=0.5)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(slow.fetch, [f"{srv.url}/hold"] * 2))
        assert sorted(r.status for r in results) == ["ok", "timeout"]
        assert "per_host_rate" in next(r.error for r in results if r.status == "timeout")


class Replies:
    """A route answering its requests in order with the given (status, headers), then 200."""

    def __init__(self, *replies):
        self.replies, self.times = list(replies), []

    def __call__(self, c):
        self.times.append(time.monotonic())
        if self.replies:
            status, headers = self.replies.pop(0)
            c.respond(status, b"busy", headers)
        else:
            ok_route(c)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_waited_for_within_the_deadline(form):
    when = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    status = "503 Service Unavailable" if form == "seconds" else "429 Too Many Requests"
    route = Replies((status, {"Retry-After": when}))
    with HostileServer() as srv:
        srv.routes["/busy"] = route
        r = fetcher(srv, retries=2, backoff=0.01).fetch(f"{srv.url}/busy")
    assert r.status == "ok" and r.attempts == 2
    assert route.times[1] - route.times[0] >= 0.95  # the date form has a resolution of a second


def test_a_retry_after_past_the_deadline_fails_at_once():
    route = Replies(("503 Service Unavailable", {"Retry-After": "120"}))
    with HostileServer() as srv:
        srv.routes["/busy"] = route
        start = time.monotonic()
        r = fetcher(srv, retries=3, backoff=0.01, total_timeout=3).fetch(f"{srv.url}/busy")
    assert time.monotonic() - start < 1.0 and len(route.times) == 1
    assert r.status == "http_503" and "Retry-After 120s ends past the deadline" in r.error
