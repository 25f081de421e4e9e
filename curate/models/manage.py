"""The weights a pipeline needs: listed, checked before a run, and fetched for air-gapped clusters.

A model here as a stand-in (random weights of the real architecture, :mod:`curate.models.stand_in`) is
present for a run, which then rehearses with it, and missing for :func:`fetch_weights`, which replaces it by
the real weights once they are downloaded (never before: a failed download leaves the stand-in in place).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.base import ModelNotFound
from curate.models.weights import (
    WeightsSpec,
    fetch,
    is_offline,
    is_stand_in,
    local_path,
    model_dir,
    source_host,
    stand_in_marker,
    unreachable,
)

__all__ = [
    "WeightsStatus",
    "check_weights",
    "fetch_weights",
    "pipeline_models",
    "pipeline_weights",
    "plan_weights",
    "raise_missing",
    "stand_in_record",
    "stand_ins",
]


@dataclass
class WeightsStatus:
    stage: str
    spec: WeightsSpec
    path: Path
    present: bool
    error: str | None = None
    stand_in: bool = False  # what is at path is a stand-in, not the real weights


def pipeline_weights(pipeline) -> list[tuple[str, WeightsSpec]]:
    """(stage name, spec) for every weights file the pipeline's stages resolve, each file once."""
    seen: set[str] = set()
    out = []
    for bound in pipeline.stages:
        for spec in bound.stage.weights():
            if spec.local not in seen:
                seen.add(spec.local)
                out.append((bound.name, spec))
    return out


def _alternatives(specs: list[tuple[str, WeightsSpec]]) -> list[list[tuple[str, WeightsSpec]]]:
    """Specs grouped by model: one model may come as either of several files (safetensors or .bin)."""
    groups: dict[tuple[str, str], list[tuple[str, WeightsSpec]]] = {}
    for stage, spec in specs:
        groups.setdefault((stage, spec.name), []).append((stage, spec))
    return list(groups.values())


def pipeline_models(pipeline) -> list[list[tuple[str, WeightsSpec]]]:
    """(stage name, spec) per model the pipeline loads: the files any one of which holds it."""
    return _alternatives(pipeline_weights(pipeline))


def status(pipeline) -> list[WeightsStatus]:
    """One entry per model: present when any of its files is in the model directory (real weights first,
    then a stand-in)."""
    out = []
    for group in _alternatives(pipeline_weights(pipeline)):
        here = [(st, spec) for st, spec in group if local_path(spec).exists()]
        here.sort(key=lambda entry: is_stand_in(local_path(entry[1])))  # stable: real ones first
        st, spec = (here or group)[0]
        path = local_path(spec)
        out.append(WeightsStatus(st, spec, path, bool(here), stand_in=bool(here) and is_stand_in(path)))
    return out


def stand_ins(pipeline) -> list[WeightsStatus]:
    """The pipeline's models that are here as stand-ins only (no real weights of theirs are here)."""
    return [s for s in status(pipeline) if s.present and s.stand_in]


def stand_in_record(pipeline) -> list[dict[str, Any]]:
    """What ``run.json`` records of the stand-ins a run loads: stage, model and path of each."""
    return [{"stage": s.stage, "model": s.spec.name, "path": str(s.path)} for s in stand_ins(pipeline)]


def plan_weights(pipeline) -> list[WeightsStatus]:
    """Like :func:`status`, without downloading: a missing model's ``error`` says why it cannot be fetched
    from here (offline, host unreachable); None means the run will download it."""
    out = []
    for entry in status(pipeline):
        if not entry.present:
            if is_offline():
                entry.error = "offline: CURATE_OFFLINE or HF_HUB_OFFLINE is set"
            else:
                entry.error = unreachable(*source_host(entry.spec))
        out.append(entry)
    return out


def fetch_weights(pipeline, *, replace_stand_ins: bool = True) -> list[WeightsStatus]:
    """Download every missing file into the model directory; one entry per model, with its error if any.

    With ``replace_stand_ins`` a model here as a stand-in only counts as missing: its real weights are
    downloaded beside it and take its place when complete; if they cannot be had, the entry is not present,
    is marked ``stand_in``, and its error says the stand-in stays."""
    out = []
    for group in _alternatives(pipeline_weights(pipeline)):
        here = [(st, spec) for st, spec in group if local_path(spec).exists()]
        real = [(st, spec) for st, spec in here if not is_stand_in(local_path(spec))]
        if real or (here and not replace_stand_ins):
            st, spec = (real or here)[0]
            path = local_path(spec)
            out.append(WeightsStatus(st, spec, path, True, stand_in=not real))
            continue
        got, errors = None, []
        if is_offline():
            errors.append("offline: CURATE_OFFLINE or HF_HUB_OFFLINE is set")
        else:
            for st, spec in here + [entry for entry in group if entry not in here]:  # a stand-in's file first
                try:
                    got = WeightsStatus(st, spec, _fetch(spec), True)
                    break
                except Exception as e:  # every failure is reported with its source; the next file is tried
                    errors.append(f"{spec.source}: {e}")
        if got:
            for _, other in here:  # a stand-in of another file of the model would be loaded before it
                if local_path(other) != got.path:
                    _remove_stand_in(local_path(other))
            out.append(got)
            continue
        st, spec = (here or group)[0]
        if here:
            errors.append(f"the stand-in (random weights) stays at {local_path(spec)}")
        out.append(WeightsStatus(st, spec, local_path(spec), False, "; ".join(errors), stand_in=bool(here)))
    return out


def _fetch(spec: WeightsSpec) -> Path:
    """A file, or a whole hub repository (a transformers model) for a :class:`~curate.models.hub.RepoSpec`.

    Where a stand-in is at the spec's path, the download goes to a name beside it (atomically, as every
    download does) and replaces the stand-in only when it is complete."""
    from curate.models.hub import RepoSpec, fetch_repo

    def download(s: WeightsSpec) -> Path:
        return fetch_repo(s) if isinstance(s, RepoSpec) else fetch(s)

    target = local_path(spec)
    if not is_stand_in(target):
        return download(spec)
    got = download(dataclasses.replace(spec, local=spec.local + ".fetched"))
    _replace_stand_in(got, target)
    return target


def _replace_stand_in(real: Path, target: Path) -> None:
    """Put the complete download ``real`` where the stand-in ``target`` is; its marker goes last, so that an
    interruption never leaves a stand-in that looks real."""
    marker = stand_in_marker(target)
    if target.is_dir():
        aside = target.with_name(f".{target.name}.stand-in-replaced")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
        os.replace(real, target)
        shutil.rmtree(aside)
    else:
        os.replace(real, target)
        marker.unlink(missing_ok=True)


def _remove_stand_in(path: Path) -> None:
    if not is_stand_in(path):
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        marker = stand_in_marker(path)
        path.unlink()
        marker.unlink(missing_ok=True)


def check_weights(pipeline) -> None:
    """Before a run: every model's weights (or a stand-in of them) are in the model directory or can be
    downloaded now.

    Downloads what is missing (so a run never stops halfway for a file it could not get) and raises
    :class:`ModelNotFound` naming every model that is still missing and where to put it. A stand-in counts
    as present: the run rehearses with it.
    """
    raise_missing([s for s in fetch_weights(pipeline, replace_stand_ins=False) if not s.present])


def raise_missing(missing: list[WeightsStatus]) -> None:
    if missing:
        lines = [f"  {s.stage}: {s.spec.name}: put {s.spec.source} at {s.path} ({s.error})" for s in missing]
        raise ModelNotFound(
            f"{len(missing)} model(s) missing from the model directory {model_dir()} and not downloadable:\n"
            + "\n".join(lines)
            + "\nRun `curate models fetch PIPELINE.yaml` where the hub is reachable, then copy the model "
            "directory (set CURATE_MODEL_DIR to it) here"
        )
