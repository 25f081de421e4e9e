"""The stage protocol: one small class per step, with its config, the columns it reads, writes and adds to
the schema, and what it needs to run. Stages never import Ray; executors adapt them.

    class MinSide(Stage):
        name = "min_side"
        class Config(StrictModel):
            pixels: int = 64
        reads = ("width", "height")
        writes = ("drop_reason",)

        def __call__(self, table):
            small = pc.less(pc.min_element_wise(table["width"], table["height"]), self.config.pixels)
            return drop(table, small, f"min_side<{self.config.pixels}")

A stage that writes a new column carries it in ``columns`` (``Column(name, type, writer, doc)``);
:func:`curate.core.registry.register` adds it to the schema. Columns are set with :func:`set_column`.

Running a stage, the one way: ``stage.ensure_setup()``, then ``stage(table)`` for each shard.
``ensure_setup()`` calls ``setup()`` the first time only; the executors call it (through
``PhaseJob.setup``) in every process before a stage's first shard: the local executor, Ray tasks and
actors, the apply phase of a global stage, ``curate retry``. Code that calls a stage directly (tests,
notebooks) calls ``ensure_setup()`` first, as the executors do. ``__call__`` never sets itself up. A global
stage's ``fit()`` runs without ``setup()``: it writes the state that ``setup()`` then loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from curate.base import MemoryNeed, Resources, StrictModel
from curate.core.schema import COLUMNS, Column, is_kept

__all__ = ["GlobalStage", "NoConfig", "ShardSource", "Stage", "StageResources", "drop", "set_column"]


class NoConfig(StrictModel):
    """For stages without parameters."""


@dataclass(frozen=True)
class StageResources:
    """What one worker of the stage needs. ``uses_model`` stages run as actor pools under Ray, so that
    ``setup()`` (loading weights) happens once per actor, not once per shard.

    ``gpus`` is asked for on any cluster (a YAML ``resources.gpus``: a cluster without GPUs is then a config
    error); ``gpus_if_any`` is a model stage's own default, taken only where the cluster has GPUs, so the same
    pipeline runs on a laptop and on GPU nodes. An explicit ``resources.gpus`` sets both (``gpus: 0`` keeps
    the stage on CPUs). ``memory`` is the YAML's ``resources.memory`` (host bytes per worker), which wins
    over the plan's estimate (:meth:`Stage.memory`)."""

    cpus: float = 1.0
    gpus: float = 0.0
    concurrency: int | tuple[int, int] | None = None
    batch_size: int | None = None
    uses_model: bool = False
    gpus_if_any: float = 0.0
    memory: int | None = None

    def merged(self, override: Resources) -> StageResources:
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        if "gpus" in changes:
            changes["gpus_if_any"] = changes["gpus"]
        return replace(self, **changes)

    def on(self, cluster_gpus: float) -> StageResources:
        """These resources on a cluster with ``cluster_gpus`` GPUs: the default GPU share applies there."""
        if cluster_gpus > 0 and self.gpus_if_any > 0 and self.gpus == 0:
            return replace(self, gpus=self.gpus_if_any)
        return self

    @property
    def needs_actor(self) -> bool:
        return self.uses_model or self.gpus > 0


class Stage:
    """A per-shard step: ``__call__(table) -> table`` on one shard at a time.

    Heavy state (models) is loaded in ``setup()``, once per worker, never in ``__init__``, so that a stage
    pickles cheaply. A stage keeps every row: it adds columns, or records ``drop_reason`` on rows it drops.
    ``columns`` are the columns the stage adds to the schema (registered with the stage); ``writes`` names
    every column it sets, new or not.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = NoConfig
    columns: ClassVar[tuple[Column, ...]] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    resources: StageResources = StageResources()
    _set_up: bool = False  # set by ensure_setup(), in this process only (see __getstate__)

    def __init__(self, config: StrictModel | None = None):
        self.config = config if config is not None else self.Config()

    def setup(self) -> None:
        """Load heavy state. Called once per worker before the first shard, by :meth:`ensure_setup`."""

    def ensure_setup(self) -> None:
        """Call ``setup()`` unless this process already did: what runs a stage calls it before the first
        shard. A ``setup()`` that raises is called again next time."""
        if not self._set_up:
            self.setup()
            self._set_up = True

    def __getstate__(self) -> dict[str, Any]:
        # A copy shipped to another process (a Ray worker) sets itself up again there.
        state = dict(self.__dict__)
        state.pop("_set_up", None)
        return state

    @property
    def leaves_null(self) -> dict[str, str]:
        """The columns of ``writes`` that this configuration leaves null on every row, each with the setting
        that does it (``{"phash": "perceptual_hash: false"}``): a later stage that reads one is a config error
        (:meth:`curate.core.pipeline.Pipeline.check`)."""
        return {}

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed | None:
        """What one worker of this stage holds at its peak on ``device`` (``cpu`` or ``cuda``), estimated
        without loading weights (:mod:`curate.models.footprint`); None for a stage without a model.
        ``upstream`` are the stages before it in the pipeline (a LAION head reuses clip_score's embeddings
        and then loads no CLIP of its own)."""
        return None

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        """The stage's resources in a pipeline where ``upstream`` run before it: ``resources`` unless the
        stage needs less when an earlier stage did part of its work."""
        return self.resources

    def weights(self) -> list[Any]:
        """The :class:`curate.models.weights.WeightsSpec` files ``setup()`` will resolve from the model
        directory or the hub: checked before a run starts, and what ``curate models fetch`` downloads.
        Weights given by an explicit path, or shipped inside a wheel, are not listed."""
        return []

    def __call__(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class ShardSource(Protocol):
    """What :meth:`GlobalStage.fit` reads: every shard of the run as the stages before it left them
    (:class:`curate.core.pipeline.PhaseShards` is the one the pipeline passes)."""

    @property
    def ids(self) -> list[str]:
        """The shard ids, in shard order."""
        ...

    @property
    def output_path(self) -> str:
        """The run's output folder (local or an fsspec URL), where a stage may write what users read."""
        ...

    def read(self, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        """The shard's table, with only ``columns`` when given."""
        ...


class GlobalStage(Stage):
    """A step that must see every shard before it can decide, such as deduplication.

    The pipeline runs the stages before it on every shard and keeps their output; then calls ``fit(shards)``
    once, which reads what it needs and writes its decision under ``self.state_path`` (an fsspec URL);
    then, in the next phase, ``setup()`` loads that decision and ``__call__`` applies it shard by shard.
    """

    state_path: str = ""

    def fit(self, shards: ShardSource) -> None:
        raise NotImplementedError

    def fit_gpus(self) -> float:
        """GPUs ``fit`` uses where the cluster has them (then the Ray executor runs it as a task holding
        them, on a node that has them); 0: it runs in the driver's process."""
        return 0.0


def drop(table: pa.Table, mask: pa.Array | pa.ChunkedArray, reason: str | pa.Array) -> pa.Table:
    """Record ``reason`` as ``drop_reason`` on rows where ``mask`` holds and that are still kept.

    The first filter that drops a row wins: rows already dropped or not ok keep their reason.
    """
    hit = pc.and_(pc.fill_null(mask, False), is_kept(table))
    if isinstance(reason, str):
        reason = pa.scalar(reason, pa.string())
    return set_column(table, "drop_reason", pc.if_else(hit, reason, table["drop_reason"]))


def set_column(table: pa.Table, name: str, values: Any, type: pa.DataType | None = None) -> pa.Table:
    """The table with ``values`` (a list, or an Arrow array used as it is) as column ``name``: in its place
    when the table has it, else appended. A list is typed as the schema declares the column, or as ``type``."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        if type is None:
            if name not in COLUMNS:
                raise KeyError(
                    f"column {name!r} is not declared: register the stage that adds it "
                    "(curate.core.registry.register), or import curate.core.registry for the builtin stages"
                )
            type = COLUMNS[name].type
        values = pa.array(values, type)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)
