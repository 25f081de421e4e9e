"""The registry audit of CI (scripts/registry_audit.py) against a local registry that answers project JSON
the way the real one does: yanked releases and vulnerabilities of the latest release fail; older releases
are counted as unchecked; an unreachable registry is exit 2, never a pass."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "registry_audit", Path(__file__).parents[1] / "scripts" / "registry_audit.py"
)
registry_audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(registry_audit)

# As the registry lists pycrypto 2.6.1's (abridged): one advisory under two ids.
VULNS = [
    {"id": "PYSEC-2018-97", "aliases": ["CVE-2018-6594"], "fixed_in": [], "link": "", "withdrawn": None},
    {"id": "GHSA-6528-wvf6-f6qg", "aliases": ["CVE-2018-6594"], "fixed_in": [], "withdrawn": None},
    {"id": "PYSEC-2013-1", "aliases": [], "fixed_in": ["2.6.1"], "withdrawn": "2024-01-01T00:00:00Z"},
]


def project(version: str, latest: str, vulns=(), yanked: str | None = None) -> dict:
    files = [{"filename": f"x-{version}.tar.gz", "yanked": yanked is not None, "yanked_reason": yanked}]
    return {"info": {"version": latest}, "releases": {version: files}, "vulnerabilities": list(vulns)}


def test_vulnerabilities_of_the_latest_release_fail_once_per_advisory():
    findings, how = registry_audit.audit("pycrypto", "2.6.1", project("2.6.1", "2.6.1", VULNS), set())
    assert how == "exact" and len(findings) == 1
    assert "CVE-2018-6594" in findings[0] and "no fixed release" in findings[0]
    assert (
        registry_audit.audit("pycrypto", "2.6.1", project("2.6.1", "2.6.1", VULNS), {"CVE-2018-6594"})[0]
        == []
    )


def test_an_older_release_is_unchecked_not_passed_and_yanked_fails_anyway():
    findings, how = registry_audit.audit(
        "p", "1.0", project("1.0", "2.0", VULNS, yanked="broken wheel"), set()
    )
    assert how == "older" and findings == ["p 1.0 is yanked: broken wheel"]
    assert registry_audit.audit("p", "1.0", None, set()) == ([], "absent")


@pytest.fixture
def registry():
    """Answers /pypi/<name>/json for every installed distribution, as if each were the latest release;
    ``pyyaml`` gets the advisories above."""
    versions = {
        registry_audit.canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.split("/")[2]
            if name not in versions:
                self.send_error(404)
                return
            v = versions[name]
            body = json.dumps(project(v, v, VULNS if name == "pyyaml" else ())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    server.shutdown()
    server.server_close()


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["registry_audit", *args])
    code = registry_audit.main()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_whole_environment_against_a_registry(monkeypatch, capsys, registry, tmp_path):
    code, out = run(monkeypatch, capsys, "--index", registry)
    assert code == 1 and "FAIL pyyaml" in out and out.count("FAIL") == 1
    (tmp_path / "ignore").write_text("CVE-2018-6594  # accepted: no fix, not reachable from curate\n")
    code, out = run(monkeypatch, capsys, "--index", registry, "--ignore", str(tmp_path / "ignore"))
    assert code == 0 and "FAIL" not in out and "not for 0 older releases" in out


def test_an_unreachable_registry_is_not_a_pass(monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = run(monkeypatch, capsys, "--index", f"http://127.0.0.1:{port}/pypi")
    assert code == 2 and "nothing was checked" in out


def test_the_locked_set_every_release_of_every_fork(monkeypatch, capsys, registry, tmp_path):
    """--lock audits what uv.lock pins, installed or not: both releases of a name pinned twice, never the
    project itself; the installed pyyaml fails as before, an older pinned pyyaml is counted as unchecked."""
    pyyaml = importlib.metadata.version("pyyaml")
    (tmp_path / "uv.lock").write_text(
        'version = 1\n\n[[package]]\nname = "curate"\nversion = "0.1.0"\nsource = { editable = "." }\n\n'
        f'[[package]]\nname = "PyYAML"\nversion = "{pyyaml}"\nsource = {{ registry = "https://x/simple" }}\n\n'
        '[[package]]\nname = "pyyaml"\nversion = "1.0"\nsource = { registry = "https://x/simple" }\n\n'
        '[[package]]\nname = "not-here"\nversion = "2.0"\nsource = { registry = "https://x/simple" }\n\n'
        '[[package]]\nname = "local"\nversion = "0.1"\nsource = { directory = "vendor/local" }\n'
    )
    code, out = run(monkeypatch, capsys, "--index", registry, "--lock", str(tmp_path / "uv.lock"))
    assert code == 1 and out.count("FAIL") == 1 and f"FAIL pyyaml {pyyaml}" in out
    assert "3 releases of 2 packages" in out and "pyyaml==1.0" in out and "not-here==2.0" in out
    assert "curate" not in out and "local" not in out
