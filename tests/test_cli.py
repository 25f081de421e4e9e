"""The ``curate`` command as a user runs it, including a run killed with SIGKILL and resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import shard_files, sidecars, write_pipeline
from support.data import make_input

# `curate` with the test-only stages registered, in its own process.
CURATE = [
    sys.executable,
    "-c",
    "from support.stages import register_test_stages; register_test_stages(); from curate.cli import main; main()",
]


def curate(*args, **kw):
    return subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, executor, request):
    """`curate run` (under Ray: with the local cluster it started) SIGKILLed with every process of its group;
    the rerun (here, in this process: under Ray, on the session's cluster) completes it to the bytes of an
    uninterrupted run."""
    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    make_input(tmp_path / "in.parquet", 1200, bad_every=17)
    stages = [
        {"stage": "synthetic_image"},
        {"stage": "sleep", "seconds": 0.25},
        {"stage": "basic_filter", "min_caption_length": 3},
    ]
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        stages,
        shard_size=100,
        executor={"kind": executor, "num_cpus": 2},
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([*CURATE, "run", str(p), "-q"], env=env, start_new_session=True)
    shards = tmp_path / "out/shards"
    deadline = time.time() + 90
    while time.time() < deadline and len(list(shards.glob("*_stats.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and, under Ray, every worker it started
    proc.wait()
    done_before = len(list(shards.glob("*_stats.json")))
    assert 3 <= done_before < 12, "the kill should land midway"

    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    clean = load_config(p, [f"output.path={tmp_path / 'clean'}", "executor.kind=local"])
    assert run_pipeline(clean, show_progress=False).exit_code == 0
    assert shard_files(tmp_path / "out") == shard_files(tmp_path / "clean")
    assert len(shard_files(tmp_path / "out")) == 24
    assert not list((tmp_path / "out").rglob("*.tmp-*"))
    side = sidecars(tmp_path / "out")
    assert sorted(side["input_index"].to_pylist()) == list(range(1200))
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert info["status"] == "finished" and info["counts"]["rows"] == 1200


def test_validate_describe_status(tmp_path, cli):
    make_input(tmp_path / "in.parquet", 250)
    stages = [{"stage": "basic_filter", "name": "filter", "min_words": 2}, {"stage": "caption_chars"}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    r = cli("validate", p)
    assert r.code == 0 and "ok: test: 2 stage(s), 1 input file(s), 250 rows in 3 shard(s)" in r.out

    r = cli("describe", p, "--json")
    plan = json.loads(r.out)
    assert [s["name"] for s in plan["stages"]] == ["filter", "caption_chars"]
    assert plan["stages"][0]["runs_as"] == "tasks" and plan["stages"][1]["runs_as"] == "actor pool"
    assert plan["stages"][1]["writes"] == ["caption_chars"] and "caption_chars" in plan["columns"]
    r = cli("describe", p)
    assert r.code == 0 and "1 caption_chars (caption_chars, per-shard): runs as actor pool" in r.out
    assert "writes: caption_chars" in r.out and "input columns: uid, input_index" in r.out

    r = cli("status", tmp_path / "out")
    assert r.code == 2 and "holds no run.json" in r.err
    assert cli("run", p, "-q").code == 0
    report = json.loads(cli("status", tmp_path / "out", "--json").out)
    assert report["shards"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    assert report["counts"]["rows"] == 250 and report["status"] == "finished"
    r = cli("status", tmp_path / "out")
    assert "3/3 shards done, 0 failed, 0 pending" in r.out


def test_run_shows_progress_and_the_funnel(tmp_path, cli):
    make_input(tmp_path / "in.parquet", 120, bad_every=10)
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [{"stage": "basic_filter", "min_caption_length": 3}],
    )
    r = cli("run", p)
    assert r.code == 0
    assert "input rows" in r.err and "120" in r.err and "kept" in r.err
    assert "status invalid_url" in r.err and "dropped caption_length<3" in r.err
    assert "basic_filter" in r.err and "rows/s" in r.err


def test_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "curate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for command in ("run", "validate", "describe", "status"):
        assert command in r.stdout


def test_run_joins_an_existing_cluster_by_address(tmp_path, ray_cluster):
    make_input(tmp_path / "in.parquet", 300)
    p = write_pipeline(
        tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", [{"stage": "caption_chars"}]
    )
    address = ray_cluster.get_runtime_context().gcs_address
    r = curate("run", p, "-q", "--address", address)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert info["executor"] == "ray" and info["counts"]["rows"] == 300
    # the cluster it joined is still up: curate stops only a cluster it started
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources()["CPU"] == 2


def test_an_address_where_no_cluster_answers_fails_fast(tmp_path, cli):
    import socket

    make_input(tmp_path / "in.parquet", 10)
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", [])
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("run", p, "--address", f"127.0.0.1:{port}")
    assert r.code == 2 and f"executor.address: no Ray cluster answers at 127.0.0.1:{port}" in r.err, r
    assert not (tmp_path / "out").exists()
    r = cli("run", p, "--address", "nonsense")
    assert r.code == 2 and "is not HOST:PORT" in r.err


def _curate_in_a_clean_env(
    args: list[str], env: dict[str, str], prelude: str = ""
) -> subprocess.CompletedProcess:
    code = f"{prelude}\nfrom curate.cli import main\nmain()"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "AZURE_"))}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_object_storage_problems_are_clear_errors(tmp_path):
    """No fsspec backend installed, or no credentials: exit 2 and one line saying what to fix. Nothing
    leaves the machine: the instance metadata service is off and the endpoint is a closed local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = tmp_path / "p.yaml"
    p.write_text(
        "name: t\ninput: {path: s3://bucket/in.parquet}\noutput: {path: s3://bucket/out}\n"
        "stages:\n  - stage: basic_filter\n"
    )
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    r = _curate_in_a_clean_env(["validate", str(p)], env, "import sys; sys.modules['s3fs'] = None")
    assert r.returncode == 2 and "pip install 'curate[s3]'" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )
    r = _curate_in_a_clean_env(["validate", str(p)], env)
    assert r.returncode == 2 and "object storage: NoCredentialsError" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
