"""A two-node Ray cluster on this machine (a head and a second node, each started with ``ray start``), a
``curate run`` submitted to it with ``ray job submit``: both nodes write shards and the output equals a local
run's, also when the second node is killed midway.

The cluster (``raycluster.Cluster``) has its own temp dir and ports, so it never meets the session's cluster
(``ray_cluster``) or any other Ray on the machine; it is stopped by killing its process groups, never with
``ray stop`` (which stops every Ray of the user). Ray binds a node to the machine's IP even when told 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import shard_files, write_pipeline
from raycluster import CURATE, Cluster, cluster_env, ray_default_missing

from curate.core.config import load_config
from curate.core.runner import run_pipeline

pytestmark = pytest.mark.slow

SHARDS = 10


@pytest.fixture(scope="module")
def cluster():
    missing = ray_default_missing()
    if missing:  # a failure, not a skip: CI must run this test
        pytest.fail(f"the dashboard and `ray job submit` need ray[default] (missing: {', '.join(missing)})")
    with Cluster(cluster_env()) as c:
        yield c


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, world_server):
    """The sample world downloaded in SHARDS shards of 20 rows; each shard sleeps, so a kill lands midway."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("multinode")
    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    stages = [
        {"stage": "basic_filter", "min_words": 2},
        {"stage": "download", "allow_private": [server.host_port], "image_size": 64, "backoff": 0.05},
        {"stage": "sleep", "seconds": 0.5},
    ]
    p = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "out",
        stages,
        shard_size=200 // SHARDS,
        input={"url_col": "url", "caption_col": "caption"},
    )
    local = run_pipeline(load_config(p, [f"output.path={tmp / 'local'}"]), show_progress=False)
    assert local.exit_code == 0 and len(local.shards_done) == SHARDS
    return tmp, p


def _submit_run(cluster: Cluster, p: Path, output: Path) -> str:
    # As README's "Running on a Ray cluster": the job's driver joins the cluster through RAY_ADDRESS, which
    # Ray sets for it.
    return cluster.submit(*CURATE, "run", str(p), "-q", "--executor", "ray", "--set", f"output.path={output}")


def _nodes_of_shards(output: Path) -> dict[str, str]:
    return {
        p.name.split("_")[0]: json.loads(p.read_text())["node"]["id"]
        for p in sorted((output / "shards").glob("*_stats.json"))
    }


def test_a_job_on_two_nodes_uses_both_and_writes_what_a_local_run_writes(cluster, pipeline, ray_cluster):
    tmp, p = pipeline
    assert "RAY_ADDRESS" not in os.environ
    nodes = cluster.node_ids()
    assert sorted(nodes.values()) == ["head", "worker"]

    state, logs = cluster.wait_job(_submit_run(cluster, p, tmp / "two"))
    assert state == "SUCCEEDED", logs[-3000:]

    made_by = _nodes_of_shards(tmp / "two")
    assert len(made_by) == SHARDS
    assert {nodes[n] for n in made_by.values()} == {"head", "worker"}, made_by
    assert shard_files(tmp / "two") == shard_files(tmp / "local")
    assert len(shard_files(tmp / "local")) == 2 * SHARDS
    assert not list((tmp / "two").rglob("*.tmp-*"))
    # The session's own cluster (in this process) is untouched by this one.
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1


def test_a_job_survives_losing_a_node_midway(cluster, pipeline, ray_cluster):
    tmp, p = pipeline
    nodes = cluster.node_ids()
    assert sorted(nodes.values()) == ["head", "worker"], "the worker node is gone before the test"
    out = tmp / "killed"
    job_id = _submit_run(cluster, p, out)

    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*_stats.json")):
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    cluster.kill_worker()
    done_at_kill = len(list((out / "shards").glob("*_stats.json")))

    state, logs = cluster.wait_job(job_id)
    assert state == "SUCCEEDED", logs[-3000:]
    assert done_at_kill < SHARDS, "the kill should land midway"
    made_by = _nodes_of_shards(out)
    assert len(made_by) == SHARDS
    head = next(n for n, role in nodes.items() if role == "head")
    assert sum(n == head for n in made_by.values()) >= SHARDS - done_at_kill  # the rest made on the head
    assert shard_files(out) == shard_files(tmp / "local")
    assert not list(out.rglob("*.tmp-*"))
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1
