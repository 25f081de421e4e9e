"""Test-only stages, registered by an explicit :func:`register_test_stages` call (``tests/conftest.py``,
the ``curate`` subprocesses of ``tests/raycluster.py``, the benchmarks that run them); pipelines of users never
see them.

They live in a module of their own (not in a test module) so that Ray workers and ``curate`` run in a
subprocess can import them: ``tests/`` is on their ``PYTHONPATH``. A Ray worker needs no registration: the
job it is sent brings the driver's columns (``curate.core.pipeline.PhaseJob.columns``).
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.base import StrictModel
from curate.core.registry import register
from curate.core.schema import COLUMNS, Column
from curate.core.stage import GlobalStage, ShardSource, Stage, StageResources, drop, set_column

__all__ = ["TEST_STAGES", "register_test_stages"]


class SyntheticImageConfig(StrictModel):
    size: int = Field(16, gt=0)


class SyntheticImage(Stage):
    """Test stage: a small deterministic PNG per ok row (colour from the uid), with width and height."""

    name = "synthetic_image"
    Config = SyntheticImageConfig
    reads = ("uid", "status")
    writes = ("image", "width", "height")

    def __call__(self, table: pa.Table) -> pa.Table:
        from PIL import Image

        images, widths, heights = [], [], []
        for uid, status in zip(table["uid"].to_pylist(), table["status"].to_pylist(), strict=True):
            if status != "ok":
                images.append(None)
                widths.append(None)
                heights.append(None)
                continue
            w = self.config.size + int(uid[0], 16)  # sizes vary: filters on width have something to do
            h = self.config.size
            buf = io.BytesIO()
            Image.new("RGB", (w, h), tuple(bytes.fromhex(uid[:6]))).save(buf, format="PNG")
            images.append(buf.getvalue())
            widths.append(w)
            heights.append(h)
        return (
            table.append_column("image", pa.array(images, pa.binary()))
            .append_column("width", pa.array(widths, pa.int32()))
            .append_column("height", pa.array(heights, pa.int32()))
        )


class CaptionChars(Stage):
    """Test stage that behaves like a model stage: state built in ``setup()``, run as an actor under Ray."""

    name = "caption_chars"
    columns = (
        Column("caption_chars", pa.int32(), "caption_chars", "test: caption length, by a model stage"),
    )
    reads = ("caption",)
    writes = ("caption_chars",)
    resources = StageResources(cpus=0.5, uses_model=True)

    def setup(self) -> None:
        self.setup_pid = os.getpid()

    def __call__(self, table: pa.Table) -> pa.Table:
        if not hasattr(self, "setup_pid"):  # the framework's ensure_setup() must have run setup()
            raise RuntimeError("setup() was not called before the stage ran")
        lengths = pc.utf8_length(pc.fill_null(table["caption"], ""))
        return table.append_column("caption_chars", pc.cast(lengths, pa.int32()))


class SleepConfig(StrictModel):
    seconds: float = Field(0.5, ge=0)


class Sleep(Stage):
    """Test stage: sleeps per shard, so that a test can kill a run midway."""

    name = "sleep"
    Config = SleepConfig

    def __call__(self, table: pa.Table) -> pa.Table:
        time.sleep(self.config.seconds)
        return table


class WhereRunConfig(StrictModel):
    marks: str = Field(description="folder: a file per shard, <first uid>.driver or <first uid>.ray")
    in_flight: int = Field(2, ge=1, description="its shards_in_flight")
    hold: float = Field(
        120.0, gt=0, description="seconds a shard in the driver waits for a Ray worker, at most"
    )


class WhereRun(Stage):
    """Test stage for the Ray executor's driver lane: an overlapping head (as the download stage) that marks
    where each shard ran, the driver or a Ray worker. In the driver it holds its shard until a Ray worker has
    marked one, so that the driver runs exactly the shards it took before the cluster's workers were ready."""

    name = "where_run"
    Config = WhereRunConfig
    reads = ("uid",)
    writes = ()
    overlaps_shards = True

    def shards_in_flight(self, shard_rows: int) -> int:
        return self.config.in_flight

    def setup(self) -> None:
        from ray._private import worker  # here, in one thread: two threads importing Ray at once fail

        self.worker = worker
        self.lock = threading.Lock()  # state that does not pickle, as the download stage's socket pool

    def __call__(self, table: pa.Table) -> pa.Table:
        in_ray = self.worker.global_worker.mode == self.worker.WORKER_MODE
        marks = Path(self.config.marks)
        (marks / f"{table['uid'][0].as_py()}.{'ray' if in_ray else 'driver'}").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.config.hold
        while not in_ray and not any(marks.glob("*.ray")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Ray worker ran a shard in {self.config.hold:g} s")
            time.sleep(0.05)
        return table


class FailConfig(StrictModel):
    rows: list[int] = Field(description="input_index values whose shard fails")
    times: int = Field(1, ge=0, description="fail this many attempts, then succeed; counted in state_dir")
    state_dir: str


class Fail(Stage):
    """Test stage: raises on shards that hold one of ``rows``, for the first ``times`` attempts."""

    name = "fail"
    Config = FailConfig

    def __call__(self, table: pa.Table) -> pa.Table:
        hit = set(self.config.rows) & set(table["input_index"].to_pylist())
        if hit:
            counter = Path(self.config.state_dir) / f"attempts-{min(hit)}"
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < self.config.times:
                raise RuntimeError(f"planned failure {n + 1}/{self.config.times} for rows {sorted(hit)}")
        return table


class KeepLongestConfig(StrictModel):
    keep: int = Field(gt=0, description="how many of the longest kept captions, over the whole dataset")


class KeepLongest(GlobalStage):
    """Test global stage: keeps the ``keep`` longest captions of the whole dataset (ties by uid)."""

    name = "keep_longest"
    Config = KeepLongestConfig
    reads = ("caption", "uid")
    writes = ("drop_reason",)

    def fit(self, shards: ShardSource) -> None:
        from curate.core.schema import is_kept
        from curate.core.storage import filesystem, write_atomic

        rows = []
        for shard in shards.ids:
            t = shards.read(shard, ["uid", "caption", "status", "drop_reason"])
            t = t.filter(is_kept(t))
            rows += [
                (-len(c or ""), u)
                for u, c in zip(t["uid"].to_pylist(), t["caption"].to_pylist(), strict=True)
            ]
        keep = [u for _, u in sorted(rows)[: self.config.keep]]
        fs, _ = filesystem(self.state_path)
        write_atomic(fs, f"{self.state_path}/keep.json", json.dumps(sorted(keep)).encode())

    def setup(self) -> None:
        from curate.core.storage import filesystem, read_json

        fs, _ = filesystem(self.state_path)
        self.keep = pa.array(read_json(fs, f"{self.state_path}/keep.json"), pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        return drop(table, pc.invert(pc.is_in(table["uid"], self.keep)), "not_longest")


class PlantedConfig(StrictModel):
    columns: list[str] = Field(min_length=1, description="declared columns to fill from input_<column>")


class Planted(Stage):
    """Test stage: copies input columns named ``input_<column>`` (the reader renames input columns that a
    stage declares) into the declared ``<column>``, cast to its type, on ok rows: planted embeddings,
    scores and hashes for testing the stages that read them."""

    name = "planted"
    Config = PlantedConfig

    config: PlantedConfig

    @property
    def reads(self) -> tuple[str, ...]:
        return ("status", *(f"input_{c}" for c in self.config.columns))

    @property
    def writes(self) -> tuple[str, ...]:
        return tuple(self.config.columns)

    def __call__(self, table: pa.Table) -> pa.Table:
        ok = pc.equal(table["status"], "ok")
        for column in self.config.columns:
            source = table[f"input_{column}"]
            values = pc.if_else(ok, source, pa.nulls(table.num_rows, source.type))
            table = set_column(table, column, values.cast(COLUMNS[column].type))
        return table


TEST_STAGES = (SyntheticImage, CaptionChars, Sleep, WhereRun, Fail, KeepLongest, Planted)


def register_test_stages() -> None:
    """Register the test stages (and their columns). Idempotent: a second call changes nothing."""
    for cls in TEST_STAGES:
        register(cls)
