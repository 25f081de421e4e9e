"""HTTPS end to end against a local TLS server whose CA is made in the test (trustme), and HTTP(S) proxies
(a real forwarding and CONNECT proxy from tests/support/proxy.py): the CA bundle from config or
SSL_CERT_FILE, certificate and host-name failures as ``tls_error``, proxies from config and from the
environment, and the SSRF check on the target however the request travels."""

import base64

import pytest
from support.hostile import HostileServer
from support.proxy import Proxy
from support.tls import make_ca, server_context

from curate.kit.net import Fetcher, FetchPolicy, system_resolve


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)


def fetcher(*servers, resolve=None, **policy) -> Fetcher:
    allowed = tuple(s.host_port for s in servers) + tuple(policy.pop("allow_private", ()))
    base = {"retries": 2, "backoff": 0.01, "total_timeout": 5.0, "robots_txt": False, "tdmrep": False}
    return Fetcher(
        FetchPolicy(user_agent="curate/1.0", allow_private=allowed, **{**base, **policy}), resolve=resolve
    )


def image(c):
    c.respond("200 OK", b"an image over tls", {"Content-Type": "image/jpeg"})


@pytest.fixture
def tls_server(ca):
    authority, _ = ca
    with HostileServer(tls=server_context(authority, "localhost", "127.0.0.1")) as srv:
        srv.routes["/a.jpg"] = image
        yield srv


def test_https_with_the_ca_bundle_of_the_config_or_ssl_cert_file(ca, tls_server, monkeypatch):
    _, pem = ca
    r = fetcher(tls_server, ca_bundle=pem).fetch(f"{tls_server.url}/a.jpg")
    assert (r.status, r.body) == ("ok", b"an image over tls"), r
    monkeypatch.setenv("SSL_CERT_FILE", pem)
    r = fetcher(tls_server).fetch(f"{tls_server.url}/a.jpg")
    assert r.status == "ok", r
    with pytest.raises(ValueError, match="ca_bundle"):
        fetcher(ca_bundle="/nonexistent/ca.pem")


def test_an_unknown_ca_and_a_certificate_for_another_host_are_tls_errors(ca, tls_server):
    r = fetcher(tls_server).fetch(f"{tls_server.url}/a.jpg")  # the system's CAs do not know ours
    assert r.status == "tls_error" and "unable to get local issuer certificate" in r.error, r
    assert r.attempts == 1  # never retried

    def resolve(host, port):
        return ["127.0.0.1"] if host == "elsewhere.test" else system_resolve(host, port)

    _, pem = ca
    r = fetcher(tls_server, ca_bundle=pem, resolve=resolve).fetch(
        f"https://elsewhere.test:{tls_server.port}/a.jpg"
    )
    assert r.status == "tls_error" and "Hostname mismatch" in r.error and "elsewhere.test" in r.error, r
    assert len(tls_server.heads) == 0  # no request was sent on either connection


def test_http_through_a_proxy_in_absolute_form_with_its_credentials():
    with HostileServer() as srv, Proxy() as proxy:
        srv.routes["/a.jpg"] = image
        url = f"http://user:pa%20ss@127.0.0.1:{proxy.port}"
        r = fetcher(srv, proxy=url).fetch(f"{srv.url}/a.jpg?x=1")
        assert r.status == "ok", r
        assert proxy.seen == [f"GET {srv.url}/a.jpg?x=1"]
        token = base64.b64encode(b"user:pa ss").decode()
        assert f"Proxy-Authorization: Basic {token}".encode() in proxy.heads[0]
        assert srv.heads[0].startswith(b"GET /a.jpg?x=1 HTTP/1.1")


def test_https_through_a_connect_tunnel(ca, tls_server):
    _, pem = ca
    with Proxy() as proxy:
        r = fetcher(tls_server, proxy=proxy.url, ca_bundle=pem).fetch(f"{tls_server.url}/a.jpg")
        assert (r.status, r.body) == ("ok", b"an image over tls"), r
        assert proxy.seen == [f"CONNECT {tls_server.host_port}"]
        # TLS is end to end: a CA the client does not trust fails through the tunnel as it does directly
        r = fetcher(tls_server, proxy=proxy.url).fetch(f"{tls_server.url}/a.jpg")
        assert r.status == "tls_error"


def test_a_proxied_request_to_a_private_address_is_refused_before_the_proxy_is_asked(tls_server):
    with Proxy() as proxy:
        f = fetcher(proxy=proxy.url)  # the proxy itself is on loopback: it is the operator's choice
        for url in (
            "http://10.0.0.1/a.jpg",
            "https://169.254.169.254/latest/meta-data/",
            f"{tls_server.url}/a.jpg",  # a loopback target that allow_private does not name
            f"http://2130706433:{tls_server.port}/a.jpg",
        ):
            r = f.fetch(url)
            assert r.status == "blocked_address", (url, r)
        assert proxy.seen == [] and tls_server.heads == []


def test_proxies_from_the_environment_and_no_proxy(monkeypatch, ca, tls_server):
    _, pem = ca
    with HostileServer() as srv, Proxy() as proxy:
        srv.routes["/a.jpg"] = image
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("https_proxy", proxy.url)
        assert fetcher(srv).fetch(f"{srv.url}/a.jpg").status == "ok"
        assert fetcher(tls_server, ca_bundle=pem).fetch(f"{tls_server.url}/a.jpg").status == "ok"
        assert proxy.seen == [f"GET {srv.url}/a.jpg", f"CONNECT {tls_server.host_port}"]
        assert fetcher(srv, proxy_env=False).fetch(f"{srv.url}/a.jpg").status == "ok"
        monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
        assert fetcher(srv).fetch(f"{srv.url}/a.jpg").status == "ok"
        assert len(proxy.seen) == 2  # neither went through it
