"""The stage protocol: one small class per step, with its config, the columns it reads and writes, and what it
needs to run. Stages never import Ray; executors adapt them.

    class MinSide(Stage):
        name = "min_side"
        class Config(StrictModel):
            pixels: int = 64
        reads = ("width", "height")
        writes = ("drop_reason",)

        def __call__(self, table):
            small = pc.less(pc.min_element_wise(table["width"], table["height"]), self.config.pixels)
            return drop(table, small, f"min_side<{self.config.pixels}")
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curate.base import Resources, StrictModel
from curate.core.schema import is_kept

__all__ = ["GlobalStage", "NoConfig", "Stage", "StageResources", "drop"]


class NoConfig(StrictModel):
    """For stages without parameters."""


@dataclass(frozen=True)
class StageResources:
    """What one worker of the stage needs. ``uses_model`` stages run as actor pools under Ray, so that
    ``setup()`` (loading weights) happens once per actor, not once per shard."""

    cpus: float = 1.0
    gpus: float = 0.0
    concurrency: int | tuple[int, int] | None = None
    batch_size: int | None = None
    uses_model: bool = False

    def merged(self, override: Resources) -> StageResources:
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return replace(self, **changes)

    @property
    def needs_actor(self) -> bool:
        return self.uses_model or self.gpus > 0


class Stage:
    """A per-shard step: ``__call__(table) -> table`` on one shard at a time.

    Heavy state (models) is loaded in ``setup()``, once per worker, never in ``__init__``, so that a stage
    pickles cheaply. A stage keeps every row: it adds columns, or records ``drop_reason`` on rows it drops.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = NoConfig
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    resources: StageResources = StageResources()

    def __init__(self, config: StrictModel | None = None):
        self.config = config if config is not None else self.Config()

    def setup(self) -> None:
        """Load heavy state. Called once per worker before the first shard."""

    def weights(self) -> list[Any]:
        """The :class:`curate.models.weights.WeightsSpec` files ``setup()`` will resolve from the model
        directory or the hub: checked before a run starts, and what ``curate models fetch`` downloads.
        Weights given by an explicit path, or shipped inside a wheel, are not listed."""
        return []

    def __call__(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class GlobalStage(Stage):
    """A step that must see every shard before it can decide, such as deduplication.

    The pipeline runs the stages before it on every shard and keeps their output; then calls ``fit(shards)``
    once, which reads what it needs and writes its decision under ``self.state_path`` (an fsspec URL);
    then, in the next phase, ``setup()`` loads that decision and ``__call__`` applies it shard by shard.
    """

    state_path: str = ""

    def fit(self, shards: Any) -> None:
        """``shards`` is a :class:`curate.core.pipeline.PhaseShards`: ``ids`` and ``read(id, columns)``."""
        raise NotImplementedError


def drop(table: pa.Table, mask: pa.Array | pa.ChunkedArray, reason: str | pa.Array) -> pa.Table:
    """Record ``reason`` as ``drop_reason`` on rows where ``mask`` holds and that are still kept.

    The first filter that drops a row wins: rows already dropped or not ok keep their reason.
    """
    hit = pc.and_(pc.fill_null(mask, False), is_kept(table))
    if isinstance(reason, str):
        reason = pa.scalar(reason, pa.string())
    new = pc.if_else(hit, reason, table["drop_reason"])
    return table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason", new)
