"""A run from start to end: check, plan, resume, execute every phase, fit global stages, record.

Resume is by files: a shard whose ``_stats.json`` exists is done and skipped; anything else is redone.
``run.json`` records the config fingerprint; a rerun with another config refuses to touch the output unless
told to start over (``overwrite``) or to go on anyway (``resume_anyway``).

A run grows (:mod:`curate.core.grow`): input that is new since (files that now match ``input.path``, or
``add``) becomes new shards, and a global stage that fitted on the old shards decides again over all of
them, rewriting the old shards whose rows' decisions change, without running their stages again.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from rich.console import Console

from curate.core.config import PipelineConfig
from curate.core.grow import (
    InputPlan,
    Redecision,
    apply_changes,
    fitted_shards,
    input_fingerprint,
    plan_input,
    read_shard,
    redecidable,
    rewrite_shard,
)
from curate.core.output import OutputFolder, RunSummary, collect_output, driver_identity
from curate.core.pipeline import PhaseShards, Pipeline, ShardResult
from curate.core.progress import RunProgress, stage_table, summary_table
from curate.core.reader import InputReader, ShardSpec
from curate.core.storage import read_json, write_json_atomic
from curate.executors import make_executor
from curate.models.manage import check_weights, stand_in_record

__all__ = ["run_fingerprint", "run_pipeline"]

log = logging.getLogger(__name__)


def run_fingerprint(config: PipelineConfig, reader: InputReader, specs: list[ShardSpec]) -> str:
    """The config's output-relevant part plus the input files and their row counts."""
    return input_fingerprint(config, specs)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("curate", "pyarrow", "ray", "pydantic", "fsspec", "numpy", "pillow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_pipeline(
    config: PipelineConfig,
    *,
    overwrite: bool = False,
    resume_anyway: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    add: list[str] | None = None,
) -> RunSummary:
    """Run (or resume, or grow) the pipeline. ``add``: inputs (a file, a glob, a folder) to add to the run
    in ``output.path``; run.json keeps them, so later runs read them too (see :mod:`curate.core.grow`)."""
    console = console or Console(stderr=True)
    start = time.perf_counter()
    pipeline = Pipeline(config)
    pipeline.check()
    check_weights(pipeline)  # a missing model fails now, not after hours of downloads
    previous = None if overwrite else OutputFolder(config.output.path).read_run()
    plan = plan_input(config, previous, add or [])

    executor = make_executor(config.executor)
    executor.check()
    with executor:
        return _run(pipeline, executor, plan, overwrite, resume_anyway, console, show_progress, start)


def _run(
    pipeline: Pipeline,
    executor: Any,
    inputs: InputPlan,
    overwrite: bool,
    resume_anyway: bool,
    console: Console,
    show_progress: bool,
    start: float,
) -> RunSummary:
    """The run inside the executor: plan (a plan that cannot fit stops here, before any work), record it in
    run.json, then every phase."""
    config = pipeline.config
    specs, fingerprint = inputs.specs, inputs.fingerprint
    known = [s.id for s in inputs.known]
    plan = executor.prepare(pipeline.phases())
    if show_progress:
        for note in plan.notes:
            console.print(f"plan: {note}", highlight=False)
    out = OutputFolder(config.output.path)
    previous = out.prepare(inputs.previous_fingerprint, overwrite, resume_anyway)
    out.clean_temp()
    for phase in pipeline.phases()[1:]:
        fitted = fitted_shards(out, phase[0].name, known)
        if fitted is not None and not {s.id for s in specs} <= fitted:
            redecidable(pipeline, "growing a run with a global stage")
    info: dict[str, Any] = {
        "name": config.name,
        "fingerprint": fingerprint,
        "config": config.to_dict(),
        "input_files": inputs.files,
        "inputs": inputs.groups,
        "added_inputs": inputs.added_inputs,
        "shards_total": len(specs),
        "rows_total": sum(s.rows for s in specs),
        "versions": _versions(),
        "executor": config.executor.kind,
        "started": _now(),
        "finished": None,
        "status": "running",
        "command": " ".join(sys.argv),
        "driver": driver_identity(),
        "stand_ins": stand_in_record(pipeline),  # models here as random weights: outputs mean nothing
        "plan": plan.to_dict(),
    }
    if previous and previous.get("fingerprint") != inputs.previous_fingerprint:
        info["resumed_from_fingerprint"] = previous.get("fingerprint")
    if previous and inputs.grows:
        info["grown_from"] = {"fingerprint": previous.get("fingerprint"), "shards": len(inputs.known)}
    for key in ("retries", "grown_from"):  # what a run that goes on keeps of the runs before
        if previous and key in previous and key not in info:
            info[key] = previous[key]
    out.write_run(info)

    phases = pipeline.phases()
    jobs = [pipeline.job(k) for k in range(len(phases))]
    needed = _needed(pipeline, jobs, specs, out, known)
    failed: dict[str, str] = {}
    ran: list[str] = []

    def on_result(result: ShardResult) -> None:
        if result.ok:
            if job.final:
                ran.append(result.shard)
            if out.fs.exists(out.shard_failed(result.shard)):
                out.fs.rm_file(out.shard_failed(result.shard))
        else:
            failed[result.shard] = result.error or ""
            out.fs.makedirs(out.shards_dir, exist_ok=True)
            write_json_atomic(
                out.fs,
                out.shard_failed(result.shard),
                {
                    "shard": result.shard,
                    "phase": job.index,
                    "attempts": result.attempts,
                    "error": result.error,
                },
            )
        progress.update(result)

    with RunProgress(console, show_progress) as progress:
        for job in jobs:
            if job.index > 0 and not _fit(pipeline, executor, job.index, specs, out, console, known):
                break
            todo = [s for s in specs if s.id in needed[job.index]]
            label = "shards" if job.final else f"phase {job.index + 1}/{len(jobs)}"
            progress.phase(label, len(todo), len(specs) - len(todo) if job.final else 0)
            executor.run_phase(job, todo, on_result)
            if failed and not job.final:
                console.print(
                    f"[red]{len(failed)} shard(s) failed before global stage {phases[job.index + 1][0].name!r}, "
                    "which needs every shard; fix the cause and run again"
                )
                break

    out.clean_temp()
    summary = collect_output(out)
    summary.seconds = time.perf_counter() - start
    summary.ran = sorted(ran)
    summary.skipped = len(specs) - len(needed[len(jobs) - 1])
    if summary.exit_code == 0 and len(jobs) > 1:
        out.remove_work()  # intermediate phases are no longer needed
    info.update(
        finished=_now(),
        status="finished" if summary.exit_code == 0 else "incomplete",
        seconds=round(summary.seconds, 3),
        counts=summary.counts,
        shards_done=len(summary.shards_done),
        shards_failed=sorted(summary.shards_failed),
    )
    out.write_run(info)
    if config.output.report:
        _write_report(config.output.path)
    if show_progress:
        console.print(summary_table(summary.counts))
        if summary.stages:
            console.print(stage_table(summary.stages))
    return summary


def _write_report(path: str) -> None:
    """report/report.html and report.json; the report only looks at the run, so it never fails it."""
    try:
        from curate.tools.report import write_report

        write_report(path)
    except Exception as e:
        log.warning("could not write the run report in %s/report (curate report OUTPUT retries): %r", path, e)


def _needed(
    pipeline: Pipeline, jobs: list, specs: list[ShardSpec], out: OutputFolder, known: list[str]
) -> dict[int, set[str]]:
    """Which shards each phase must (re)do: the final phase every unfinished shard; an earlier phase what the
    next one needs, or every shard while the global stage after it has not fitted, or, where the run grew
    since it fitted, every shard but the finished ones it fitted on (those are read from their sidecars)."""
    last = len(jobs) - 1
    ids = {s.id for s in specs}
    needed = {last: {s.id for s in specs if not jobs[last].done(s)}}
    for k in range(last - 1, -1, -1):
        fitted = fitted_shards(out, pipeline.phases()[k + 1][0].name, known)
        if fitted is None:
            consumers = ids
        elif ids <= fitted:
            consumers = needed[k + 1]
        else:
            consumers = (ids - fitted) | needed[last]
        needed[k] = {s.id for s in specs if s.id in consumers and not jobs[k].done(s)}
    return needed


def _fit(
    pipeline: Pipeline,
    executor: Any,
    index: int,
    specs: list[ShardSpec],
    out: OutputFolder,
    console: Console,
    known: list[str],
) -> bool:
    """Fit the global stage that opens phase ``index`` on every shard of the phase before, once, where the
    executor puts it (a GPU node, for semantic dedup on a cluster with GPUs). Where the run grew since it
    fitted, it decides again over the finished shards it fitted on and the new ones (:func:`_refit`)."""
    bound = pipeline.phases()[index][0]
    state, done = out.global_state(bound.name), out.global_done(bound.name)
    ids = [s.id for s in specs]
    fitted = fitted_shards(out, bound.name, known)
    if fitted is not None and set(ids) <= fitted:
        _previous_left(out, bound.name, console)
        return True
    prev = pipeline.job(index - 1)
    settled = [] if fitted is None else [i for i in ids if i in fitted and out.fs.exists(out.shard_stats(i))]
    missing = [s.id for s in specs if s.id not in settled and not prev.done(s)]
    if missing:
        console.print(f"[red]global stage {bound.name!r} cannot start: {len(missing)} shard(s) are not ready")
        return False
    start = time.perf_counter()
    record: dict[str, Any] = {}
    decision = None
    if fitted is not None:
        decision = Redecision(pipeline, bound, "grow")
        record["grown"] = _refit(pipeline, executor, decision, prev.sink_dir, settled, ids)
    else:
        if out.fs.exists(state):
            out.fs.rm(state, recursive=True)
        out.fs.makedirs(state, exist_ok=True)
        executor.fit(bound, PhaseShards(pipeline.config.output.path, prev.sink_dir, ids))
    record |= {"seconds": time.perf_counter() - start, "finished": _now(), "shards": ids}
    write_json_atomic(out.fs, done, record)
    if decision is not None:
        decision.finish()  # only now: until _done names every shard, a rerun decides again from previous/
    return True


def _refit(
    pipeline: Pipeline,
    executor: Any,
    decision: Redecision,
    phase_dir: str | None,
    settled: list[str],
    ids: list[str],
) -> dict[str, Any]:
    """Decide the global stage again over the finished shards it fitted on (read from their sidecars, not
    run again) and the new ones waiting in ``phase_dir``; rewrite the finished shards whose rows' decisions
    change. Returns what it did, for ``_done``."""
    out, bound = pipeline.output, decision.bound
    images = "image" in bound.stage.reads
    has_images = any("image" in b.stage.writes for b in pipeline.stages)

    def load(shard: str):
        table = read_shard(out, shard, images)
        return table, np.zeros(table.num_rows, bool)

    fresh = [i for i in ids if i not in set(settled)]
    changes = decision.decide(settled, load, fresh, phase_dir, lambda shards: executor.fit(bound, shards))
    for shard, change in sorted(changes.items()):
        table = read_shard(out, shard, has_images)
        rewrite_shard(
            pipeline,
            shard,
            apply_changes(table, change),
            ("redecided", {"at": _now(), "by": "grow", "rows": len(change.positions)}),
        )
    return {
        "settled": len(settled),
        "new": len(fresh),
        "rewritten": sorted(changes),
        "rows_changed": sum(len(c.positions) for c in changes.values()),
        "left_dropped": decision.left_out,
    }


def _previous_left(out: OutputFolder, stage: str, console: Console) -> None:
    """A ``previous/`` state left by a decision killed after its last fit: gone after a grown run's (its
    shards were rewritten), kept after a retry's, whose shards may not be (curate retry finishes it)."""
    previous = out.global_previous(stage)
    if not out.fs.exists(previous):
        return
    by = read_json(out.fs, f"{previous}/_done").get("by") if out.fs.exists(f"{previous}/_done") else None
    if by == "retry":
        console.print(
            f"[yellow]a `curate retry` of this run was killed before it rewrote every shard its decision for "
            f"{stage!r} changes; run `curate retry {out.path}` again to finish it"
        )
    else:
        out.fs.rm(previous, recursive=True)
