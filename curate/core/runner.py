"""A run from start to end: check, plan, resume, execute every phase, fit global stages, record.

Resume is by files: a shard whose ``_stats.json`` exists is done and skipped; anything else is redone.
``run.json`` records the config fingerprint; a rerun with another config refuses to touch the output unless
told to start over (``overwrite``) or to go on anyway (``resume_anyway``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import platform
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from curate.core.config import PipelineConfig, canonical_json
from curate.core.output import OutputFolder, RunSummary, collect_output, driver_identity
from curate.core.pipeline import PhaseShards, Pipeline, ShardResult
from curate.core.progress import RunProgress, stage_table, summary_table
from curate.core.reader import InputReader, ShardSpec
from curate.core.storage import write_json_atomic
from curate.executors import make_executor
from curate.models.manage import check_weights, stand_in_record

__all__ = ["run_fingerprint", "run_pipeline"]

log = logging.getLogger(__name__)


def run_fingerprint(config: PipelineConfig, reader: InputReader, specs: list[ShardSpec]) -> str:
    """The config's output-relevant part plus the input files and their row counts."""
    files: dict[str, int] = Counter()
    for spec in specs:
        for seg in spec.segments:
            files[seg.path] += seg.stop - seg.start
    payload = {"config": config.output_relevant(), "input": sorted(files.items())}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


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
) -> RunSummary:
    console = console or Console(stderr=True)
    start = time.perf_counter()
    pipeline = Pipeline(config)
    pipeline.check()
    check_weights(pipeline)  # a missing model fails now, not after hours of downloads
    specs = pipeline.reader.plan(config.shard_size)
    fingerprint = run_fingerprint(config, pipeline.reader, specs)

    executor = make_executor(config.executor)
    executor.check()
    with executor:
        return _run(
            pipeline, executor, specs, fingerprint, overwrite, resume_anyway, console, show_progress, start
        )


def _run(
    pipeline: Pipeline,
    executor: Any,
    specs: list[ShardSpec],
    fingerprint: str,
    overwrite: bool,
    resume_anyway: bool,
    console: Console,
    show_progress: bool,
    start: float,
) -> RunSummary:
    """The run inside the executor: plan (a plan that cannot fit stops here, before any work), record it in
    run.json, then every phase."""
    config = pipeline.config
    plan = executor.prepare(pipeline.phases())
    if show_progress:
        for note in plan.notes:
            console.print(f"plan: {note}", highlight=False)
    out = OutputFolder(config.output.path)
    previous = out.prepare(fingerprint, overwrite, resume_anyway)
    out.clean_temp()
    info: dict[str, Any] = {
        "name": config.name,
        "fingerprint": fingerprint,
        "config": config.to_dict(),
        "input_files": sorted({seg.path for s in specs for seg in s.segments}),
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
    if previous and previous.get("fingerprint") != fingerprint:
        info["resumed_from_fingerprint"] = previous.get("fingerprint")
    out.write_run(info)

    phases = pipeline.phases()
    jobs = [pipeline.job(k) for k in range(len(phases))]
    needed = _needed(pipeline, jobs, specs, out)
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
            if job.index > 0 and not _fit(pipeline, executor, job.index, specs, out, console):
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


def _needed(pipeline: Pipeline, jobs: list, specs: list[ShardSpec], out: OutputFolder) -> dict[int, set[str]]:
    """Which shards each phase must (re)do: the final phase every unfinished shard; an earlier phase what the
    next one needs, or every shard while the global stage after it has not fitted."""
    last = len(jobs) - 1
    needed = {last: {s.id for s in specs if not jobs[last].done(s)}}
    for k in range(last - 1, -1, -1):
        fitted = out.fs.exists(out.global_done(pipeline.phases()[k + 1][0].name))
        consumers = needed[k + 1] if fitted else {s.id for s in specs}
        needed[k] = {s.id for s in specs if s.id in consumers and not jobs[k].done(s)}
    return needed


def _fit(
    pipeline: Pipeline, executor: Any, index: int, specs: list[ShardSpec], out: OutputFolder, console: Console
) -> bool:
    """Fit the global stage that opens phase ``index`` on every shard of the phase before, once, where the
    executor puts it (a GPU node, for semantic dedup on a cluster with GPUs)."""
    bound = pipeline.phases()[index][0]
    state, done = out.global_state(bound.name), out.global_done(bound.name)
    if out.fs.exists(done):
        return True
    prev = pipeline.job(index - 1)
    missing = [s.id for s in specs if not prev.done(s)]
    if missing:
        console.print(f"[red]global stage {bound.name!r} cannot start: {len(missing)} shard(s) are not ready")
        return False
    if out.fs.exists(state):
        out.fs.rm(state, recursive=True)
    out.fs.makedirs(state, exist_ok=True)
    start = time.perf_counter()
    executor.fit(bound, PhaseShards(pipeline.config.output.path, prev.sink_dir, [s.id for s in specs]))
    write_json_atomic(out.fs, done, {"seconds": time.perf_counter() - start, "finished": _now()})
    return True
