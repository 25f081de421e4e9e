"""The weights a pipeline needs: listed, checked before a run, and fetched for air-gapped clusters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.base import ModelNotFound
from curate.models.weights import (
    WeightsSpec,
    fetch,
    is_offline,
    local_path,
    model_dir,
    source_host,
    unreachable,
)

__all__ = [
    "WeightsStatus",
    "check_weights",
    "fetch_weights",
    "pipeline_weights",
    "plan_weights",
    "raise_missing",
]


@dataclass
class WeightsStatus:
    stage: str
    spec: WeightsSpec
    path: Path
    present: bool
    error: str | None = None


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


def status(pipeline) -> list[WeightsStatus]:
    """One entry per model: present when any of its files is in the model directory."""
    out = []
    for group in _alternatives(pipeline_weights(pipeline)):
        here = [(st, spec) for st, spec in group if local_path(spec).exists()]
        st, spec = (here or group)[0]
        out.append(WeightsStatus(st, spec, local_path(spec), bool(here)))
    return out


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


def fetch_weights(pipeline) -> list[WeightsStatus]:
    """Download every missing file into the model directory; one entry per model, with its error if any."""
    out = []
    for group in _alternatives(pipeline_weights(pipeline)):
        present = [(st, spec) for st, spec in group if local_path(spec).exists()]
        if present:
            st, spec = present[0]
            out.append(WeightsStatus(st, spec, local_path(spec), True))
            continue
        got, errors = None, []
        if is_offline():
            errors.append("offline: CURATE_OFFLINE or HF_HUB_OFFLINE is set")
        else:
            for st, spec in group:
                try:
                    got = WeightsStatus(st, spec, _fetch(spec), True)
                    break
                except Exception as e:  # every failure is reported with its source; the next file is tried
                    errors.append(f"{spec.source}: {e}")
        st, spec = group[0]
        out.append(got or WeightsStatus(st, spec, local_path(spec), False, "; ".join(errors)))
    return out


def _fetch(spec: WeightsSpec) -> Path:
    """A file, or a whole hub repository (a transformers model) for a :class:`~curate.models.hub.RepoSpec`."""
    from curate.models.hub import RepoSpec, fetch_repo

    return fetch_repo(spec) if isinstance(spec, RepoSpec) else fetch(spec)


def check_weights(pipeline) -> None:
    """Before a run: every model's weights are in the model directory or can be downloaded now.

    Downloads what is missing (so a run never stops halfway for a file it could not get) and raises
    :class:`ModelNotFound` naming every model that is still missing and where to put it.
    """
    raise_missing([s for s in fetch_weights(pipeline) if not s.present])


def raise_missing(missing: list[WeightsStatus]) -> None:
    if missing:
        lines = [f"  {s.stage}: {s.spec.name}: put {s.spec.source} at {s.path} ({s.error})" for s in missing]
        raise ModelNotFound(
            f"{len(missing)} model(s) missing from the model directory {model_dir()} and not downloadable:\n"
            + "\n".join(lines)
            + "\nRun `curate models fetch PIPELINE.yaml` where the hub is reachable, then copy the model "
            "directory (set CURATE_MODEL_DIR to it) here"
        )
