"""Object storage: input read from and shards written to an S3-compatible store (moto's server on 127.0.0.1).

A store is configured the way a user points curate at MinIO or S3: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` in the environment, which botocore (under s3fs) reads.
S3 has no rename, so every file is one complete object and ``_stats.json``, written last, marks a shard done.
"""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
from conftest import shard_files, write_pipeline

pytest.importorskip("s3fs", reason="pip install -e '.[dev]' (s3fs)")
pytest.importorskip("moto.server", reason="pip install -e '.[dev]' (moto[server])")

from curate.base import TrainDataError
from curate.core.config import load_config
from curate.core.output import collect_output
from curate.core.runner import run_pipeline
from curate.core.storage import TMP_MARK, filesystem, write_atomic
from curate.train.data import find_shards

BUCKET = "curate-test"
SHARDS = ["00000", "00001", "00002", "00003"]


@pytest.fixture(scope="module")
def s3():
    """A local S3 server, with the environment a user would set for MinIO; yields its endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # an s3fs made before this point knows another endpoint
        filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _pipeline(tmp_path, world_server, input_path, output_path, name="p", **top):
    _, server = world_server
    stages = [
        {"stage": "download", "image_size": 32, "allow_private": [server.host_port], "backoff": 0.05},
        {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
    ]
    return write_pipeline(
        tmp_path / f"{name}.yaml",
        input_path,
        output_path,
        stages,
        input={"url_col": "url", "caption_col": "caption"},
        shard_size=50,
        **top,
    )


def run(path, *sets, **kw):
    return run_pipeline(load_config(path, list(sets)), show_progress=False, **kw)


def _without_timings(stats: dict) -> dict:
    """The stats that a rerun repeats: without seconds, and without the Ray node that wrote the shard."""
    kept = {k: v for k, v in stats.items() if k != "node"}
    return {**kept, "stages": {k: v["kept"] for k, v in stats["stages"].items()}}


def s3_files(url: str) -> dict[str, bytes]:
    """Every tar and parquet of an output on S3, by name (as ``shard_files`` for a local one)."""
    fs, root = filesystem(url)
    return {
        p.rsplit("/", 1)[-1]: fs.cat_file(p)
        for p in sorted(fs.glob(f"{root}/shards/*.*"))
        if p.endswith((".tar", ".parquet"))
    }


def s3_stats(url: str) -> dict[str, dict]:
    fs, root = filesystem(url)
    return {
        p.rsplit("/", 1)[-1]: _without_timings(json.loads(fs.cat_file(p)))
        for p in sorted(fs.glob(f"{root}/shards/*_stats.json"))
    }


def local_stats(path) -> dict[str, dict]:
    return {
        p.name: _without_timings(json.loads(p.read_text()))
        for p in sorted((path / "shards").glob("*_stats.json"))
    }


@pytest.fixture(scope="module")
def reference(s3, world_server, tmp_path_factory):
    """The same pipeline with a local input and output, and the input uploaded to S3."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("object_storage")
    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.put_file(str(tmp / "in.parquet"), f"{BUCKET}/input/in.parquet")
    summary = run(_pipeline(tmp, world_server, tmp / "in.parquet", tmp / "local"))
    assert summary.exit_code == 0 and summary.shards_done == SHARDS
    dropped = {p.name: p.read_bytes() for p in (tmp / "local/dropped").iterdir()}
    return tmp, shard_files(tmp / "local"), local_stats(tmp / "local"), dropped, summary.counts


def _no_temporary_objects(url: str) -> None:
    fs, root = filesystem(url)
    assert not [p for p in fs.find(root) if TMP_MARK in p]


def test_s3_input_and_output_give_the_bytes_of_a_local_run(s3, reference, world_server):
    import webdataset as wds

    tmp, files, stats, dropped, counts = reference
    out = f"s3://{BUCKET}/out-local"
    summary = run(_pipeline(tmp, world_server, f"s3://{BUCKET}/input/in.parquet", out, "s3"))
    assert summary.exit_code == 0 and summary.shards_done == SHARDS and summary.counts == counts
    assert s3_files(out) == files and len(files) == 8
    assert s3_stats(out) == stats
    fs, root = filesystem(out)
    assert {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(f"{root}/dropped")} == dropped
    info = json.loads(fs.cat_file(f"{root}/run.json"))
    assert info["status"] == "finished" and info["input_files"] == [f"s3://{BUCKET}/input/in.parquet"]
    _no_temporary_objects(out)

    # Read back straight from S3: the sidecars with pyarrow over s3fs, the tars with webdataset's tar
    # iterators over an s3fs stream; the tars hold exactly the kept rows.
    side = pq.read_table(fs.glob(f"{root}/shards/*.parquet"), filesystem=fs)
    kept = {r["uid"] for r in side.to_pylist() if r["status"] == "ok" and r["drop_reason"] is None}
    assert side.num_rows == 200 and len(kept) == counts["kept"] > 0
    samples = []
    for tar in find_shards([out]):
        with fs.open(tar, "rb") as f:
            members = ({**m, "__url__": tar} for m in wds.tariterators.tar_file_iterator(f))
            samples += list(wds.tariterators.group_by_keys(members))
    assert {s["__key__"] for s in samples} == kept
    assert all(
        s["jpg"][:3] == b"\xff\xd8\xff" and json.loads(s["json"])["uid"] == s["__key__"] for s in samples
    )


class Killed(BaseException):
    """A writer killed between its files: not an Exception, so no retry catches it."""


def test_a_writer_killed_mid_shard_leaves_no_partial_object_and_a_rerun_completes_it(
    s3, reference, world_server, monkeypatch, cli
):
    import curate.core.writer

    tmp, files, stats, _, counts = reference
    out = f"s3://{BUCKET}/out-killed"
    p = _pipeline(tmp, world_server, f"s3://{BUCKET}/input/in.parquet", out, "killed")
    write_json = curate.core.writer.write_json_atomic

    def dies_before_the_marker(fs, path, obj):
        if path.endswith("00002_stats.json"):
            raise Killed  # 00002's tar, parquet and dropped tar are written; its marker is not
        write_json(fs, path, obj)

    monkeypatch.setattr(curate.core.writer, "write_json_atomic", dies_before_the_marker)
    with pytest.raises(Killed):
        run(p)
    monkeypatch.undo()

    fs, root = filesystem(out)
    assert fs.exists(f"{root}/shards/00002.tar") and not fs.exists(f"{root}/shards/00002_stats.json")
    # Every object under a final name is whole: the same bytes as the finished run's.
    written = s3_files(out)
    assert sorted(written) == [
        "00000.parquet",
        "00000.tar",
        "00001.parquet",
        "00001.tar",
        "00002.parquet",
        "00002.tar",
    ]
    assert all(written[name] == files[name] for name in written)
    _no_temporary_objects(out)

    # Only marked shards count: for `curate status` (and report, preview), for resume, for the trainer.
    summary = collect_output(out)
    assert summary.shards_done == ["00000", "00001"] and summary.shards_total == 4
    r = cli("status", out, "--json")
    assert r.code == 0 and json.loads(r.out)["shards"] == {
        "total": 4,
        "done": 2,
        "failed": 0,
        "pending": 2,
    }, r
    assert find_shards([out]) == [f"s3://{root}/shards/{s}.tar" for s in ("00000", "00001")]

    again = run(p)
    assert again.ran == ["00002", "00003"] and again.skipped == 2 and again.exit_code == 0
    assert s3_files(out) == files and s3_stats(out) == stats and again.counts == counts
    assert find_shards([out]) == [f"s3://{root}/shards/{s}.tar" for s in SHARDS]
    _no_temporary_objects(out)


def test_the_trainer_finds_no_shard_in_a_run_with_none_finished(s3):
    """A run killed in its first shard left a tar without its marker: the trainer must not read it."""
    fs, root = filesystem(f"s3://{BUCKET}/out-none-finished")
    fs.pipe_file(f"{root}/run.json", b"{}")
    fs.pipe_file(f"{root}/shards/00000.tar", b"a tar without its marker")
    with pytest.raises(TrainDataError):
        find_shards([f"s3://{root}"])


def test_write_atomic_puts_one_whole_object_and_never_renames(s3, monkeypatch):
    fs, root = filesystem(f"s3://{BUCKET}/atomic")

    def no_rename(*args, **kwargs):
        raise AssertionError("an object store has no rename: mv is a copy and a delete")

    monkeypatch.setattr(type(fs), "mv", no_rename)
    write_atomic(fs, f"{root}/a.bin", b"x" * 1000)
    assert fs.find(root) == [f"{root}/a.bin"] and fs.cat_file(f"{root}/a.bin") == b"x" * 1000


def test_objects_another_process_writes_are_seen_after_a_listing(s3):
    """Ray workers write the shards; the driver listed the output before (clean_temp at the start of a
    resumed run) and must still see them when it checks what is done."""
    import s3fs

    fs, root = filesystem(f"s3://{BUCKET}/listed")
    fs.pipe_file(f"{root}/shards/00000.tar", b"first")
    assert fs.find(root) == [f"{root}/shards/00000.tar"]
    worker = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    worker.pipe_file(f"{root}/shards/00001.tar", b"second")
    fs, _ = filesystem(f"s3://{root}")
    assert fs.exists(f"{root}/shards/00001.tar")
    assert fs.ls(f"{root}/shards", detail=False) == [f"{root}/shards/00000.tar", f"{root}/shards/00001.tar"]


def test_ray_workers_write_the_same_bytes_to_s3(s3, reference, world_server, ray_cluster):
    tmp, files, stats, _, counts = reference

    # The session's cluster was started without this process's AWS_* settings: the executor forwards them.
    out = f"s3://{BUCKET}/out-ray"
    summary = run(
        _pipeline(tmp, world_server, f"s3://{BUCKET}/input/in.parquet", out, "ray"), "executor.kind=ray"
    )
    assert summary.exit_code == 0 and summary.shards_done == SHARDS and summary.counts == counts
    assert s3_files(out) == files and s3_stats(out) == stats
    _no_temporary_objects(out)
