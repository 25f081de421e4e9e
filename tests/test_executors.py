"""The same pipeline on the local executor and on a shared local Ray cluster writes the same bytes, and the
output opens in the readers users train with."""

import json
import subprocess
import sys

import pytest
import webdataset as wds
from conftest import shard_files, sidecars, write_pipeline
from raycluster import cluster_env
from support.data import make_input

from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.core.schema import is_kept

STAGES = [
    {"stage": "synthetic_image", "size": 16},
    {"stage": "caption_chars"},  # a model-like stage: an actor pool under Ray
    {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
]


def run(path, *sets):
    return run_pipeline(load_config(path, list(sets)), show_progress=False)


def counts_without_timings(output):
    out = {}
    for p in sorted((output / "shards").glob("*_stats.json")):
        stats = json.loads(p.read_text())
        stats["stages"] = {k: v["kept"] for k, v in stats["stages"].items()}
        stats.pop("node", None)  # under Ray: the node that wrote the shard
        out[p.name] = stats
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("executors")
    make_input(tmp / "in.parquet", 900, bad_every=13)
    p = write_pipeline(tmp / "p.yaml", tmp / "in.parquet", tmp / "out", STAGES, shard_size=150)
    local = run(p, f"output.path={tmp / 'local'}")
    ray = run(p, f"output.path={tmp / 'ray'}", "executor.kind=ray")
    assert local.exit_code == 0 and ray.exit_code == 0
    return tmp, local, ray


def test_local_and_ray_write_identical_bytes(outputs):
    tmp, local, ray = outputs
    assert len(local.shards_done) == len(ray.shards_done) == 6
    a, b = shard_files(tmp / "local"), shard_files(tmp / "ray")
    assert sorted(a) == sorted(b) and len(a) == 12
    assert a == b
    assert counts_without_timings(tmp / "local") == counts_without_timings(tmp / "ray")
    assert local.counts == ray.counts


def test_tars_open_with_webdataset_and_match_the_sidecars(outputs):
    tmp, _, _ = outputs
    side = sidecars(tmp / "ray")
    kept = side.filter(is_kept(side))
    by_uid = {r["uid"]: r for r in kept.to_pylist()}
    shards = sorted(str(p) for p in (tmp / "ray/shards").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert len(samples) == kept.num_rows == len(by_uid)
    for s in samples:
        meta = json.loads(s["json"])
        row = by_uid[s["__key__"]]
        assert meta == {k: v for k, v in row.items()}
        assert s["txt"].decode() == row["caption"]
        assert meta["caption_chars"] == len(row["caption"])
        assert s["png"][:4] == b"\x89PNG" and meta["width"] >= 20


def test_tars_open_with_ray_data(outputs, ray_cluster):
    import ray.data

    tmp, _, _ = outputs
    ds = ray.data.read_webdataset(str(tmp / "local/shards"), decoder=None, file_extensions=["tar"])
    rows = ds.take_all()
    side = sidecars(tmp / "local")
    assert sorted(r["__key__"] for r in rows) == sorted(side.filter(is_kept(side))["uid"].to_pylist())
    assert all(json.loads(r["json"])["uid"] == r["__key__"] for r in rows)
    # the sidecars open with Ray Data too
    assert ray.data.read_parquet(str(tmp / "local/shards")).count() == 900


def test_global_stage_and_retries_under_ray(tmp_path, ray_cluster):
    make_input(tmp_path / "in.parquet", 400, bad_every=7)
    stages = [
        {"stage": "fail", "rows": [250], "times": 1, "state_dir": str(tmp_path)},
        {"stage": "caption_chars"},
        {"stage": "keep_longest", "keep": 30},
        {"stage": "basic_filter", "min_words": 3},
    ]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    ray = run(p, f"output.path={tmp_path / 'ray'}", "executor.kind=ray")
    assert ray.exit_code == 0 and (tmp_path / "attempts-250").read_text() == "2"
    local = run(p, f"output.path={tmp_path / 'local'}")
    assert local.exit_code == 0
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
    assert ray.counts["kept"] <= 30 and ray.counts["drop_reason"]["not_longest"] > 0


def test_ray_reports_a_shard_that_keeps_failing(tmp_path, ray_cluster):
    make_input(tmp_path / "in.parquet", 300)
    stages = [{"stage": "fail", "rows": [0], "times": 5, "state_dir": str(tmp_path)}]
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        stages,
        executor={"kind": "ray", "max_shard_retries": 1, "object_store_memory": 64 << 20},
    )
    summary = run(p)
    assert summary.exit_code == 1 and list(summary.shards_failed) == ["00000"]
    assert summary.shards_done == ["00001", "00002"]
    assert "planned failure 2/5" in summary.shards_failed["00000"]
    from ray.data import DataContext

    limits = DataContext.get_current().execution_options.resource_limits
    assert limits.object_store_memory != 64 << 20  # the caller's settings are restored


def test_a_fit_that_uses_gpus_runs_as_a_ray_task_where_the_gpus_are(tmp_path, ray_cluster):
    """Semantic dedup's fit asks for a GPU where the cluster has one: the driver's machine may have none, so
    it runs as a Ray task there. The task reads the shards and writes the decision as the driver would."""
    from curate.core.pipeline import BoundStage, PhaseShards, Pipeline
    from curate.executors.plan import Cluster
    from curate.executors.ray import RayExecutor, fit_options

    make_input(tmp_path / "in.parquet", 300)
    stages = [{"stage": "caption_chars"}, {"stage": "keep_longest", "keep": 25}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    assert run(p, "executor.kind=ray").exit_code == 0
    pipeline = Pipeline(load_config(p, []))
    bound = pipeline.stages[1]
    local_state = tmp_path / "out" / "global" / "keep_longest" / "keep.json"
    expected = json.loads(local_state.read_text())
    local_state.unlink()
    # The run removed its phase files; make them again for the fit.
    job = pipeline.job(0)
    ids = [s.id for s in pipeline.reader.plan(pipeline.config.shard_size)]
    for spec in pipeline.reader.plan(pipeline.config.shard_size):
        job.process(spec)
    shards = PhaseShards(str(tmp_path / "out"), job.sink_dir, ids)
    RayExecutor.fit_remote(bound, shards, {"num_cpus": 1})
    assert json.loads(local_state.read_text()) == expected

    dedup = BoundStage("dedup", _dedup(semantic=True), bound.resources)
    with_gpus, without = Cluster.uniform(2, 8, 4), Cluster.uniform(2, 8, 0)
    assert fit_options(dedup, with_gpus) == {"num_gpus": 1.0, "num_cpus": 1}
    assert fit_options(dedup, without) is None  # FAISS on the driver's CPUs
    assert fit_options(BoundStage("d", _dedup(semantic=False), bound.resources), with_gpus) is None
    assert fit_options(bound, with_gpus) is None  # a fit without GPUs stays in the driver


def test_a_curate_folder_in_the_working_directory_does_not_shadow_curate_in_ray_workers(tmp_path):
    """Ray puts the driver's working directory first on its workers' ``sys.path``. A folder named ``curate``
    there (an output folder, a checkout) must not be what the workers import as ``curate``. This one fails
    loudly when imported, so that the test does not depend on how curate is installed (an empty folder
    shadows an editable install only). The driver starts its own local cluster from that directory."""
    shadow = tmp_path / "curate"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the folder curate/, not the package')\n")
    make_input(tmp_path / "in.parquet", 40)
    stages = [{"stage": "basic_filter", "min_caption_length": 3}]
    executor = {"kind": "ray", "num_cpus": 1, "max_shard_retries": 0}
    write_pipeline(tmp_path / "p.yaml", "in.parquet", "out", stages, shard_size=20, executor=executor)
    # -P: the driver imports the installed curate, as the `curate` command does (no working directory first).
    command = [sys.executable, "-P", "-m", "curate", "run", "p.yaml", "-q"]
    r = subprocess.run(command, cwd=tmp_path, env=cluster_env(), capture_output=True, text=True, timeout=300)
    failed = [
        json.loads(p.read_text())["error"][-300:] for p in (tmp_path / "out" / "shards").glob("*_failed.json")
    ]
    assert r.returncode == 0 and not failed, r.stderr[-2000:] + "\n".join(failed)
    assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
    ]


def _dedup(semantic: bool):
    from curate.stages.dedup import Dedup, DedupConfig

    return Dedup(DedupConfig(semantic=semantic))
