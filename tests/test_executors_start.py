"""`--executor ray` with no cluster to join: curate starts a local one, and the driver runs a phase's first
shards itself while the cluster comes up (curate.executors.ray, the driver's lane). The run is a `curate`
subprocess with a Ray temp dir of its own, so it starts a fresh cluster and never meets the session's."""

import json
import shutil
import subprocess
import tempfile

from conftest import shard_files, write_pipeline
from raycluster import CURATE, cluster_env
from support.data import make_input

from curate.core.config import load_config
from curate.core.runner import run_pipeline


def test_the_driver_runs_the_shards_it_took_before_the_first_ray_worker_was_ready(tmp_path):
    make_input(tmp_path / "in.parquet", 600, bad_every=13)
    marks = tmp_path / "marks"
    marks.mkdir()
    stages = [
        # An overlapping head, as the download stage: two shards in flight per worker. In the driver it holds
        # its shard until a Ray worker has run one, so the driver ends with exactly the two it took at once.
        {"stage": "where_run", "marks": str(marks), "in_flight": 2},
        {"stage": "synthetic_image", "size": 16},
        {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
    ]
    pipeline = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "ray",
        stages,
        shard_size=100,
        executor={"kind": "ray", "num_cpus": 2},
    )
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        driver = subprocess.Popen(
            [*CURATE, "run", str(pipeline), "-q"],
            env={**cluster_env(), "RAY_TMPDIR": ray_tmp},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = driver.communicate(timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 0, err[-3000:]
    assert "logging.cc" not in err  # Ray's announcement on fd 2, while it started in the background

    stats = {p.name[:5]: json.loads(p.read_text()) for p in (tmp_path / "ray/shards").glob("*_stats.json")}
    assert sorted(stats) == ["00000", "00001", "00002", "00003", "00004", "00005"]
    by_driver = sorted(s for s, st in stats.items() if st["node"].get("driver"))
    assert by_driver == ["00000", "00001"]
    assert all(stats[s]["node"]["id"] for s in stats if s not in by_driver)  # a Ray node wrote the others

    where = {m.suffix: [] for m in marks.iterdir()}
    for m in marks.iterdir():
        where[m.suffix].append(int(m.read_text()))
    assert len(where[".driver"]) == 2 and set(where[".driver"]) == {driver.pid}
    assert len(where[".ray"]) == 4 and driver.pid not in where[".ray"]

    # The same bytes as the local executor writes.
    local_marks = tmp_path / "local_marks"
    local_marks.mkdir()
    (local_marks / "any.ray").write_text("")  # nothing to wait for
    sets = [
        f"output.path={tmp_path / 'local'}",
        "executor.kind=local",
        f"stages.where_run.marks={local_marks}",
    ]
    local = run_pipeline(load_config(pipeline, sets), show_progress=False)
    assert local.exit_code == 0 and len(local.shards_done) == 6
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "local")
