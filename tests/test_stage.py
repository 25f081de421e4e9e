"""The stage protocol: setup once per process, columns registered with their stage, one way to set a column,
and what a global stage's fit reads."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest
from conftest import write_pipeline
from support.data import make_input

import curate.core.registry as registry
import curate.core.schema as schema
from curate.core.config import load_config
from curate.core.pipeline import PhaseShards, Pipeline
from curate.core.registry import STAGES, register
from curate.core.schema import COLUMNS, Column
from curate.core.stage import ShardSource, Stage, drop, set_column


class Counting(Stage):
    name = "counting"
    columns = (Column("counted", pa.int64(), "counting", "test: how many times setup() ran"),)
    writes = ("counted",)

    def setup(self) -> None:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 1 and getattr(self, "fail_first", False):
            raise RuntimeError("first setup fails")

    def __call__(self, table: pa.Table) -> pa.Table:
        return set_column(table, "counted", [self.calls] * table.num_rows)


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry and the schema as they are, restored after the test."""
    monkeypatch.setattr(registry, "STAGES", dict(registry.STAGES))
    monkeypatch.setattr(schema, "COLUMNS", dict(schema.COLUMNS))
    return registry.STAGES, schema.COLUMNS


def test_ensure_setup_runs_setup_once():
    stage = Counting()
    stage.ensure_setup()
    stage.ensure_setup()
    assert stage.calls == 1


def test_a_setup_that_raised_runs_again():
    stage = Counting()
    stage.fail_first = True
    with pytest.raises(RuntimeError, match="first setup fails"):
        stage.ensure_setup()
    stage.ensure_setup()
    assert stage.calls == 2


def test_a_copy_sent_to_another_process_sets_itself_up_there():
    stage = Counting()
    stage.ensure_setup()
    copy = pickle.loads(pickle.dumps(stage))
    copy.ensure_setup()
    assert copy.calls == 2 and stage.calls == 1


def test_registering_a_stage_declares_its_columns_in_order(fresh_registry):
    stages, columns = fresh_registry
    assert "counted" not in columns
    register(Counting)
    assert stages["counting"] is Counting and columns["counted"] is Counting.columns[0]
    assert list(columns)[-1] == "counted"
    register(Counting)  # again: nothing changes
    assert list(columns).count("counted") == 1


def test_a_column_declared_with_another_type_is_refused(fresh_registry):
    class Clash(Stage):
        name = "clash"
        columns = (Column("uid", pa.int64(), "clash", "test: uid as a number"),)

    with pytest.raises(ValueError, match="'uid' is already declared as string"):
        register(Clash)
    assert schema.COLUMNS["uid"].type == pa.string()


def test_the_builtin_stages_columns_are_declared_once_the_registry_is_imported():
    for cls in STAGES.values():
        for column in cls.columns:
            assert COLUMNS[column.name] == column, column.name
    # The order of the columns in every written table: core columns, then the stages' by module name.
    assert list(COLUMNS)[: len(schema.CORE_COLUMNS)] == list(schema.CORE_COLUMNS)
    assert (
        list(COLUMNS).index("aesthetic_score")
        < list(COLUMNS).index("clip_score")
        < list(COLUMNS).index("mime")
    )


def test_set_column_replaces_in_place_or_appends_typed_as_declared():
    table = pa.table({"uid": ["a", "b"], "drop_reason": [None, None], "x": [1, 2]})
    out = set_column(table, "drop_reason", ["r", None])
    assert out.column_names == ["uid", "drop_reason", "x"] and out["drop_reason"].to_pylist() == ["r", None]
    out = set_column(table, "clip_score", [0.5, None])
    assert out.column_names[-1] == "clip_score" and out.schema.field("clip_score").type == pa.float32()
    out = set_column(table, "x", pa.array([3, 4], pa.int8()))  # an Arrow array is used as it is
    assert out.schema.field("x").type == pa.int8()
    assert set_column(table, "y", [1, 2], pa.int16()).schema.field("y").type == pa.int16()
    with pytest.raises(KeyError, match="'y' is not declared"):
        set_column(table, "y", [1, 2])


def test_drop_keeps_the_first_reason():
    table = pa.table({"status": ["ok", "ok", "http_404"], "drop_reason": [None, "earlier", None]})
    out = drop(table, pa.array([True, True, True]), "now")
    assert out["drop_reason"].to_pylist() == ["now", "earlier", None]


def test_phase_shards_is_what_fit_reads(tmp_path):
    make_input(tmp_path / "in.parquet", 30)
    stages = [{"stage": "caption_chars"}, {"stage": "keep_longest", "keep": 5}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages, shard_size=10)
    pipeline = Pipeline(load_config(p))
    job = pipeline.job(0)
    specs = pipeline.reader.plan(10)
    for spec in specs:
        job.process(spec)
    shards: ShardSource = PhaseShards(str(tmp_path / "out"), job.sink_dir, [s.id for s in specs])
    assert shards.ids == ["00000", "00001", "00002"] and shards.output_path == str(tmp_path / "out")
    table = shards.read("00001", ["uid", "caption_chars"])
    assert table.column_names == ["uid", "caption_chars"] and table.num_rows == 10
    assert "caption" in shards.read("00001").column_names


def test_a_job_sent_to_a_worker_brings_the_drivers_columns(tmp_path, monkeypatch):
    make_input(tmp_path / "in.parquet", 10)
    stages = [{"stage": "caption_chars"}]  # registered in this process only, by tests/conftest.py
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    sent = pickle.dumps(Pipeline(load_config(p)).job(0))
    monkeypatch.delitem(COLUMNS, "caption_chars")  # as in a worker process that never registered it
    pickle.loads(sent)
    assert COLUMNS["caption_chars"].type == pa.int32()
