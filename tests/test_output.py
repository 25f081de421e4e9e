"""The output folder's layout (curate.core.output): every file a run and the tools on it write is a path the
module names; the sum of the stats files reconciles with run.json and the sidecars; shard tars read by
member; the same on a non-local fsspec URL (memory://)."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import write_pipeline
from support.data import make_input

from curate.core.config import load_config
from curate.core.output import (
    OWNED,
    TAKEDOWN,
    OutputFolder,
    collect_output,
)
from curate.core.runner import run_pipeline
from curate.core.schema import is_kept

STAGES = [
    {"stage": "synthetic_image", "size": 16},
    {"stage": "basic_filter", "min_caption_length": 3, "min_width": 20},
    {"stage": "keep_longest", "keep": 60},  # a global stage: work/phase0, global/keep_longest
]


def _run(p, *sets):
    return run_pipeline(load_config(p, list(sets)), show_progress=False)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run with a global stage, its report, a preview and a takedown; work/ kept for the check."""
    from curate.tools.preview import preview_output
    from curate.tools.takedown import takedown

    tmp = tmp_path_factory.mktemp("output")
    make_input(tmp / "in.parquet", 300, bad_every=11)
    p = write_pipeline(tmp / "p.yaml", tmp / "in.parquet", tmp / "out", STAGES, output={"report": True})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OutputFolder, "remove_work", lambda self: None)
        summary = _run(p)
    assert summary.exit_code == 0
    out = OutputFolder(tmp / "out")
    preview_output(str(tmp / "out"), ["width >= 25"])
    kept = next(u for shard in out.finished_shards() for u in out.images(shard))
    takedown(str(tmp / "out"), uids=[kept], reason="test")
    return out, summary, kept


def test_every_file_of_a_run_is_named_by_the_layout(run_folder):
    out, summary, _ = run_folder
    shards = out.finished_shards()
    assert shards == ["00000", "00001", "00002"] == summary.shards_done
    named = {out.run_json_path, out.report_html, out.report_json, out.preview_html, out.takedown_audit}
    for shard in shards:
        named |= set(out.shard_files(shard).values())
        named.add(out.phase_shard(0, shard))
    named.add(out.global_done("keep_longest"))
    stage_state = out.global_state("keep_longest") + "/"  # what the stage keeps there is the stage's

    found = set(out.fs.find(out.root))
    assert named <= found, sorted(named - found)
    unnamed = {p for p in found - named if not p.startswith(stage_state)}
    assert unnamed == set(), sorted(unnamed)
    # Top level: what --overwrite removes, and the takedown audit that outlives it.
    top = {p.rsplit("/", 1)[-1] for p in out.fs.ls(out.root, detail=False)}
    assert top <= {*OWNED, TAKEDOWN}
    assert not out.fs.exists(out.takedown_pending)  # the takedown finished


def test_the_stats_add_up(run_folder):
    out, _, kept_uid = run_folder
    s = collect_output(out)
    info = out.read_run()
    assert s.exit_code == 0 and s.shards_total == info["shards_total"] == 3 and s.shards_failed == {}
    assert s.counts == info["counts"]  # the takedown wrote the new counts back
    assert s.counts["rows"] == 300 and sum(s.counts["status"].values()) == 300
    assert s.counts["ok"] - sum(s.counts["drop_reason"].values()) == s.counts["kept"] == 59
    assert s.counts["drop_reason"]["takedown"] == 1
    stats = [out.read_stats(shard) for shard in s.shards_done]
    assert sum(x["kept"] for x in stats) == s.counts["kept"]
    rows = 0
    for shard in s.shards_done:
        with out.fs.open(out.shard_parquet(shard), "rb") as f:
            side = pq.read_table(f, columns=["uid", "status", "drop_reason"])
        rows += side.num_rows
        kept = set(side.filter(is_kept(side))["uid"].to_pylist())
        # The tar holds exactly the kept rows, a json, a txt and an image each.
        members = out.tar_members(shard)
        assert {m.uid for m in members} == kept and len(members) == 3 * len(kept)
        assert {m.uid for m in members if m.is_image} == kept and kept_uid not in kept
    assert rows == 300
    assert list(s.stages)[:2] == ["read", "synthetic_image"] and s.stages["keep_longest"]["kept"] == 60


def test_tar_members_are_read_by_offset(run_folder):
    out, _, _ = run_folder
    shard = out.finished_shards()[0]
    with out.fs.open(out.shard_tar(shard), "rb") as f, tarfile.open(fileobj=f) as tar:
        expected = {m.name: tar.extractfile(m).read() for m in tar}
    members = out.tar_members(shard)
    assert [m.name for m in members] == sorted(expected)  # the writer's order
    for m in members:
        assert out.read_member(shard, m) == expected[m.name]
    images = out.images(shard)
    assert images and all(data == expected[f"{uid}.{ext}"] for uid, (data, ext) in images.items())
    some = sorted(images)[:2]
    assert set(out.images(shard, uids=some)) == set(some)
    # The audit tar: thumbnails of the dropped rows, each with its json.
    dropped = out.tar_members(shard, "dropped")
    assert dropped and {m.ext for m in dropped} == {"jpg", "json"}
    assert set(out.images(shard, "dropped")) == {m.uid for m in dropped if m.is_image}
    with pytest.raises(FileNotFoundError):
        out.tar_members("99999")
    assert out.images("99999") == {}
    with pytest.raises(ValueError):
        out.tar_members(shard, "parquet")


def test_paths_within_the_folder(tmp_path):
    out = OutputFolder(f"{tmp_path}/run/")
    assert out.root == f"{tmp_path}/run" and out.url(out.shard_tar("7")) == f"{tmp_path}/run/shards/7.tar"
    assert out.relative(out.dropped_tar("7")) == "dropped/7.tar"
    assert out.relative(out.dedup_decisions("dedup")) == "dedup/dedup.parquet"
    assert out.relative(out.dedup_summary("dedup")) == "dedup/dedup.json"
    assert out.relative(out.phase_dir(1)) == "work/phase1"
    assert out.relative(out.global_done("d")) == "global/d/_done"
    assert out.relative(out.index_dir) == "index"
    assert out.as_given(out.report_html) == f"{tmp_path}/run/report/report.html"
    assert [out.relative(p) for p in out.owned()] == list(OWNED)
    relative = OutputFolder("some/where")
    assert relative.as_given(relative.preview_html) == "some/where/report/preview.html"
    remote = OutputFolder("memory://bucket/run")
    assert remote.url(remote.global_state("d")) == "memory:///bucket/run/global/d"


def test_a_failed_shard_is_named_and_not_finished(tmp_path):
    make_input(tmp_path / "in.parquet", 300)
    stages = [{"stage": "fail", "rows": [150], "times": 5, "state_dir": str(tmp_path)}]
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        stages,
        executor={"max_shard_retries": 0},
    )
    assert _run(p).exit_code == 1
    out = OutputFolder(tmp_path / "out")
    assert out.finished_shards() == ["00000", "00002"]
    assert out.fs.exists(out.shard_failed("00001")) and not out.fs.exists(out.shard_stats("00001"))
    failed = out.failed_shards()
    assert list(failed) == ["00001"] and "planned failure" in failed["00001"]["error"]
    s = collect_output(out)
    assert s.shards_failed.keys() == {"00001"} and s.exit_code == 1 and s.counts["rows"] == 200


def test_a_run_on_a_memory_url(tmp_path):
    """memory:// is not local: paths get their protocol back for other processes, and everything else works
    as on a disk (the local executor runs in this process, which holds the memory filesystem)."""
    from curate.train.data import find_shards

    url = f"memory://curate-test-{tmp_path.name}/out"
    make_input(tmp_path / "in.parquet", 250, bad_every=11)
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", url, STAGES[:2], output={"report": True})
    summary = _run(p)
    assert summary.exit_code == 0
    out = OutputFolder(url)
    assert out.root.startswith("/") and "://" not in out.root
    try:
        assert out.is_run() and out.read_run()["status"] == "finished"
        assert out.finished_shards() == ["00000", "00001", "00002"] == summary.shards_done
        assert collect_output(url).counts == out.read_run()["counts"] == summary.counts
        assert out.fs.exists(out.report_html) and out.fs.exists(out.report_json)
        tars = find_shards([url])
        assert tars == [out.url(out.shard_tar(s)) for s in out.finished_shards()]
        assert all(t.startswith("memory://") for t in tars)
        shard = out.finished_shards()[0]
        members = out.tar_members(shard)
        data = out.fs.cat_file(out.shard_tar(shard))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert [m.name for m in members] == tar.getnames()
        first_json = next(m for m in members if m.ext == "json")
        assert json.loads(out.read_member(shard, first_json))["uid"] == first_json.uid
        out.wipe()
        assert not out.is_run() and out.finished_shards() == []
    finally:
        if out.fs.exists(out.root):
            out.fs.rm(out.root, recursive=True)
