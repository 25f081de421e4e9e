"""Peer tools (img2dataset, clip-retrieval's client, ...) in venvs of their own, for tests and benchmarks that
run the real thing.

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

__all__ = [
    "CLIP_CLIENT_LOADER",
    "CLIP_RETRIEVAL",
    "IMG2DATASET",
    "PEER_ENV",
    "PeerInstallError",
    "clip_client_python",
    "img2dataset",
    "peer_venv",
]

REPO = Path(__file__).resolve().parents[2]
VENVS = REPO / ".bench-venv"
UV = REPO / ".uv" / "bin" / "uv"
BENCHMARK = REPO / "benchmarks" / "download_vs_img2dataset.py"
CLIP_BENCHMARK = REPO / "benchmarks" / "clip_vs_clip_retrieval.py"

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


def _benchmark_pin(benchmark: Path = BENCHMARK, name: str = "IMG2DATASET") -> str:
    """A peer's pin, read from a benchmark's source (not run): tests and benchmarks use the same release."""
    for node in ast.parse(benchmark.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise PeerInstallError(f"{benchmark.relative_to(REPO)} has no {name} pin")


IMG2DATASET: str = _benchmark_pin()
CLIP_RETRIEVAL: str = _benchmark_pin(CLIP_BENCHMARK, "CLIP_RETRIEVAL")


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


def peer_venv(
    name: str,
    packages: Sequence[str],
    *,
    no_deps: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The venv ``.bench-venv/<name>`` holding ``packages`` (pip requirement strings) and ``no_deps`` (installed
    without their dependencies), made with uv on first use, for the Python running this; returns its folder.
    ``cache_dir`` sets uv's cache (default: uv's own).
    """
    venv = VENVS / name
    stamp = venv / ".installed"
    # A venv is bound to its Python.
    wanted = "\n".join([f"python {sys.version.split()[0]}", *packages, *(f"--no-deps {p}" for p in no_deps)])
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
        commands = [[uv, "venv", "-q", "--clear", "--python", sys.executable, str(venv)]]
        if packages:
            commands.append([uv, "pip", "install", "-q", "--python", str(python), *packages])
        if no_deps:
            commands.append([uv, "pip", "install", "-q", "--no-deps", "--python", str(python), *no_deps])
        for cmd in commands:
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
                    f"could not make the peer venv {venv.relative_to(REPO)} with {' '.join([*packages, *no_deps])}: "
                    f"`{' '.join(cmd)}` exited with {done.returncode} (it needs the package registry once):\n"
                    + (done.stderr or done.stdout)[-3000:]
                )
        stamp.write_text(wanted)
    return venv


def img2dataset(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``img2dataset`` command of the benchmarks' release, in ``.bench-venv/img2dataset``."""
    return peer_venv("img2dataset", [IMG2DATASET], cache_dir=cache_dir) / "bin" / "img2dataset"


# Loads clip-retrieval's client module by its path: the package's __init__ imports the back end (flask, faiss,
# torch), which the client venv does not have. A prefix of the script given to ``python -c``.
CLIP_CLIENT_LOADER = """
import importlib.util, pathlib
_pkg = importlib.util.find_spec("clip_retrieval")
_spec = importlib.util.spec_from_file_location(
    "clip_client", pathlib.Path(_pkg.submodule_search_locations[0]) / "clip_client.py"
)
clip_client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip_client)
ClipClient, Modality = clip_client.ClipClient, clip_client.Modality
"""


def clip_client_python(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """The python of ``.bench-venv/clip-client``: clip-retrieval's published wheel (the release of
    ``benchmarks/clip_vs_clip_retrieval.py``) without its dependencies (torch, faiss, flask, ...), and
    ``requests``, all that its ``clip_client`` module imports. Run :data:`CLIP_CLIENT_LOADER` first."""
    venv = peer_venv("clip-client", ["requests>=2.28"], no_deps=[CLIP_RETRIEVAL], cache_dir=cache_dir)
    return venv / "bin" / "python"
