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
import os
import platform
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from curate.base import ConfigError
from curate.core.config import PipelineConfig, canonical_json
from curate.core.pipeline import PhaseShards, Pipeline, ShardResult
from curate.core.progress import RunProgress, stage_table, summary_table
from curate.core.reader import InputReader, ShardSpec
from curate.core.storage import TMP_MARK, clean_temp, filesystem, read_json, write_json_atomic
from curate.executors import make_executor
from curate.models.manage import check_weights

__all__ = ["RunSummary", "collect_output", "driver_alive", "run_fingerprint", "run_pipeline"]

log = logging.getLogger(__name__)

# What curate owns inside an output folder; --overwrite removes these and nothing else.
OWNED = ("run.json", "shards", "dropped", "work", "global", "embeddings", "dedup", "index", "report")


@dataclass
class RunSummary:
    output: str
    shards_total: int
    shards_done: list[str]
    shards_failed: dict[str, str]
    counts: dict[str, Any]
    stages: dict[str, dict[str, float]]
    seconds: float
    skipped: int = 0
    ran: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if not self.shards_failed and len(self.shards_done) == self.shards_total else 1


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, from /proc), to tell it from a later one that got
    its pid; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def driver_identity() -> dict[str, Any]:
    """The process that runs the pipeline, as run.json records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def driver_alive(driver: dict[str, Any] | None) -> bool | None:
    """Whether the driver recorded in run.json still runs: None when that cannot be told from here (another
    host, or a run.json older than the record)."""
    if not driver or driver.get("host") != socket.gethostname():
        return None
    pid = driver["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has that pid now, or the run's user is another
        pass
    start = _process_start(pid)
    return not (start and driver.get("start") and start != driver["start"])


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


class OutputDir:
    def __init__(self, path: str):
        self.path = path
        self.fs, self.root = filesystem(path)

    def run_json(self) -> dict[str, Any] | None:
        p = f"{self.root}/run.json"
        return read_json(self.fs, p) if self.fs.exists(p) else None

    def prepare(self, fingerprint: str, overwrite: bool, resume_anyway: bool) -> dict[str, Any] | None:
        """Make the folder ready for this run; refuse to mix two configs' outputs. Returns the old run.json."""
        previous = self.run_json()
        if overwrite:
            self.wipe()
            previous = None
        elif previous is None:
            if self.fs.exists(self.root) and self._foreign_entries():
                raise ConfigError(
                    [
                        (
                            "output.path",
                            f"{self.path} is not empty and holds no run.json; choose an empty folder "
                            "or pass --overwrite to let curate write there",
                        )
                    ]
                )
        elif previous.get("fingerprint") != fingerprint and not resume_anyway:
            raise ConfigError(
                [
                    (
                        "output.path",
                        f"{self.path} holds a run of another config or input (fingerprint "
                        f"{previous.get('fingerprint')}, this one {fingerprint}); pass --overwrite to start over, or "
                        "--resume-anyway to keep its finished shards and go on with this config",
                    )
                ]
            )
        self.fs.makedirs(self.root, exist_ok=True)
        return previous

    def _foreign_entries(self) -> list[str]:
        """What the folder holds besides a temporary ``run.json`` left by a run killed while writing it: that
        run had written nothing else yet, and the folder is as good as empty (``clean_temp`` removes it)."""
        own = f"run.json{TMP_MARK}"
        return [p for p in self.fs.ls(self.root, detail=False) if not p.rsplit("/", 1)[-1].startswith(own)]

    def wipe(self) -> None:
        for name in OWNED:
            p = f"{self.root}/{name}"
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def clean_temp(self) -> int:
        return clean_temp(self.fs, self.root) if self.fs.exists(self.root) else 0

    def failed_path(self, shard: str) -> str:
        return f"{self.root}/shards/{shard}_failed.json"


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

    out = OutputDir(config.output.path)
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
    }
    if previous and previous.get("fingerprint") != fingerprint:
        info["resumed_from_fingerprint"] = previous.get("fingerprint")
    write_json_atomic(out.fs, f"{out.root}/run.json", info)

    phases = pipeline.phases()
    jobs = [pipeline.job(k) for k in range(len(phases))]
    needed = _needed(pipeline, jobs, specs, out)
    failed: dict[str, str] = {}
    ran: list[str] = []

    def on_result(result: ShardResult) -> None:
        if result.ok:
            if job.final:
                ran.append(result.shard)
            if out.fs.exists(out.failed_path(result.shard)):
                out.fs.rm_file(out.failed_path(result.shard))
        else:
            failed[result.shard] = result.error or ""
            out.fs.makedirs(f"{out.root}/shards", exist_ok=True)
            write_json_atomic(
                out.fs,
                out.failed_path(result.shard),
                {
                    "shard": result.shard,
                    "phase": job.index,
                    "attempts": result.attempts,
                    "error": result.error,
                },
            )
        progress.update(result)

    with executor, RunProgress(console, show_progress) as progress:
        for job in jobs:
            if job.index > 0 and not _fit(pipeline, job.index, specs, out, console):
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
    summary = collect_output(config.output.path)
    summary.seconds = time.perf_counter() - start
    summary.ran = sorted(ran)
    summary.skipped = len(specs) - len(needed[len(jobs) - 1])
    if summary.exit_code == 0 and len(jobs) > 1 and out.fs.exists(f"{out.root}/work"):
        out.fs.rm(f"{out.root}/work", recursive=True)  # intermediate phases are no longer needed
    info.update(
        finished=_now(),
        status="finished" if summary.exit_code == 0 else "incomplete",
        seconds=round(summary.seconds, 3),
        counts=summary.counts,
        shards_done=len(summary.shards_done),
        shards_failed=sorted(summary.shards_failed),
    )
    write_json_atomic(out.fs, f"{out.root}/run.json", info)
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


def _needed(pipeline: Pipeline, jobs: list, specs: list[ShardSpec], out: OutputDir) -> dict[int, set[str]]:
    """Which shards each phase must (re)do: the final phase every unfinished shard; an earlier phase what the
    next one needs, or every shard while the global stage after it has not fitted."""
    last = len(jobs) - 1
    needed = {last: {s.id for s in specs if not jobs[last].done(s)}}
    for k in range(last - 1, -1, -1):
        fitted = out.fs.exists(f"{pipeline.phases()[k + 1][0].stage.state_path}/_done")
        consumers = needed[k + 1] if fitted else {s.id for s in specs}
        needed[k] = {s.id for s in specs if s.id in consumers and not jobs[k].done(s)}
    return needed


def _fit(pipeline: Pipeline, index: int, specs: list[ShardSpec], out: OutputDir, console: Console) -> bool:
    """Fit the global stage that opens phase ``index`` on every shard of the phase before, once."""
    bound = pipeline.phases()[index][0]
    state = bound.stage.state_path
    if out.fs.exists(f"{state}/_done"):
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
    bound.stage.fit(PhaseShards(pipeline.config.output.path, prev.sink_dir, [s.id for s in specs]))
    write_json_atomic(out.fs, f"{state}/_done", {"seconds": time.perf_counter() - start, "finished": _now()})
    return True


def collect_output(path: str) -> RunSummary:
    """Add up every shard's stats file: what ``curate status`` shows and what ``run.json`` records."""
    out = OutputDir(path)
    info = out.run_json() or {}
    counts: dict[str, Any] = {"rows": 0, "ok": 0, "kept": 0, "status": Counter(), "drop_reason": Counter()}
    stages: dict[str, dict[str, float]] = {}
    done: list[str] = []
    failed: dict[str, str] = {}
    shard_dir = f"{out.root}/shards"
    files = sorted(out.fs.ls(shard_dir, detail=False)) if out.fs.exists(shard_dir) else []
    for p in files:
        name = p.rsplit("/", 1)[-1]
        if name.endswith("_stats.json"):
            stats = read_json(out.fs, p)
            done.append(stats["shard"])
            for key in ("rows", "ok", "kept"):
                counts[key] += stats[key]
            counts["status"].update(stats["status"])
            counts["drop_reason"].update(stats["drop_reason"])
            for stage, t in stats.get("stages", {}).items():
                s = stages.setdefault(stage, {"seconds": 0.0, "rows": 0, "kept": 0})
                s["seconds"] += t["seconds"]
                s["rows"] += stats["rows"]
                s["kept"] += t["kept"]
        elif name.endswith("_failed.json"):
            f = read_json(out.fs, p)
            failed[f["shard"]] = f.get("error") or ""
    for shard in done:
        failed.pop(shard, None)
    order = ["read"] + [s["name"] for s in info.get("config", {}).get("stages", [])]
    stages = dict(sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    counts["status"] = dict(sorted(counts["status"].items()))
    counts["drop_reason"] = dict(sorted(counts["drop_reason"].items()))
    return RunSummary(
        output=path,
        shards_total=info.get("shards_total", len(done) + len(failed)),
        shards_done=sorted(done),
        shards_failed=failed,
        counts=counts,
        stages=stages,
        seconds=info.get("seconds", 0.0),
    )
