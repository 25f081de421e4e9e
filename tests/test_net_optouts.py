"""robots.txt (RFC 9309) and W3C TDMRep opt-outs, as the fetcher honours them against real local servers:
wildcards and longest match, redirected robots.txt files (http to https included, each hop checked), the
status rules, the tdm-reservation header and /.well-known/tdmrep.json, each file fetched once per origin."""

import json

import pytest
from support.hostile import HostileServer, closed_port, redirect, static, status
from support.tls import make_ca, server_context

from curate.kit.net import Fetcher, FetchPolicy

RULES = """\
User-agent: *
Disallow: /*.jpg$
Allow: /img/public/
Disallow: /img/
Disallow: /same/
Allow: /same/

User-agent: curate
Disallow: /*.jpg$
Allow: /img/public/
Disallow: /img/
Disallow: /same/
Allow: /same/
Disallow: /curate-only/

User-agent: othercrawler
Disallow: /
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"))


def fetcher(*servers, **policy) -> Fetcher:
    allowed = tuple(s.host_port for s in servers) + tuple(policy.pop("allow_private", ()))
    base = {"retries": 0, "total_timeout": 5.0, "tdmrep": False}
    return Fetcher(
        FetchPolicy(
            user_agent="curate/1.0 (+https://example.org)", allow_private=allowed, **{**base, **policy}
        )
    )


def image(c):
    c.respond("200 OK", b"an image", {"Content-Type": "image/jpeg"})


def serve_anything(srv: HostileServer, *paths: str) -> None:
    for path in paths:
        srv.routes[path] = image


def requests_for(srv: HostileServer, path: str) -> int:
    return sum(1 for h in srv.heads if h.split(b" ")[1] == path.encode())


def test_robots_txt_wildcards_and_the_longest_match_as_rfc_9309_says():
    paths = {
        "/a/b.jpg": "opted_out",  # Disallow: /*.jpg$
        "/a/b.jpg?size=2": "ok",  # $ anchors the end: the query follows
        "/a/b.png": "ok",
        "/img/public/c.png": "ok",  # Allow: /img/public/ is longer than Disallow: /img/
        "/img/d.png": "opted_out",
        "/same/e.png": "ok",  # equal length: Allow wins
        "/curate-only/f.png": "opted_out",  # the group of curate's product token, not *
    }
    with HostileServer() as srv:
        srv.routes["/robots.txt"] = static(RULES.encode(), "text/plain")
        serve_anything(srv, *{p.split("?")[0] for p in paths})
        f = fetcher(srv)
        got = {p: f.fetch(srv.url + p) for p in paths}
        assert {p: r.status for p, r in got.items()} == paths
        assert got["/a/b.jpg"].error == f"robots.txt of {srv.url} disallows this path"
        assert requests_for(srv, "/robots.txt") == 1


def test_a_redirected_robots_txt_is_followed_to_https_and_its_rules_apply(ca):
    authority, pem = ca
    with HostileServer(tls=server_context(authority, "127.0.0.1")) as secure, HostileServer() as plain:
        secure.routes["/robots.txt"] = static(b"User-agent: *\nDisallow: /private/\n", "text/plain")
        plain.routes["/robots.txt"] = redirect(f"{secure.url}/robots.txt")
        serve_anything(plain, "/private/a.jpg", "/public/b.jpg")
        f = fetcher(plain, secure, ca_bundle=pem)
        assert f.fetch(f"{plain.url}/private/a.jpg").status == "opted_out"
        assert f.fetch(f"{plain.url}/public/b.jpg").status == "ok"
        assert requests_for(secure, "/robots.txt") == 1


@pytest.mark.parametrize("hops, expected", [(5, "opted_out"), (6, "ok")])
def test_five_robots_redirects_are_followed_and_a_sixth_means_no_rules(hops, expected):
    with HostileServer() as srv:
        srv.routes["/robots.txt"] = redirect("/hop/1")
        for i in range(1, hops):
            srv.routes[f"/hop/{i}"] = redirect(f"/hop/{i + 1}")
        srv.routes[f"/hop/{hops}"] = static(b"User-agent: *\nDisallow: /\n", "text/plain")
        serve_anything(srv, "/a.jpg")
        assert fetcher(srv).fetch(f"{srv.url}/a.jpg").status == expected


def test_a_robots_txt_redirecting_to_a_refused_address_refuses_the_origin():
    with HostileServer() as srv:
        refused = f"http://127.0.0.1:{closed_port()}/robots.txt"
        srv.routes["/robots.txt"] = redirect(refused)
        serve_anything(srv, "/a.jpg")
        r = fetcher(srv).fetch(f"{srv.url}/a.jpg")
        assert r.status == "blocked_address" and "robots.txt" in r.error and "loopback" in r.error, r
        assert requests_for(srv, "/a.jpg") == 0


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("404 Not Found", "ok"),  # 4xx: unavailable, no rules
        ("403 Forbidden", "ok"),  # RFC 9309 2.3.1.3: 401 and 403 too
        ("500 Internal Server Error", "opted_out"),  # 5xx: unreachable, disallow
        ("503 Service Unavailable", "opted_out"),
    ],
)
def test_robots_txt_status_rules(answer, expected):
    with HostileServer() as srv:
        srv.routes["/robots.txt"] = status(answer)
        serve_anything(srv, "/a.jpg")
        r = fetcher(srv).fetch(f"{srv.url}/a.jpg")
        assert r.status == expected, r
        if expected == "opted_out":
            assert "RFC 9309: assume disallow" in r.error


def test_an_unreachable_robots_txt_fails_the_url_with_the_network_failure():
    port = closed_port()
    r = fetcher(allow_private=[f"127.0.0.1:{port}"]).fetch(f"http://127.0.0.1:{port}/a.jpg")
    assert r.status == "connection_error" and "robots.txt" in r.error and "unreachable" in r.error


TDMREP = [
    {"location": "/reserved/public/*.png", "tdm-reservation": 0},
    {"location": "/reserved/", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy.json"},
    {"location": "/*.gif$", "tdm-reservation": 1},
    {"location": "/bad/", "tdm-reservation": 7},  # a protocol error: unset
    {"location": "/bool/", "tdm-reservation": True},  # not an integer: unset
    {"tdm-reservation": 1},  # no location: no rule
]


def test_tdmrep_json_the_first_matching_rule_applies_and_the_header_supersedes_it():
    expected = {
        "/reserved/a.jpg": "opted_out",
        "/reserved/public/b.png": "ok",  # the first rule that matches is the one
        "/reserved/public/b.jpg": "opted_out",
        "/x/c.gif": "opted_out",
        "/x/c.gif?v=1": "ok",
        "/bad/d.jpg": "ok",
        "/bool/e.jpg": "ok",
        "/free.jpg": "ok",
        "/reserved/header0.jpg": "ok",  # tdm-reservation: 0 on the response wins over the file
        "/header1.jpg": "opted_out",
    }
    with HostileServer() as srv:
        srv.routes["/.well-known/tdmrep.json"] = redirect("/policies/tdmrep.json")  # followed
        srv.routes["/policies/tdmrep.json"] = static(json.dumps(TDMREP).encode(), "application/json")
        serve_anything(srv, *{p.split("?")[0] for p in expected})
        srv.routes["/reserved/header0.jpg"] = static(b"img", "image/jpeg", **{"tdm-reservation": "0"})
        srv.routes["/header1.jpg"] = static(
            b"img", "image/jpeg", **{"tdm-reservation": "1", "tdm-policy": "https://example.org/p"}
        )
        f = fetcher(srv, tdmrep=True, robots_txt=False)
        got = {p: f.fetch(srv.url + p) for p in expected}
        assert {p: r.status for p, r in got.items()} == expected
        assert got["/reserved/a.jpg"].error == (
            f"{srv.url}/.well-known/tdmrep.json: location '/reserved/' has tdm-reservation 1 "
            "(tdm-policy: https://example.org/policy.json)"
        )
        assert got["/header1.jpg"].error == "tdm-reservation: 1 (tdm-policy: https://example.org/p)"
        assert requests_for(srv, "/.well-known/tdmrep.json") == 1

        off = fetcher(srv, tdmrep=False, robots_txt=False)
        assert {off.fetch(srv.url + p).status for p in ("/reserved/a.jpg", "/header1.jpg")} == {"ok"}


@pytest.mark.parametrize("body", [b"not json", b'{"location": "/", "tdm-reservation": 1}', b"[1, 2, null]"])
def test_a_tdmrep_json_that_is_no_array_of_rules_reserves_nothing(body):
    with HostileServer() as srv:
        srv.routes["/.well-known/tdmrep.json"] = static(body, "application/json")
        serve_anything(srv, "/a.jpg")
        assert fetcher(srv, tdmrep=True, robots_txt=False).fetch(f"{srv.url}/a.jpg").status == "ok"
