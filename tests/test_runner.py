"""A run with the local executor: accounting, resume, refusal of a changed config, retries, global phases."""

import json

import pyarrow.compute as pc
import pytest
from conftest import shard_files, sidecars, write_pipeline
from support.data import make_input

from curate.core.config import load_config
from curate.core.output import collect_output
from curate.core.runner import run_pipeline
from curate.core.schema import is_kept

STAGES = [
    {"stage": "synthetic_image", "size": 16},
    {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
]


def run(path, *sets, **kw):
    return run_pipeline(load_config(path, list(sets)), show_progress=False, **kw)


@pytest.fixture
def pipeline(tmp_path):
    make_input(tmp_path / "in.parquet", 530, bad_every=11)
    return write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", STAGES)


def test_every_input_row_appears_once_with_its_reason(tmp_path, pipeline):
    summary = run(pipeline)
    assert summary.exit_code == 0 and summary.shards_total == 6 and len(summary.shards_done) == 6
    side = sidecars(tmp_path / "out")
    assert sorted(side["input_index"].to_pylist()) == list(range(530))
    kept = side.filter(is_kept(side))
    # every row not kept says why
    for row in side.to_pylist():
        assert (
            (row["status"] == "ok" and row["drop_reason"] is None)
            or row["status"] != "ok"
            or row["drop_reason"]
        )
    c = summary.counts
    assert c["rows"] == 530 and c["kept"] == kept.num_rows
    assert sum(c["status"].values()) == 530
    assert c["ok"] - sum(c["drop_reason"].values()) == c["kept"]
    # make_input plants 48 bad rows: 12 null urls, 12 ftp urls, 12 empty captions, 12 repeats
    assert c["status"] == {"duplicate_row": 12, "invalid_url": 24, "ok": 494}
    assert c["drop_reason"]["caption_length<3"] == 12
    assert c["drop_reason"]["width<20"] > 0
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert info["status"] == "finished" and info["counts"] == c and info["shards_total"] == 6
    assert info["fingerprint"] and info["versions"]["pyarrow"]


def test_a_rerun_skips_finished_shards_and_redoes_missing_ones(tmp_path, pipeline):
    run(pipeline)
    before = shard_files(tmp_path / "out")
    stats_mtime = (tmp_path / "out/shards/00000_stats.json").stat().st_mtime_ns
    again = run(pipeline)
    assert again.ran == [] and again.skipped == 6
    for suffix in (".tar", ".parquet", "_stats.json"):
        (tmp_path / f"out/shards/00003{suffix}").unlink(missing_ok=True)
    (tmp_path / "out/shards/00004_stats.json").unlink()  # tar and parquet there, marker missing: redone
    (tmp_path / "out/shards/00001.tar.tmp-123-abc").write_bytes(b"left by a killed writer")
    third = run(pipeline)
    assert third.ran == ["00003", "00004"] and third.exit_code == 0
    assert shard_files(tmp_path / "out") == before
    assert (tmp_path / "out/shards/00000_stats.json").stat().st_mtime_ns == stats_mtime
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_status_tells_a_run_whose_driver_is_gone(tmp_path, pipeline, cli):
    """run.json says "running" until the run ends; a driver killed before that leaves it so. `curate status`
    checks the recorded driver (same host: is the pid alive, and is it the same process)."""
    import json
    import subprocess
    import sys

    from curate.core.output import driver_identity

    run(pipeline)
    path = tmp_path / "out/run.json"
    info = json.loads(path.read_text())
    assert info["driver"]["pid"] > 0 and info["driver"]["host"]
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    cases = {
        "interrupted": {**driver_identity(), "pid": int(gone.stdout)},  # that process has exited
        "running": driver_identity(),  # this very process
    }
    for want, driver in cases.items():
        path.write_text(json.dumps({**info, "status": "running", "driver": driver}))
        r = cli("status", tmp_path / "out", "--json")
        assert json.loads(r.out)["status"] == want, (want, r)
    path.write_text(json.dumps({**info, "status": "running", "driver": {**driver_identity(), "start": "1"}}))
    assert json.loads(cli("status", tmp_path / "out", "--json").out)["status"] == "interrupted"  # pid reused
    path.write_text(
        json.dumps({**info, "status": "running", "driver": {**driver_identity(), "host": "elsewhere"}})
    )
    assert json.loads(cli("status", tmp_path / "out", "--json").out)["status"] == "running"  # cannot tell
    r = cli("status", tmp_path / "out")
    assert "driver: pid" in r.out and "elsewhere" in r.out


def test_a_changed_config_refuses_to_resume(tmp_path, pipeline, cli):
    assert cli("run", pipeline, "-q").code == 0
    r = cli("run", pipeline, "-q", "--set", "stages.basic_filter.min_caption_length=10")
    assert r.code == 2 and "holds a run of another config" in r.err and "--overwrite" in r.err
    r = cli("run", pipeline, "-q", "--set", "stages.basic_filter.min_caption_length=10", "--overwrite")
    assert r.code == 0
    side = sidecars(tmp_path / "out")
    assert pc.sum(pc.equal(side["drop_reason"], "caption_length<10")).as_py() > 0
    # the executor is not part of the fingerprint
    assert (
        cli(
            "run",
            pipeline,
            "-q",
            "--set",
            "stages.basic_filter.min_caption_length=10",
            "--set",
            "executor.max_shard_retries=5",
        ).code
        == 0
    )


def test_a_changed_input_refuses_to_resume(tmp_path, pipeline, cli):
    assert cli("run", pipeline, "-q").code == 0
    make_input(tmp_path / "in.parquet", 531, bad_every=11)
    r = cli("run", pipeline, "-q")
    assert r.code == 2 and "another config or input" in r.err
    assert cli("run", pipeline, "-q", "--resume-anyway").code == 0
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert info["resumed_from_fingerprint"] and info["shards_total"] == 6


def test_overwrite_on_a_new_output_folder(tmp_path, pipeline, cli):
    r = cli("run", pipeline, "-q", "--overwrite", "--set", f"output.path={tmp_path / 'new/deeper'}")
    assert r.code == 0, r
    assert json.loads((tmp_path / "new/deeper/run.json").read_text())["status"] == "finished"


def test_refuses_a_foreign_non_empty_output(tmp_path, pipeline, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/precious.txt").write_text("mine")
    r = cli("run", pipeline, "-q")
    assert r.code == 2 and "is not empty and holds no run.json" in r.err
    assert cli("run", pipeline, "-q", "--overwrite").code == 0
    assert (tmp_path / "out/precious.txt").read_text() == "mine"  # --overwrite removes only curate's files


def test_a_failing_shard_is_retried(tmp_path):
    make_input(tmp_path / "in.parquet", 300)
    stages = [{"stage": "fail", "rows": [150], "times": 2, "state_dir": str(tmp_path)}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    summary = run(p, "executor.max_shard_retries=2")
    assert summary.exit_code == 0 and len(summary.shards_done) == 3
    assert (tmp_path / "attempts-150").read_text() == "3"


def test_a_shard_that_keeps_failing_is_reported_and_the_run_finishes(tmp_path, cli):
    make_input(tmp_path / "in.parquet", 300)
    stages = [{"stage": "fail", "rows": [150], "times": 3, "state_dir": str(tmp_path)}]
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        stages,
        executor={"max_shard_retries": 1},
    )
    r = cli("run", p)
    assert r.code == 1 and "1 shard(s) failed: 00001" in r.err
    failed = json.loads((tmp_path / "out/shards/00001_failed.json").read_text())
    assert failed["attempts"] == 2 and "planned failure 2/3" in failed["error"]
    assert not (tmp_path / "out/shards/00001_stats.json").exists()
    status = cli("status", tmp_path / "out", "--json")
    report = json.loads(status.out)
    assert report["shards"] == {"total": 3, "done": 2, "failed": 1, "pending": 0} and report["failed"] == [
        "00001"
    ]
    assert report["status"] == "incomplete"
    # the same command again retries only that shard; attempt 4 succeeds
    r = cli("run", p, "-q")
    assert r.code == 0 and not (tmp_path / "out/shards/00001_failed.json").exists()
    assert collect_output(str(tmp_path / "out")).counts["rows"] == 300


def test_a_global_stage_sees_every_shard(tmp_path):
    make_input(tmp_path / "in.parquet", 500, bad_every=9)
    stages = [{"stage": "basic_filter", "min_caption_length": 3}, {"stage": "keep_longest", "keep": 40}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    summary = run(p)
    assert summary.exit_code == 0 and summary.counts["kept"] == 40
    side = sidecars(tmp_path / "out")
    kept = side.filter(is_kept(side))
    dropped = side.filter(pc.equal(side["drop_reason"], "not_longest"))
    assert min(len(c) for c in kept["caption"].to_pylist()) >= max(
        len(c) for c in dropped["caption"].to_pylist()
    )
    assert not (tmp_path / "out/work").exists()  # intermediate phase files are removed once all is done
    assert (tmp_path / "out/global/keep_longest/_done").exists()
    before = shard_files(tmp_path / "out")
    # lose one final shard: only it is redone, from phase 1 again, without refitting
    fit_mtime = (tmp_path / "out/global/keep_longest/_done").stat().st_mtime_ns
    (tmp_path / "out/shards/00002_stats.json").unlink()
    again = run(p)
    assert again.ran == ["00002"] and shard_files(tmp_path / "out") == before
    assert (tmp_path / "out/global/keep_longest/_done").stat().st_mtime_ns == fit_mtime


def test_a_global_stage_waits_for_failed_shards(tmp_path):
    make_input(tmp_path / "in.parquet", 300)
    stages = [
        {"stage": "fail", "rows": [10], "times": 1, "state_dir": str(tmp_path)},
        {"stage": "keep_longest", "keep": 5},
    ]
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        stages,
        executor={"max_shard_retries": 0},
    )
    first = run(p)
    assert first.exit_code == 1 and not (tmp_path / "out/global/keep_longest/_done").exists()
    assert first.shards_failed.keys() == {"00000"} and first.shards_done == []
    second = run(p)  # phase 1 redoes only shard 00000, then the fit, then every final shard
    assert second.exit_code == 0 and second.counts["kept"] == 5 and len(second.ran) == 3


def test_new_input_files_grow_the_run_into_new_shards(tmp_path):
    make_input(tmp_path / "in/b.parquet", 230, bad_every=11)
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in", tmp_path / "out", STAGES)
    assert run(p).exit_code == 0
    before = shard_files(tmp_path / "out")
    make_input(tmp_path / "in/a.parquet", 120, seed=1)  # sorts before b.parquet: old shards must not move
    summary = run(p)
    assert summary.exit_code == 0 and summary.ran == ["00003", "00004"] and summary.shards_total == 5
    assert {k: v for k, v in shard_files(tmp_path / "out").items() if k[:5] < "00003"} == before
    side = sidecars(tmp_path / "out")
    assert sorted(side["input_index"].to_pylist()) == list(range(350)) and summary.counts["rows"] == 350
    first_new = side.filter(pc.equal(side["input_index"], 230)).to_pylist()[0]
    assert "number 0" in first_new["caption"] and "images.example.com/1/" in first_new["url"]
    info = json.loads((tmp_path / "out/run.json").read_text())
    assert [(g["first_shard"], g["shards"], g["rows"]) for g in info["inputs"]] == [
        ("00000", 3, 230),
        ("00003", 2, 120),
    ]
    assert run(p).ran == []  # resumes the grown run as it is
