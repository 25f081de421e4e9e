"""Peer tools (img2dataset, ...) in venvs of their own, for tests and benchmarks that run the real thing.

A peer's pins clash with curate's (img2dataset wants webdataset<0.3 and its own pandas, albumentations,
wandb), so each gets a venv under ``.bench-venv/<name>`` (git-ignored), made with the uv that ``make``
bootstraps into ``.uv/bin/uv``: a few seconds with a warm uv cache or a fast registry. The venv is made once
and reused while its stamp (``.installed``, written last) names the same packages. A venv that cannot be
made is a :class:`PeerInstallError` that says why (uv's own message): callers fail with it, never skip, as
CI has the registry.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["IMG2DATASET", "PEER_ENV", "PeerInstallError", "img2dataset", "peer_venv"]

REPO = Path(__file__).resolve().parents[2]
VENVS = REPO / ".bench-venv"
UV = REPO / ".uv" / "bin" / "uv"
BENCHMARK = REPO / "benchmarks" / "download_vs_img2dataset.py"

# What a peer needs in its environment to run offline and quietly on 127.0.0.1.
PEER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer release on import
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class PeerInstallError(RuntimeError):
    """A peer's venv could not be made (no uv, no registry, a failed resolve)."""


def _benchmark_pin() -> str:
    """img2dataset's pin, read from the download benchmark's source (not run): tests and benchmarks use
    the same release."""
    for node in ast.parse(BENCHMARK.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "IMG2DATASET" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise PeerInstallError(f"{BENCHMARK.relative_to(REPO)} has no IMG2DATASET pin")


IMG2DATASET: str = _benchmark_pin()


def _uv() -> str:
    if UV.exists():
        return str(UV)
    found = shutil.which("uv")
    if found is None:
        raise PeerInstallError(
            f"no uv: {UV.relative_to(REPO)} is missing (`make .uv/bin/uv` installs it) and none is on PATH"
        )
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One maker of a venv at a time (a test run and a benchmark may both ask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def peer_venv(name: str, packages: Sequence[str], *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The venv ``.bench-venv/<name>`` holding ``packages`` (pip requirement strings), made with uv on first
    use, for the Python running this; returns its folder. ``cache_dir`` sets uv's cache (default: uv's own).
    """
    venv = VENVS / name
    stamp = venv / ".installed"
    wanted = "\n".join([f"python {sys.version.split()[0]}", *packages])  # a venv is bound to its Python
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    with _locked(VENVS / f".{name}.lock"):
        if stamp.exists() and stamp.read_text() == wanted:  # made by another process while we waited
            return venv
        uv = _uv()
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
        if cache_dir is not None:
            env["UV_CACHE_DIR"] = str(cache_dir)
        python = venv / "bin" / "python"
        for cmd in (
            [uv, "venv", "-q", "--clear", "--python", sys.executable, str(venv)],
            [uv, "pip", "install", "-q", "--python", str(python), *packages],
        ):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            except subprocess.TimeoutExpired:
                shutil.rmtree(venv, ignore_errors=True)
                raise PeerInstallError(
                    f"{' '.join(cmd)}: no answer in 300 s (is the registry reachable?)"
                ) from None
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise PeerInstallError(
                    f"could not make the peer venv {venv.relative_to(REPO)} with {' '.join(packages)}: "
                    f"`{' '.join(cmd)}` exited with {done.returncode} (it needs the package registry once):\n"
                    + (done.stderr or done.stdout)[-3000:]
                )
        stamp.write_text(wanted)
    return venv


def img2dataset(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``img2dataset`` command of the benchmarks' release, in ``.bench-venv/img2dataset``."""
    return peer_venv("img2dataset", [IMG2DATASET], cache_dir=cache_dir) / "bin" / "img2dataset"
