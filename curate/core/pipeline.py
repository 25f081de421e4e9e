"""A pipeline: the input reader, the stages in order, and the writer; checked as a whole before any work.

Stages run shard by shard. A :class:`GlobalStage` splits the pipeline into phases: every shard goes through
the stages before it and is kept under ``work/phase<k>/``; then the global stage fits once on all of them;
then the next phase starts with that stage applying its decision to each shard. The last phase ends in the
:class:`ShardWriter`. Executors run a :class:`PhaseJob` over shards and know nothing else.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from curate.base import ConfigError, MemoryNeed
from curate.core.config import PipelineConfig
from curate.core.output import OutputFolder
from curate.core.reader import InputReader, ShardSpec
from curate.core.registry import STAGES
from curate.core.schema import COLUMNS, Column, declare, is_kept
from curate.core.stage import GlobalStage, Stage, StageResources
from curate.core.storage import filesystem, write_atomic
from curate.core.writer import ShardWriter
from curate.kit.captions import TrainCaption

__all__ = ["BoundStage", "PhaseJob", "PhaseShards", "Pipeline", "ShardResult"]


@dataclass
class BoundStage:
    """A stage with the name it has in this pipeline and the resources it gets."""

    name: str
    stage: Stage
    resources: StageResources
    upstream: list[Stage] = field(default_factory=list, repr=False)  # the stages before it, for the plan

    def __getstate__(self) -> dict[str, Any]:
        # Only the plan, in the driver, looks upstream: a worker gets the stage alone.
        return {**self.__dict__, "upstream": []}

    def memory(self, device: str) -> MemoryNeed | None:
        """The stage's estimate on ``device``, or the YAML's ``resources.memory`` for the host."""
        need = self.stage.memory(device, self.upstream)
        if self.resources.memory is None:
            return need
        gpu = need.gpu if need else 0
        return MemoryNeed(self.resources.memory, gpu, ("resources.memory (from the pipeline)",))


def peak_rss() -> int:
    """The most memory this process has held so far (bytes): after a stage, in a worker that runs only that
    stage (a Ray actor), the peak of the stage's actor."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class ShardResult:
    shard: str
    stats: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.reader = InputReader(config.input)
        self.stages: list[BoundStage] = []
        for spec in config.stages:
            stage = STAGES[spec.stage](spec.config)
            upstream = [b.stage for b in self.stages]
            self.stages.append(
                BoundStage(spec.name, stage, stage.resources_after(upstream).merged(spec.resources), upstream)
            )
        mode, column = config.output.caption_source()
        mix = config.output.caption_mix
        self.writer = ShardWriter(
            config.output.path,
            dropped_thumbnails=config.output.dropped_thumbnails,
            naming=config.output.naming,
            train_caption=TrainCaption(
                mode, column, (("fused", mix.fused), ("vlm", mix.vlm), ("alt", mix.alt)), mix.seed
            ),
        )
        self.output = OutputFolder(config.output.path)
        self.root = self.output.root
        for bound in self.stages:
            if isinstance(bound.stage, GlobalStage):
                bound.stage.state_path = self.state_path(bound.name)

    def state_path(self, stage_name: str) -> str:
        """A global stage's state folder, as the stage opens it with ``filesystem()``."""
        return self.output.url(self.output.global_state(stage_name))

    # --- the check before any work ---------------------------------------------------------------

    def check(self) -> list[str]:
        """Check the column flow: every column a stage reads is written by the input or an earlier stage
        (and not left null by it, as a download without ``perceptual_hash`` leaves ``phash``), and every
        column a stage writes is declared in the schema. Returns the columns at the end."""
        problems: list[tuple[str, str]] = []
        if self.reader.carries_images and not any(b.stage.name == "download" for b in self.stages):
            problems.append(
                (
                    "stages",
                    "the input carries its images; add a `download` stage: it takes them without fetching "
                    "and applies its checks, resize, re-encoding and hashes, as to downloaded images",
                )
            )
        available = self.reader.column_names()
        nulls: dict[str, tuple[int, str]] = {}  # column -> (the stage that leaves it null, its setting)
        for i, bound in enumerate(self.stages):
            where = f"stages[{i}] ({bound.name})"
            for col in bound.stage.reads:
                if col in nulls:
                    j, setting = nulls[col]
                    problems.append(
                        (
                            where,
                            f"reads column {col!r}, which stages[{j}] ({self.stages[j].name}) leaves null on "
                            f"every row (stages[{j}].{setting}); change that setting, or what this stage "
                            "asks for",
                        )
                    )
                elif col not in available:
                    hint = COLUMNS[col].writer if col in COLUMNS else None
                    problems.append(
                        (
                            where,
                            f"reads column {col!r}, which neither the input nor an earlier stage writes"
                            + (f"; it is written by the {hint!r} stage" if hint and hint != "input" else ""),
                        )
                    )
            for col in bound.stage.writes:
                if col not in COLUMNS:
                    problems.append(
                        (where, f"writes column {col!r}, which curate.core.schema does not declare")
                    )
                elif col not in available:
                    available.append(col)
            for col in bound.stage.writes:
                nulls.pop(col, None)
            nulls |= {col: (i, setting) for col, setting in bound.stage.leaves_null.items()}
        key = "output.text_column" if self.writer.train_caption.mode == "column" else "output.train_caption"
        for text in self.writer.train_caption.required_columns():
            if text not in available:
                hint = COLUMNS[text].writer if text in COLUMNS and COLUMNS[text].writer != "input" else None
                problems.append(
                    (
                        key,
                        f"column {text!r} is written by no stage nor the input"
                        + (f"; add the {hint!r} stage" if hint else ""),
                    )
                )
        if problems:
            raise ConfigError(problems)
        return available

    def phases(self) -> list[list[BoundStage]]:
        """The stages cut at each global stage; a global stage starts the phase that applies it."""
        phases: list[list[BoundStage]] = [[]]
        for bound in self.stages:
            if isinstance(bound.stage, GlobalStage):
                phases.append([])
            phases[-1].append(bound)
        return phases

    def job(self, index: int) -> PhaseJob:
        phases = self.phases()
        return PhaseJob(
            index=index,
            stages=phases[index],
            reader=self.reader if index == 0 else None,
            source_dir=self.output.phase_dir(index - 1) if index > 0 else None,
            sink_dir=self.output.phase_dir(index) if index < len(phases) - 1 else None,
            writer=self.writer,
            output_path=self.config.output.path,
        )

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for bound in self.stages:
            r = bound.resources
            rows.append(
                {
                    "name": bound.name,
                    "stage": bound.stage.name,
                    "kind": "global" if isinstance(bound.stage, GlobalStage) else "per-shard",
                    "reads": list(bound.stage.reads),
                    "writes": list(bound.stage.writes),
                    "cpus": r.cpus,
                    "gpus": r.gpus,
                    "gpus_if_any": r.gpus_if_any,
                    "memory": r.memory,
                    "runs_as": "actor pool" if r.needs_actor else "tasks",
                    "concurrency": r.concurrency,
                    "batch_size": r.batch_size,
                }
            )
        return rows


@dataclass
class PhaseJob:
    """Everything needed to take one shard through one phase: where it comes from, the stages, where it goes.

    Pickles cheaply (stages hold no heavy state until ``setup()``), so executors ship it to workers, with the
    schema's columns as this process declared them (``columns``), which the reader and writer look up there.
    """

    index: int
    stages: list[BoundStage]
    reader: InputReader | None
    source_dir: str | None
    sink_dir: str | None
    writer: ShardWriter
    output_path: str
    columns: tuple[Column, ...] = field(default_factory=lambda: tuple(COLUMNS.values()), repr=False)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy shipped to a worker declares the columns there: those of a stage registered by an explicit
        # call in the driver only (a test's, a plugin's) too, in the driver's order.
        self.__dict__.update(state)
        for column in self.columns:
            declare(column)

    @property
    def final(self) -> bool:
        return self.sink_dir is None

    def load(self, spec: ShardSpec) -> tuple[pa.Table, dict[str, Any]]:
        """The shard as it enters this phase, with the stage timings of earlier phases."""
        if self.reader is not None:
            start = time.perf_counter()
            table = self.reader.load(spec)
            return table, {"read": {"seconds": time.perf_counter() - start, "kept": _kept(table)}}
        fs, _ = filesystem(self.output_path)
        with fs.open(f"{self.source_dir}/{spec.id}.arrow", "rb") as f:
            reader = pa.ipc.open_file(f)
            table = reader.read_all()
            timings = json.loads(reader.schema.metadata[b"curate.timings"])
        return table.replace_schema_metadata(None), timings

    def setup(self, stages: Sequence[BoundStage]) -> None:
        """Set each stage up, once in this process (:meth:`Stage.ensure_setup`), before its first shard."""
        for bound in stages:
            bound.stage.ensure_setup()

    def apply(self, stages: Sequence[BoundStage], table: pa.Table, timings: dict[str, Any]) -> pa.Table:
        self.setup(stages)
        for bound in stages:
            start = time.perf_counter()
            table = bound.stage(table)
            timings[bound.name] = {
                "seconds": time.perf_counter() - start,
                "kept": _kept(table),
                "peak_rss": peak_rss(),
            }
        return table

    def sink(self, spec: ShardSpec, table: pa.Table, timings: dict[str, Any]) -> dict[str, Any]:
        """Write the shard: the final output in the last phase, else an Arrow file for the next phase."""
        stage_stats = {
            name: {"seconds": round(t["seconds"], 6), "kept": t["kept"]}
            | ({"peak_rss": t["peak_rss"]} if "peak_rss" in t else {})
            for name, t in timings.items()
        }
        if self.final:
            return self.writer.write(spec.id, table, {"stages": stage_stats})
        fs, _ = filesystem(self.output_path)
        fs.makedirs(self.sink_dir, exist_ok=True)
        meta = {**(table.schema.metadata or {}), b"curate.timings": json.dumps(timings).encode()}
        buf = io.BytesIO()
        with pa.ipc.new_file(buf, table.schema.with_metadata(meta)) as w:
            w.write_table(table)
        write_atomic(fs, f"{self.sink_dir}/{spec.id}.arrow", buf.getvalue())
        return {"shard": spec.id, "phase": self.index, "rows": table.num_rows, "kept": _kept(table)}

    def process(self, spec: ShardSpec) -> dict[str, Any]:
        table, timings = self.load(spec)
        table = self.apply(self.stages, table, timings)
        return self.sink(spec, table, timings)

    def done(self, spec: ShardSpec) -> bool:
        fs, _ = filesystem(self.output_path)
        if self.final:
            return fs.exists(self.writer.paths(spec.id)["stats"])
        return fs.exists(f"{self.sink_dir}/{spec.id}.arrow")


def _kept(table: pa.Table) -> int:
    return int(is_kept(table).cast(pa.int64()).to_numpy().sum()) if table.num_rows else 0


class PhaseShards:
    """What a global stage's ``fit`` sees: the shards as the stages before it left them.

    ``elsewhere`` names shards that wait in another folder (shard id -> folder): the finished shards of a
    grown or retried run, as they were at the global stage (:mod:`curate.core.grow`)."""

    def __init__(
        self, output_path: str, phase_dir: str | None, ids: list[str], elsewhere: dict[str, str] | None = None
    ):
        self.output_path = output_path
        self.phase_dir = phase_dir
        self.ids = ids
        self.elsewhere = elsewhere or {}

    def read(self, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        fs, _ = filesystem(self.output_path)
        path = f"{self.elsewhere.get(shard_id, self.phase_dir)}/{shard_id}.arrow"
        if isinstance(fs, LocalFileSystem):  # memory-mapped, zero-copy: only what fit touches is read
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        else:
            with fs.open(path, "rb") as f:
                table = pa.ipc.open_file(f).read_all()
        return table.select(columns) if columns else table

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
