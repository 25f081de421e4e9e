"""Growing a run, and deciding a global stage again over shards that are already written.

Growing. New input arrives: files that now match the run's ``input.path`` (a glob or a folder), or inputs
given with ``curate run PIPELINE --add INPUT``. They become NEW shards, and only they are read and go
through the stages; the shards the run has keep their rows, ids and files. ``run.json`` records the run's
input in groups (``inputs``: each group's files with their row counts, and the shards and input rows they
became) and the inputs added with ``--add`` (``added_inputs``), so that every later resume plans the same
shards: the first group as one run over its files would, each later group on its own after it, its shard
ids and ``input_index`` going on from the last one. New files that sort before old ones therefore never
move an old shard. An old file that is gone, or whose row count changed, is refused as before: the
fingerprint of the run before it grew (config, old files and row counts) must match ``run.json``'s.

Deciding again. A global stage (dedup) decides over every row of the run, so new rows (a grown run's, or
the rows ``curate retry`` fetched again) are decided against the rows the run already has, WITHOUT
running any stage again on the finished shards: their parquet sidecars hold what the stage reads (hashes,
embeddings, the keep columns; images, where the stage reads them, come back from the shard's tars, dropped
rows' as their audit thumbnails). The rule is the one a single run over all the rows applies: the stage
fits once more over all of them, with the same keep order, and

- a new row goes on through the stages after the global stage as usual;
- an old row whose decision changes (a new row beats a kept one by the keep order, or the row an old
  duplicate pointed to is dropped now) gets the new decision: its shard is rewritten from its sidecar and
  tar images by the usual atomic writer (stats marker removed first); its other columns stay as they were,
  as the stages after the global stage are not run again;
- a row the stage dropped before is never brought back (its full image is not kept), even where the new
  decision would keep it (a new row displaced the only row a near duplicate of it pointed to): it keeps
  its reason, which may then name a dropped row, and the stage decides again with it left out, so that no
  other row points to it. Exact duplicates never do this; chains of perceptual or semantic pairs can.

So a grown run keeps the same rows, with the same drop reason per uid, as one run over all its input,
except for that last case and for what depends on the order of rows or on shard boundaries: semantic
dedup's k-means clusters (as for two runs with different shard sizes), ties between rows of one uid, and a
(url, caption) repeated within one input shard (``duplicate_row`` in one run, an exact duplicate in the
other).

The rows the stage considered before are found from the finished shards: the ok rows that are kept, and
those dropped with the reason the stage's previous decision gives them. That holds only where no stage
after the global stage drops rows or sets a status, and for one global stage: other pipelines are refused
(:func:`redecidable`, a ConfigError) when they grow or retry.

Killed midway, a decision is taken again: the global stage's state from before stays in
``global/<stage>/previous/`` until every shard it changes is rewritten, and the next run (or retry)
decides again from it.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.base import ConfigError, InputError
from curate.core.config import PipelineConfig, canonical_json
from curate.core.output import DONE, PREVIOUS, OutputFolder, read_sidecar
from curate.core.pipeline import BoundStage, PhaseShards, Pipeline
from curate.core.reader import InputReader, ShardSpec
from curate.core.stage import GlobalStage, set_column
from curate.core.storage import read_json, write_atomic, write_json_atomic

__all__ = [
    "Changes",
    "InputPlan",
    "Redecision",
    "apply_changes",
    "fitted_shards",
    "input_fingerprint",
    "plan_input",
    "read_shard",
    "redecidable",
    "rewrite_shard",
]

# Columns a view of a shard at the global stage always carries, besides those the stage reads and writes.
_CORE = ("uid", "input_index", "status", "drop_reason")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the input of a run, in groups ----------------------------------------------------------------------


def input_fingerprint(config: PipelineConfig, specs: Iterable[ShardSpec]) -> str:
    """The config's output-relevant part plus the input files and their row counts."""
    files: dict[str, int] = Counter()
    for spec in specs:
        for seg in spec.segments:
            files[seg.path] += seg.stop - seg.start
    payload = {"config": config.output_relevant(), "input": sorted(files.items())}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


@dataclass
class InputPlan:
    """Every shard of a run: those it had (``known``), then those of input that is new since."""

    specs: list[ShardSpec]
    known: list[ShardSpec]  # the shards the run had before this run; empty for a new run
    groups: list[dict[str, Any]]  # run.json's "inputs"
    added_inputs: list[str]  # run.json's "added_inputs"
    fingerprint: str  # of the whole run
    previous_fingerprint: str  # of the known shards: what run.json must hold for this run to go on there

    @property
    def grows(self) -> bool:
        """Whether this run adds shards to a run that had some."""
        return bool(self.known) and len(self.specs) > len(self.known)

    @property
    def files(self) -> list[str]:
        return sorted({seg.path for s in self.specs for seg in s.segments})


def plan_files(config: PipelineConfig, files: list[str], first_shard: int, first_row: int) -> list[ShardSpec]:
    """Shards of exactly ``files``, as the reader cuts them, with ids from ``first_shard`` and input rows
    from ``first_row``."""
    reader = InputReader(config.input)
    reader.__dict__["files"] = list(files)  # ``files`` is a cached property: these files, not input.path's
    return [
        ShardSpec(f"{first_shard + k:05d}", first_row + s.first_row, s.segments)
        for k, s in enumerate(reader.plan(config.shard_size))
    ]


def _source_files(config: PipelineConfig, source: str, base: InputReader) -> list[str]:
    """The files of one input of the run: ``input.path`` or an input given with ``--add``."""
    if source == config.input.path:
        return base.files
    reader = InputReader(config.input.model_copy(update={"path": source}))
    if reader.fs.protocol != base.fs.protocol:
        raise ConfigError(
            [
                (
                    "--add",
                    f"{source} is on another file system than input.path ({config.input.path}): add inputs there",
                )
            ]
        )
    try:
        return reader.files
    except InputError as e:
        raise InputError(f"--add {source}: {str(e).removeprefix('input.path: ')}") from None


def _group(specs: list[ShardSpec], previous: dict[str, Any] | None) -> dict[str, Any]:
    rows: dict[str, int] = {}
    for s in specs:
        for seg in s.segments:
            rows[seg.path] = rows.get(seg.path, 0) + seg.stop - seg.start
    return {
        "files": [[path, n] for path, n in rows.items()],
        "first_shard": specs[0].id if specs else None,
        "shards": len(specs),
        "first_row": specs[0].first_row if specs else None,
        "rows": sum(rows.values()),
        "added": (previous or {}).get("added") or _now(),
    }


def _previous_groups(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The input groups run.json records; a run.json from before groups: its input files, as one group."""
    if not previous:
        return []
    if previous.get("inputs"):
        return [{**g, "paths": [f for f, _ in g["files"]]} for g in previous["inputs"]]
    if previous.get("input_files"):
        return [{"paths": list(previous["input_files"])}]
    return []


def plan_input(config: PipelineConfig, previous: dict[str, Any] | None, add: Iterable[str] = ()) -> InputPlan:
    """The shards of a run into a folder whose ``run.json`` is ``previous`` (None: a new run), with the inputs
    of ``add`` added to it: the groups it has, each planned as before, then one group of the files that are
    new (sorted), planned on its own."""
    added = list((previous or {}).get("added_inputs", []))
    for source in add:
        if source not in added and source != config.input.path:
            added.append(source)
    base = InputReader(config.input)
    current: dict[str, None] = {}
    for source in (config.input.path, *added):
        for path in _source_files(config, source, base):
            current.setdefault(path)
    before = _previous_groups(previous)
    if not before:
        specs = plan_files(config, sorted(current), 0, 0)
        fingerprint = input_fingerprint(config, specs)
        return InputPlan(specs, [], [_group(specs, None)], added, fingerprint, fingerprint)
    known_files = [p for g in before for p in g["paths"]]
    gone = [p for p in known_files if p not in current]
    if gone:
        raise ConfigError(
            [
                (
                    "input.path",
                    f"{gone[0]} is an input file of the run in {config.output.path} (run.json) and is no longer "
                    f"among its inputs{f' (and {len(gone) - 1} more)' if len(gone) > 1 else ''}; a run only "
                    "grows: pass --overwrite to start over",
                )
            ]
        )
    specs: list[ShardSpec] = []
    groups = []
    for g in before:
        part = plan_files(config, g["paths"], len(specs), sum(s.rows for s in specs))
        groups.append(_group(part, g))
        specs += part
    known = list(specs)
    seen = set(known_files)
    new = sorted(p for p in current if p not in seen)
    if new:
        part = plan_files(config, new, len(specs), sum(s.rows for s in specs))
        groups.append(_group(part, None))
        specs += part
        if config.input.uid_col is not None:  # the reader checks uids unique over the files it plans: all
            plan_files(config, [*known_files, *new], 0, 0)
    return InputPlan(
        specs, known, groups, added, input_fingerprint(config, specs), input_fingerprint(config, known)
    )


# --- deciding a global stage again ----------------------------------------------------------------------


def redecidable(pipeline: Pipeline, what: str) -> BoundStage:
    """The pipeline's one global stage, if it can decide again over finished shards (see the module
    docstring); else a ConfigError that says why, naming ``what`` (growing a run, curate retry)."""
    phases = pipeline.phases()
    if len(phases) != 2:
        raise ConfigError(
            [("stages", f"{what} works with one global stage; this pipeline has {len(phases) - 1}")]
        )
    bound = phases[1][0]
    for later in phases[1][1:]:
        bad = sorted({"drop_reason", "status"} & set(later.stage.writes))
        if bad:
            raise ConfigError(
                [
                    (
                        f"stages ({later.name})",
                        f"{what}: {later.name!r} comes after the global stage {bound.name!r} and sets "
                        f"{' and '.join(bad)}, so the rows {bound.name!r} considered cannot be told from the "
                        f"finished shards; move it before {bound.name!r}, or run again with --overwrite",
                    )
                ]
            )
    return bound


def fitted_shards(out: OutputFolder, stage: str, legacy: Iterable[str]) -> set[str] | None:
    """The shards the global stage last fitted on (its ``_done`` names them; one written before it did
    covers ``legacy``: the shards the run had); None while it has not fitted."""
    done = out.global_done(stage)
    if not out.fs.exists(done):
        return None
    record = read_json(out.fs, done)
    return set(record["shards"]) if "shards" in record else set(legacy)


def read_shard(out: OutputFolder, shard: str, images: bool) -> pa.Table:
    """A finished shard from its sidecar; with ``images``, its ``image`` column back: kept rows' images from
    the shard's tar, dropped rows' thumbnails from its dropped/ audit tar (none where output.dropped_thumbnails
    is off), so that rewriting the shard keeps them (a thumbnail of a thumbnail is the same picture)."""
    with out.fs.open(out.shard_parquet(shard), "rb") as f:
        table = read_sidecar(f)
    if not images:
        return table
    found: dict[str, bytes] = {}
    for which in ("tar", "dropped"):
        found |= {uid: data for uid, (data, _) in out.images(shard, which).items()}
    column = pa.array([found.get(u) for u in table["uid"].to_pylist()], pa.binary())
    return table.append_column("image", column)


@dataclass
class Changes:
    """What a new decision changes in one finished shard: its rows at ``positions`` get ``values`` (the
    global stage's columns, one row per position)."""

    positions: list[int]
    values: pa.Table


def apply_changes(table: pa.Table, changes: Changes | None) -> pa.Table:
    """``table`` with the rows at ``changes.positions`` holding ``changes.values``."""
    if changes is None or not changes.positions:
        return table
    for name in changes.values.column_names:
        new = changes.values[name].to_pylist()
        if name in table.column_names:
            values = table[name].to_pylist()
            kind = table[name].type
        else:
            values, kind = [None] * table.num_rows, changes.values[name].type
        for pos, value in zip(changes.positions, new, strict=True):
            values[pos] = value
        table = set_column(table, name, pa.array(values, kind))
    return table


def rewrite_shard(pipeline: Pipeline, shard: str, table: pa.Table, note: tuple[str, dict[str, Any]]) -> None:
    """Write a finished shard again with the usual atomic writer, its stage timings kept and ``note`` added
    to the list its stats keep under that key (``retries``, ``redecided``). The stats marker goes first, so
    a rewrite killed midway leaves a shard that ``curate run`` redoes from the input."""
    out = pipeline.output
    old = out.read_stats(shard)
    out.fs.rm_file(out.shard_stats(shard))
    stats = {k: old[k] for k in ("stages", "retries", "redecided") if k in old}
    key, entry = note
    stats[key] = [*stats.get(key, []), entry]
    pipeline.writer.write(shard, table, stats)


# Loads a finished shard as it is to be decided: the sidecar (with images, where the stage reads them), in
# which the ``fresh`` rows (a mask) are as they come to the global stage: rows retried since.
Loader = Callable[[str], tuple[pa.Table, np.ndarray]]


class Redecision:
    """One new decision of a global stage over a run's finished shards (read through a :data:`Loader`) and
    fresh shards waiting in a phase folder; see the module docstring for the rule."""

    def __init__(self, pipeline: Pipeline, bound: BoundStage, by: str):
        self.pipeline = pipeline
        self.out = pipeline.output
        self.bound = bound
        self.columns = list(dict.fromkeys(("drop_reason", *bound.stage.writes)))
        self.previous = self._keep_previous(by)
        self.old = self._stage(self.out.url(self.previous))
        self.new: GlobalStage | None = None
        self.pinned: dict[str, set[int]] = {}  # rows left out: dropped before, kept by a new decision
        self.views = self.out.redecide_dir(bound.name)

    def _keep_previous(self, by: str) -> str:
        """Copy the stage's state to ``previous/`` (unless a decision killed midway left a complete copy)."""
        fs, name = self.out.fs, self.bound.name
        state, previous = self.out.global_state(name), self.out.global_previous(name)
        if fs.exists(f"{previous}/{DONE}"):
            return previous
        if fs.exists(previous):
            fs.rm(previous, recursive=True)
        fs.makedirs(previous, exist_ok=True)
        for path in fs.ls(state, detail=False):
            base = path.rstrip("/").rsplit("/", 1)[-1]
            if base not in (DONE, PREVIOUS) and fs.isfile(path):
                write_atomic(fs, f"{previous}/{base}", fs.cat_file(path))
        write_json_atomic(fs, f"{previous}/{DONE}", {"by": by, "at": _now()})
        return previous

    def _stage(self, state_url: str) -> GlobalStage:
        stage = type(self.bound.stage)(self.bound.stage.config)
        stage.state_path = state_url
        stage.ensure_setup()
        return stage

    def _reset(self, table: pa.Table, mask: np.ndarray) -> pa.Table:
        """``table`` with the rows of ``mask`` as they came to the stage: kept, the stage's columns empty."""
        if not mask.any():
            return table
        m = pa.array(mask, pa.bool_())
        for name in self.columns:
            if name in table.column_names:
                col = table[name]
                table = set_column(table, name, pc.if_else(m, pa.nulls(len(m), col.type), col))
        return table

    def view(self, shard: str, table: pa.Table, fresh: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """The shard as it came to the global stage, and which of its old rows the stage considered (those
        ok and kept, or dropped with the reason the previous decision gives them), but pinned ones."""
        ok = pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
        old = ok & ~fresh
        side = table["drop_reason"].to_pylist()
        before = self.old(self._reset(table, old))["drop_reason"].to_pylist()
        pinned = self.pinned.get(shard, set())
        index = table["input_index"].to_pylist()
        considered = np.array(
            [
                bool(old[i]) and index[i] not in pinned and (side[i] is None or side[i] == before[i])
                for i in range(table.num_rows)
            ],
            bool,
        )
        return self._reset(table, considered), considered

    def _write_view(self, shard: str, view: pa.Table) -> None:
        wanted = [*_CORE, *self.bound.stage.reads, *self.columns]
        view = view.select([c for c in dict.fromkeys(wanted) if c in view.column_names])
        fs = self.out.fs
        fs.makedirs(self.views, exist_ok=True)
        buf = io.BytesIO()
        with pa.ipc.new_file(buf, view.schema) as w:
            w.write_table(view)
        write_atomic(fs, f"{self.views}/{shard}.arrow", buf.getvalue())

    def decide(
        self,
        settled: list[str],
        load: Loader,
        fresh_ids: list[str],
        fresh_dir: str | None,
        fit: Callable[[PhaseShards], None],
    ) -> dict[str, Changes]:
        """Fit the stage over the ``settled`` shards (as they came to it) and the ``fresh_ids`` shards in
        ``fresh_dir``; returns what changes in the settled ones. After it, :attr:`new` is the stage set up
        with the new decision, to apply to fresh rows."""
        todo = list(settled)
        while True:
            for shard in todo:
                table, fresh = load(shard)
                self._write_view(shard, self.view(shard, table, fresh)[0])
            ids = sorted([*settled, *fresh_ids])
            fit(
                PhaseShards(
                    self.pipeline.config.output.path, fresh_dir, ids, dict.fromkeys(settled, self.views)
                )
            )
            self.new = self._stage(self.out.url(self.out.global_state(self.bound.name)))
            changes: dict[str, Changes] = {}
            revived: dict[str, set[int]] = {}
            for shard in settled:
                table, fresh = load(shard)
                view, considered = self.view(shard, table, fresh)
                changed, back = self._compare(table, self.new(view), considered)
                if changed.positions:
                    changes[shard] = changed
                if back:
                    revived[shard] = back
            if not revived:
                return changes
            for shard, rows in revived.items():
                self.pinned.setdefault(shard, set()).update(rows)
            todo = list(revived)

    def _compare(
        self, table: pa.Table, decided: pa.Table, considered: np.ndarray
    ) -> tuple[Changes, set[int]]:
        """The considered rows whose decision differs from what the shard holds: those to rewrite, and
        those it dropped that the new decision keeps (left out: see the module docstring)."""
        rows = np.flatnonzero(considered)
        differs = np.zeros(table.num_rows, bool)
        for name in self.columns:
            now = table[name].to_pylist() if name in table.column_names else [None] * table.num_rows
            new = decided[name].to_pylist()
            for i in rows:
                differs[i] |= not _same(now[i], new[i])
        side = table["drop_reason"].to_pylist()
        reason = decided["drop_reason"].to_pylist()
        index = table["input_index"].to_pylist()
        back = {index[i] for i in np.flatnonzero(differs) if side[i] is not None and reason[i] is None}
        positions = [int(i) for i in np.flatnonzero(differs) if index[i] not in back]
        values = decided.select(self.columns).take(pa.array(positions, pa.int64()))
        return Changes(positions, values), back

    def finish(self) -> None:
        """Once every shard the decision changes is rewritten: the views and the previous state go."""
        fs = self.out.fs
        for path in (self.views, self.previous):
            if fs.exists(path):
                fs.rm(path, recursive=True)
        for folder in (self.views.rsplit("/", 1)[0], self.out.work_dir):  # work/redecide/, then work/
            if fs.exists(folder) and not fs.ls(folder, detail=False):
                fs.rm(folder, recursive=True)

    @property
    def left_out(self) -> int:
        """Rows dropped before that the new decision would keep, left dropped."""
        return sum(len(rows) for rows in self.pinned.values())


def _same(a: Any, b: Any) -> bool:
    """Values equal as a decision: floats (similarities) to float32 precision, the rest exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b
