"""``curate retry OUTPUT``: fetch again only the rows that failed for a transient reason.

For each finished shard with such rows, the rows go through the pipeline's stages again as they came from
the input; every other row of the shard keeps what it had (its image comes back from the tar). The shard is
then rewritten with the usual atomic writer. Its completion marker is removed first, so a retry killed
midway leaves a shard that ``curate run`` redoes from the input; nothing is half-updated.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from curate.base import ConfigError
from curate.core.config import parse_config
from curate.core.output import OutputFolder, collect_output
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
    if any(isinstance(b.stage, GlobalStage) for b in pipeline.stages):
        raise ConfigError(
            [
                (
                    "OUTPUT",
                    "this pipeline has a whole-dataset stage; retried rows would miss its decision. "
                    "Rerun the failed rows with `curate run` into a new output instead",
                )
            ]
        )
    match = status_matcher(list(statuses or DEFAULT_STATUSES))
    job = pipeline.job(0)
    summary = RetrySummary()
    fs = out.fs
    for shard in out.finished_shards():
        paths = out.shard_files(shard)
        with fs.open(paths["parquet"], "rb") as f:
            sidecar = pq.read_table(f)
        picked = [i for i, s in enumerate(sidecar["status"].to_pylist()) if s and match.match(s)]
        if not picked:
            continue
        start = time.perf_counter()
        has_images = any("image" in b.stage.writes for b in pipeline.stages)
        table = _with_images(sidecar, out, shard) if has_images else sidecar
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
        summary.shards.append(shard)
        summary.rows += len(picked)
        summary.recovered += recovered
        for s in redone["status"].to_pylist():
            if s != "ok":
                summary.still[s] = summary.still.get(s, 0) + 1
        console.print(f"shard {shard}: {recovered}/{len(picked)} rows recovered")

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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _with_images(sidecar: pa.Table, out: OutputFolder, shard: str) -> pa.Table:
    """The sidecar with its ``image`` column back: kept rows' images from the shard's tar, and dropped rows'
    thumbnails from its dropped/ audit tar (none when output.dropped_thumbnails is off), so that rewriting
    the shard keeps them (a thumbnail of a thumbnail is the same picture)."""
    images: dict[str, bytes] = {}
    for which in ("tar", "dropped"):
        images |= {uid: data for uid, (data, _) in out.images(shard, which).items()}
    column = pa.array([images.get(u) for u in sidecar["uid"].to_pylist()], pa.binary())
    return sidecar.append_column("image", column)


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
