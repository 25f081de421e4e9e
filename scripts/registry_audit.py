"""Audit the installed packages with what the package registry itself answers, for CI.

``make audit`` runs pip-audit, which needs the registry's per-release JSON or the OSV service; where neither
can be reached (a registry mirror that serves project pages only, as on our CI machines) it can check
nothing. This check asks only for what such a mirror gives: the project JSON of each installed
distribution, or of each release a uv.lock pins (``--lock``: every release of every extra, so also those
a GPU node installs, before anything is installed). From it:

- **yanked**: the installed version is yanked on the registry (PEP 592), with the yank reason. Checked for
  every package.
- **vulnerable**: the project JSON lists the known vulnerabilities of the *latest* release. When the
  installed version is the latest, they are exactly its vulnerabilities: any that is not withdrawn fails.
  An older installed version cannot be checked this way: it is counted and named, never passed silently.

Exit 1 on a finding, 2 when the registry cannot be asked (so a network failure never reads as clean).
``--ignore FILE`` takes advisory ids (one per line, ``#`` comments) that are accepted, with a reason.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import re
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from pip._internal.models.index import PyPI  # the registry pip itself uses, so no host is named here


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(skip: set[str]) -> dict[str, str]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name and name not in skip:
            found[name] = dist.version
    return found


def locked(path: Path, skip: set[str]) -> dict[str, list[str]]:
    """Every registry release a uv.lock pins, by name (a lock may pin two releases of one name, one per
    Python or platform fork); the project itself and path or git sources are not on the registry."""
    found: dict[str, list[str]] = {}
    for package in tomllib.loads(path.read_text())["package"]:
        name = canonical(package["name"])
        if "registry" in package.get("source", {}) and name not in skip:
            found.setdefault(name, []).append(package["version"])
    return found


def project_json(name: str, base: str, attempts: int = 3) -> dict | None:
    """The registry's project JSON, None for a project it does not have; raises after ``attempts``."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{base}/{name}/json", timeout=30) as r:  # noqa: S310 - https base
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if attempt == attempts - 1:
                raise
        except (urllib.error.URLError, TimeoutError):
            if attempt == attempts - 1:
                raise
        time.sleep(0.5 * (attempt + 1))
    return None


def audit(name: str, version: str, data: dict | None, ignored: set[str]) -> tuple[list[str], str]:
    """(findings, coverage) for one package; coverage is 'exact', 'older' or 'absent'."""
    if data is None:
        return [], "absent"
    findings = []
    files = data.get("releases", {}).get(version) or []
    if files and all(f.get("yanked") for f in files):
        reason = files[0].get("yanked_reason") or "no reason given"
        findings.append(f"{name} {version} is yanked: {reason}")
    if data["info"]["version"] != version:
        return findings, "older"
    seen: set[str] = set()
    for v in data.get("vulnerabilities") or []:
        ids = {v.get("id"), *(v.get("aliases") or [])} - {None}
        if v.get("withdrawn") or ids & ignored or ids & seen:  # one advisory is often listed per database
            continue
        seen |= ids
        fixed = ", ".join(v.get("fixed_in") or []) or "no fixed release"
        findings.append(f"{name} {version}: {', '.join(sorted(ids))} (fixed in: {fixed}) {v.get('link', '')}")
    return findings, "exact"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ignore", type=Path, help="accepted advisory ids, one per line")
    ap.add_argument("--skip", action="append", default=["curate"], help="distributions not to check")
    ap.add_argument("--lock", type=Path, help="audit the releases this uv.lock pins, not the installed ones")
    ap.add_argument("--index", default=PyPI.pypi_url, help="the registry's JSON API base")
    args = ap.parse_args()
    ignored = set()
    if args.ignore and args.ignore.exists():
        lines = args.ignore.read_text().splitlines()
        ignored = {ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()}
    skip = {canonical(s) for s in args.skip}
    if args.lock:
        releases = locked(args.lock, skip)
    else:
        releases = {name: [version] for name, version in installed(skip).items()}
    packages = sorted(releases)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            pages = dict(
                zip(packages, pool.map(lambda n: project_json(n, args.index), packages), strict=True)
            )
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        print(f"registry audit: cannot reach the registry ({e}); nothing was checked", file=sys.stderr)
        return 2
    findings, coverage = [], {"exact": [], "older": [], "absent": []}
    for name in packages:
        for version in releases[name]:
            found, how = audit(name, version, pages[name], ignored)
            findings += found
            coverage[how].append(f"{name}=={version}")
    print(
        f"registry audit{f' of {args.lock}' if args.lock else ''}: {sum(map(len, releases.values()))} "
        f"releases of {len(packages)} packages; yanked releases checked for all; known vulnerabilities "
        f"checked for {len(coverage['exact'])} (the latest release), not for {len(coverage['older'])} older "
        f"releases; {len(coverage['absent'])} not on the registry"
    )
    if coverage["older"]:
        print(
            "  older than the latest release (vulnerabilities not checked here): "
            + ", ".join(coverage["older"])
        )
    if coverage["absent"]:
        print("  not on the registry: " + ", ".join(coverage["absent"]))
    for line in findings:
        print("  FAIL " + line)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
