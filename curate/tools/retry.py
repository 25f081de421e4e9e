"""``curate retry OUTPUT``: fetch again only the rows that failed for a transient reason.

For each finished shard with such rows, the rows go through the pipeline's stages again as they came from
the input; every other row of the shard keeps what it had (its image comes back from the tar). The shard is
then rewritten with the usual atomic writer. Its completion marker is removed first, so a retry killed
midway leaves a shard that ``curate run`` redoes from the input; nothing is half-updated.

With a global stage (dedup), the retried rows go through the stages before it, are then decided against
the whole run (every row of it, as one run would: :mod:`curate.core.grow` decides again from the finished
shards' sidecars, scoring nothing again), then go through the stages after it. The rule where a recovered
row would displace a row the run kept is the one a single run applies: the same keep order. A recovered
row that beats a kept row by the keep order is kept and the other row becomes its duplicate, its shard
rewritten (its other columns as they were); a recovered row that loses is dropped as a duplicate of the
kept one; a row dropped before stays dropped. The whole run must be finished first (``curate run``), and
the pipeline must have one global stage and no stage after it that drops rows. A retry killed after
deciding leaves the state from before in ``global/<stage>/previous/``; ``curate retry`` again finishes it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console

from curate.base import ConfigError
from curate.core.config import parse_config
from curate.core.grow import Changes, Redecision, apply_changes, read_shard, redecidable, rewrite_shard
from curate.core.output import OutputFolder, collect_output, read_sidecar
from curate.core.pipeline import Pipeline
from curate.core.schema import COLUMNS, CORE_COLUMNS
from curate.core.stage import GlobalStage, set_column

DEFAULT_STATUSES = ("timeout", "connection_error", "http_429", "http_5xx")


@dataclass
class RetrySummary:
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    recovered: int = 0
    still: dict[str, int] = field(default_factory=dict)

    def add(self, shard: str, redone: pa.Table, console: Console) -> None:
        """Count one shard's retried rows (``redone``: them after the stages) and say how many came back."""
        statuses = redone["status"].to_pylist()
        recovered = statuses.count("ok")
        self.shards.append(shard)
        self.rows += len(statuses)
        self.recovered += recovered
        for s in statuses:
            if s != "ok":
                self.still[s] = self.still.get(s, 0) + 1
        console.print(f"shard {shard}: {recovered}/{len(statuses)} rows recovered")


def status_matcher(statuses: list[str]) -> re.Pattern:
    """``http_5xx`` stands for every 5xx status; other names match exactly."""
    parts = [
        re.escape(s).replace("xx", r"\d\d") if re.fullmatch(r"http_\dxx", s) else re.escape(s)
        for s in statuses
    ]
    return re.compile("^(?:" + "|".join(parts) + ")$")


def retry_output(
    output: str, statuses: list[str] | None = None, console: Console | None = None
) -> RetrySummary:
    console = console or Console(stderr=True)
    out = OutputFolder(output)
    info = out.read_run()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    # The shards are rewritten where they are read: in ``output``, also when the run was moved since.
    raw = {**info["config"], "output": {**info["config"].get("output", {}), "path": out.path}}
    config = parse_config(raw, source=out.as_given(out.run_json_path))
    pipeline = Pipeline(config)
    match = status_matcher(list(statuses or DEFAULT_STATUSES))
    if any(isinstance(b.stage, GlobalStage) for b in pipeline.stages):
        summary = _retry_with_global(pipeline, out, match, console)
    else:
        summary = _retry(pipeline, out, match, console)
    total = collect_output(out)
    info.setdefault("retries", []).append(
        {
            "at": _now(),
            "statuses": list(statuses or DEFAULT_STATUSES),
            "rows": summary.rows,
            "recovered": summary.recovered,
            "shards": summary.shards,
        }
    )
    info["counts"] = total.counts
    out.write_run(info)
    return summary


def _retry(pipeline: Pipeline, out: OutputFolder, match: re.Pattern, console: Console) -> RetrySummary:
    """Retry in a pipeline without a global stage: each shard on its own."""
    job = pipeline.job(0)
    summary = RetrySummary()
    fs = out.fs
    for shard in out.finished_shards():
        paths = out.shard_files(shard)
        with fs.open(paths["parquet"], "rb") as f:
            sidecar = read_sidecar(f)
        picked = [i for i, s in enumerate(sidecar["status"].to_pylist()) if s and match.match(s)]
        if not picked:
            continue
        start = time.perf_counter()
        has_images = any("image" in b.stage.writes for b in pipeline.stages)
        table = read_shard(out, shard, images=True) if has_images else sidecar
        fresh = _as_input(table.take(picked))
        timings: dict[str, Any] = {}
        redone = job.apply(pipeline.stages, fresh, timings)
        merged = _replace_rows(table, picked, redone)
        old_stats = out.read_stats(shard)
        fs.rm_file(paths["stats"])  # the shard is incomplete until the writer's marker is back
        recovered = sum(1 for s in redone["status"].to_pylist() if s == "ok")
        retried = {
            "rows": len(picked),
            "recovered": recovered,
            "at": _now(),
            "seconds": time.perf_counter() - start,
        }
        pipeline.writer.write(
            shard,
            merged,
            {"stages": old_stats.get("stages", {}), "retries": [*old_stats.get("retries", []), retried]},
        )
        summary.add(shard, redone, console)

    return summary


def _picked(out: OutputFolder, shard: str, match: re.Pattern) -> list[int]:
    with out.fs.open(out.shard_parquet(shard), "rb") as f:
        statuses = read_sidecar(f, columns=["status"])["status"].to_pylist()
    return [i for i, s in enumerate(statuses) if s and match.match(s)]


def _retry_with_global(
    pipeline: Pipeline, out: OutputFolder, match: re.Pattern, console: Console
) -> RetrySummary:
    """Retry in a pipeline with a global stage: the retried rows through the stages before it, one new
    decision of it over the whole run, then the retried rows through the stages after it; every shard
    with a retried row or a changed decision is rewritten (see the module docstring)."""
    bound = redecidable(pipeline, "curate retry")
    done = collect_output(out)
    if done.exit_code != 0:
        raise ConfigError(
            [
                (
                    "OUTPUT",
                    f"{out.path}: {done.shards_total - len(done.shards_done)} of {done.shards_total} shard(s) are "
                    f"not finished; the global stage {bound.name!r} decides over every shard, so finish the "
                    "run first (`curate run` again), then retry",
                )
            ]
        )
    phases = pipeline.phases()
    before, after = phases[0], phases[1][1:]
    job = pipeline.job(0)
    images = any("image" in b.stage.writes for b in pipeline.stages)
    shards = out.finished_shards()
    start = time.perf_counter()
    # The retried rows as they come to the global stage, by shard: (positions, rows).
    redone: dict[str, tuple[list[int], pa.Table]] = {}
    for shard in shards:
        picked = _picked(out, shard, match)
        if picked:
            table = read_shard(out, shard, images)
            redone[shard] = (picked, job.apply(before, _as_input(table.take(picked)), {}))

    def load(shard: str) -> tuple[pa.Table, np.ndarray]:
        table = read_shard(out, shard, images)
        fresh = np.zeros(table.num_rows, bool)
        if shard in redone:
            positions, rows = redone[shard]
            table = _replace_rows(table, positions, rows)
            fresh[positions] = True
        return table, fresh

    changes: dict[str, Changes] = {}
    decision = None
    if redone:
        decision = Redecision(pipeline, bound, "retry")
        changes = decision.decide(shards, load, [], None, bound.stage.fit)
    summary = RetrySummary()
    for shard in sorted(set(redone) | set(changes)):
        table = apply_changes(load(shard)[0], changes.get(shard))
        if shard in redone:
            positions, rows = redone[shard]
            assert decision is not None and decision.new is not None  # noqa: S101 - decided above
            rows = job.apply([*after], decision.new(rows), {})  # as they left the stages before
            table = _replace_rows(table, positions, rows)
            recovered = sum(1 for s in rows["status"].to_pylist() if s == "ok")
            seconds = time.perf_counter() - start
            note = (
                "retries",
                {"rows": len(positions), "recovered": recovered, "at": _now(), "seconds": seconds},
            )
            summary.add(shard, rows, console)
        else:
            note = ("redecided", {"at": _now(), "by": "retry", "rows": len(changes[shard].positions)})
        if shard in changes:
            console.print(
                f"shard {shard}: {len(changes[shard].positions)} row(s) decided again by {bound.name!r}"
            )
        rewrite_shard(pipeline, shard, table, note)
    if decision is not None:
        decision.finish()
    return summary


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _as_input(rows: pa.Table) -> pa.Table:
    """The rows as the input reader gave them: core and carried input columns, status reset."""
    keep = [c for c in rows.column_names if c in CORE_COLUMNS or c not in COLUMNS]
    rows = rows.select(keep)
    n = rows.num_rows
    for name, value in (
        ("status", pa.array(["ok"] * n, pa.string())),
        ("error", pa.nulls(n, pa.string())),
        ("drop_reason", pa.nulls(n, pa.string())),
    ):
        rows = set_column(rows, name, value)
    return rows


def _replace_rows(table: pa.Table, positions: list[int], new: pa.Table) -> pa.Table:
    schema = pa.unify_schemas([table.schema, new.schema], promote_options="permissive")
    rows = table.to_pylist()
    for pos, row in zip(positions, new.to_pylist(), strict=True):
        rows[pos] = row
    return pa.Table.from_pylist(rows, schema=schema)
