"""The Ray plan: which stages fuse into task operators, which become actor pools, and their sizes on a given
cluster (fractional GPUs share a device; concurrency ranges from the config), as `curate describe` prints it
and the Ray executor runs it."""

from __future__ import annotations

import json

import pytest
from conftest import write_pipeline

from curate.base import ConfigError
from curate.core.config import load_config
from curate.core.pipeline import Pipeline
from curate.core.stage import StageResources
from curate.executors.plan import actor_sizing, plan

STAGES = [
    {"stage": "basic_filter", "min_words": 1},
    {"stage": "synthetic_image"},
    {"stage": "caption_chars", "resources": {"gpus": 0.25}},
    {"stage": "caption_chars", "name": "chars2", "resources": {"concurrency": [2, 5]}},
    {"stage": "basic_filter", "name": "late_filter"},
]


def _pipeline(tmp_path, stages=STAGES):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": ["http://x/1"], "caption": ["a b c"]}), tmp_path / "in.parquet")
    return write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)


def test_the_plan_fuses_cpu_stages_and_sizes_actor_pools(tmp_path):
    p = Pipeline(load_config(_pipeline(tmp_path), []))
    ops = plan(p.phases()[0], total_cpus=16, total_gpus=2)
    assert [(o.kind, o.stages) for o in ops] == [
        ("read", ()),
        ("tasks", ("basic_filter", "synthetic_image")),
        ("actors", ("caption_chars",)),
        ("actors", ("chars2",)),
        ("tasks", ("late_filter",)),
        ("write", ()),
    ]
    gpu, ranged = ops[2], ops[3]
    assert gpu.num_gpus == 0.25 and gpu.concurrency == 8  # four actors share each of the two GPUs
    assert ranged.concurrency == (2, 5) and ranged.num_gpus is None
    assert (
        "2-5 actors, each 0.5 CPU" in ranged.describe()
        and "8 actors, each 0.5 CPU, 0.25 GPU" in gpu.describe()
    )


def test_cpu_pools_share_what_the_read_and_write_tasks_leave():
    res = StageResources(cpus=1, uses_model=True)
    assert actor_sizing(res, total_cpus=2, total_gpus=0, pools=1) == {
        "concurrency": (1, 1),
        "num_cpus": 1,
        "num_gpus": None,
    }
    two = actor_sizing(res, total_cpus=2, total_gpus=0, pools=2)
    assert two["num_cpus"] == 0.5  # two model stages on a 2-CPU node: half a CPU each, never a hang


def test_a_gpu_stage_on_a_cluster_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stages\.clip\.resources\.gpus.*no GPUs"):
        actor_sizing(StageResources(gpus=0.5, uses_model=True), 8, 0, name="clip")


def test_bad_concurrency_ranges_fail_at_config_time(tmp_path):
    bad = [{"stage": "caption_chars", "resources": {"concurrency": [4, 2]}}]
    with pytest.raises(ConfigError, match="concurrency"):
        load_config(_pipeline(tmp_path, bad), [])


def test_describe_prints_the_plan_for_a_cluster(tmp_path, cli):
    path = _pipeline(tmp_path)
    r = cli("describe", path, "--cpus", 16, "--gpus", 2)
    assert r.code == 0, r.err
    assert "on a cluster of 16 CPUs and 2 GPUs" in r.out
    assert "actor pool [caption_chars]: 8 actors, each 0.5 CPU, 0.25 GPU" in r.out
    assert "tasks [basic_filter, synthetic_image]: 1 CPU per task" in r.out
    r = cli("describe", path, "--json", "--cpus", 4, "--gpus", 1)
    doc = json.loads(r.out)
    ops = doc["ray"]["phases"][0]
    assert doc["ray"]["cluster"] == {"cpus": 4, "gpus": 1}
    assert ops[2] == {
        "kind": "actors",
        "stages": ["caption_chars"],
        "num_cpus": 0.5,
        "num_gpus": 0.25,
        "concurrency": 4,
    }
    r = cli("describe", path, "--gpus", 0)
    assert r.code == 2 and "no GPUs" in r.err
