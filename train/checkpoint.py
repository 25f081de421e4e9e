"""Checkpoints in safetensors: ``<output>/checkpoints/step-00000500/``

    model.safetensors       the denoiser (UNet + retrieval tokens); with LoRA only what is trained (the
                            adapters): the frozen UNet is the pretrained pipeline's
    ema.safetensors         its exponential moving average (when optim.ema_decay is set)
    optimizer.safetensors   AdamW's tensors, flattened as state.<param>.<name>; param groups in its metadata
    state.json              step, config, data position (batches consumed per rank and worker), the text
                            encoder and retrieval dimension; written last

A checkpoint is written under a temporary name and renamed into place, so a folder named ``step-*`` is
complete; older ones beyond ``checkpoint.keep`` are deleted after the new one is in place. Nothing here is
pickled: loading a checkpoint runs no code from it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["latest_checkpoint", "load_optimizer", "load_weights", "read_state", "save_checkpoint"]

PREFIX = "step-"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta.get("scalars", "{}")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    only: set[str] | None = None,
) -> Path:
    """Write checkpoint ``step``; ``only`` names the weights to keep (LoRA: the trained ones), default all."""
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file(_tensors(model, only), tmp / "model.safetensors")
        if ema is not None:
            save_file(_tensors(ema, only), tmp / "ema.safetensors")
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors", metadata=meta)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _tensors(module: torch.nn.Module, only: set[str] | None = None) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if only is None or k in only
    }


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output/checkpoints`` (or None)."""
    root = Path(output) / "checkpoints"
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").exists())
    return found[-1] if found else None


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json; ``checkpoint`` may be a checkpoint folder or a training output folder."""
    path = Path(checkpoint)
    if not (path / "state.json").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{checkpoint}: neither a checkpoint (state.json) nor a training output")
        path = latest
    state = json.loads((path / "state.json").read_text())
    state["path"] = str(path)
    return state


def load_weights(module: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Load ``path`` into ``module``; ``partial``: the file holds only some of its weights (LoRA adapters),
    each of which must exist in the module."""
    result = module.load_state_dict(load_file(str(path)), strict=not partial)
    if partial and result.unexpected_keys:
        raise ValueError(f"{path}: weights the model does not have: {result.unexpected_keys[:5]}")
