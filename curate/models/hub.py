"""Whole Hugging Face model repositories (config, weights, tokenizer, processor) as one model-directory entry.

A transformers model is a folder, not a file. ``model`` in a stage's config is either a local folder (used as
it is) or a hub id such as ``Qwen/Qwen2-VL-2B-Instruct``, which resolves as every weights file does
(:mod:`curate.models.weights`): the model directory at ``hf/<org>/<name>`` (``hf/<org>/<name>@<revision>``
for a revision other than ``main``), else a download of the repository's snapshot into that folder (to a
temporary name, renamed when complete) unless ``CURATE_OFFLINE`` / ``HF_HUB_OFFLINE`` is set, else
:class:`~curate.models.weights.ModelNotFound` naming ``curate models fetch``.

A snapshot skips what transformers does not load here: other frameworks' weights (TensorFlow, Flax, ONNX,
GGUF, ...) and, where the repository has safetensors, the same weights as pickles.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from curate.base import ConfigError, ModelNotFound
from curate.models.weights import WeightsSpec, cached_or_fetched, local_path, source_host, unreachable

__all__ = [
    "RepoSpec",
    "check_backend",
    "fetch_repo",
    "is_hub_id",
    "model_label",
    "repo_spec",
    "resolve_model",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NEVER = (
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.tflite",
    "*.mlmodel",
    "onnx/*",
    "coreml/*",
    "openvino/*",
    "original/*",
    "tf_model*",
    "flax_model*",
    "rust_model*",
)
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class RepoSpec(WeightsSpec):
    """A whole hub repository at a revision; ``local`` is its folder under the model directory."""

    revision: str = "main"

    @property
    def source(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf://{self.hub_repo}{rev}"


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(model)) and not Path(model).expanduser().exists()


def repo_spec(what: str, repo: str, revision: str = "main") -> RepoSpec:
    local = f"hf/{repo}" if revision == "main" else f"hf/{repo}@{revision}"
    return RepoSpec(f"{what} {repo}", local, hub_repo=repo, revision=revision)


def model_label(model: str, revision: str = "main") -> str:
    """What the ``*_model`` columns record: the hub id (with ``@revision`` when not main), or a local
    folder's name."""
    if is_hub_id(model):
        return model if revision == "main" else f"{model}@{revision}"
    return os.path.basename(str(model).rstrip("/")) or str(model)


def resolve_model(what: str, model: str, revision: str = "main", download: bool = True) -> Path:
    """The local folder of ``model``: an existing path as it is, else the hub id's model-directory folder,
    else a fresh download of its snapshot."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{what}: {path} is not a transformers model folder (no config.json in it)")
        return path
    if not is_hub_id(model):
        raise ModelNotFound(f"{what}: {model} is neither a local folder nor a hub id like org/name")
    spec = repo_spec(what, model, revision)
    return cached_or_fetched(
        spec,
        fetch_repo,
        download=download,
        noun="model",
        put="put a snapshot of {source} in that folder",
        instead="give a local folder as the stage's model",
    )


def fetch_repo(spec: RepoSpec) -> Path:
    """Download the snapshot of ``spec`` into the model directory (atomically) and return its folder."""

    def wanted(files: list[str]) -> list[str]:
        ignore = list(_NEVER)
        if any(f.endswith(".safetensors") for f in files):
            ignore += _PICKLES
        chosen = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in ignore)]
        if not any(f == "config.json" for f in chosen):
            raise ModelNotFound(f"{spec.source} has no config.json: not a transformers model")
        return chosen

    return fetch_snapshot(spec, wanted)


def fetch_snapshot(spec: RepoSpec, choose: Callable[[list[str]], list[str]]) -> Path:
    """Download the files ``choose`` picks from the hub repository's file list into the model directory, as
    one folder that appears whole (a temporary folder renamed into place), and return it; an existing folder
    is returned as it is. ``choose`` raises :class:`ModelNotFound` when the repository is not what is wanted."""
    target = local_path(spec)
    if target.exists():
        return target
    why = unreachable(*source_host(spec))
    if why:
        raise ModelNotFound(why)
    from huggingface_hub import HfApi, snapshot_download

    wanted = choose(HfApi().list_repo_files(spec.hub_repo or "", revision=spec.revision))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        got = Path(tmp) / "snapshot"
        snapshot_download(spec.hub_repo, revision=spec.revision, local_dir=got, allow_patterns=wanted)
        shutil.rmtree(got / ".cache", ignore_errors=True)  # huggingface_hub's own bookkeeping in local_dir
        os.replace(got, target)
    return target


def check_backend(stage: str, backend: str) -> None:
    """Fail when the stage is built, not on the first shard, when the backend's package is missing."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"stage {stage!r} with backend: vllm needs the vllm package, which is not installed: "
            "pip install 'curate[vllm]' (Linux with an NVIDIA GPU), or use backend: hf"
        )
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"stage {stage!r} needs {', '.join(missing)}: pip install 'curate[vlm]'")
