"""The run report: every section, numbers that add up with run.json and the sidecars, one self-contained
HTML file that a real headless browser opens, and sections that say why they are empty on a run without the
stage behind them."""

import json
import logging
import re
import shutil
import subprocess
import tarfile
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sidecars, write_pipeline
from support.data import make_input, make_tiny_clip

from curate.core.output import collect_output
from curate.core.schema import reason_bucket
from curate.tools.report import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _world_input(tmp, world_server):
    world, server = world_server
    path = tmp / "world.parquet"
    pq.write_table(world.input_table(server.url), path)
    return path, server


def _download(server):
    return {
        "stage": "download",
        "image_size": 64,
        "resize_mode": "center_crop",
        "allow_private": [server.host_port],
    }


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, world_server):
    """The sample world downloaded, CLIP-scored (tiny random CLIP), filtered and deduplicated, in 2 shards."""
    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    tmp = tmp_path_factory.mktemp("report")
    input_path, server = _world_input(tmp, world_server)
    clip = make_tiny_clip(tmp / "clip")
    stages = [
        _download(server),
        {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 1, "decode_threads": 1},
        {"stage": "filter", "name": "quality", "rules": ["clip_score >= 0.0"]},
        {"stage": "dedup", "keep": ["clip_score desc"], "perceptual": {"max_distance": 4}, "semantic": False},
    ]
    p = write_pipeline(
        tmp / "scored.yaml",
        input_path,
        tmp / "scored",
        stages,
        input={"url_col": "url", "caption_col": "caption"},
        output={"report": True},  # the default; written out so a suite-wide default of false leaves it on
        shard_size=120,
    )
    assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    return tmp / "scored"


def test_report_has_every_section_and_its_numbers_add_up(scored_run):
    report = json.loads((scored_run / "report/report.json").read_text())
    summary = collect_output(str(scored_run))
    info = json.loads((scored_run / "run.json").read_text())
    counts = info["counts"]
    assert counts == summary.counts

    # The funnel and the per-stage rows left.
    funnel = {s["step"]: s["rows"] for s in report["funnel"]}
    assert funnel == {"input": counts["rows"], "downloaded": counts["ok"], "kept": counts["kept"]}
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["read", "download", "clip_score", "quality", "dedup"]
    assert stages["dedup"]["kept"] == counts["kept"] and stages["read"]["rows_in"] == counts["rows"]
    assert all(s["seconds"] >= 0 for s in stages.values()) and stages["download"]["samples_per_s"] > 0

    # Status and drop reasons, against run.json and a recount of the sidecars.
    side = sidecars(scored_run)
    assert report["status_counts"] == counts["status"] == dict(Counter(side["status"].to_pylist()))
    recount = Counter(reason_bucket(r) for r in side["drop_reason"].to_pylist() if r)
    assert report["drop_reasons"] == counts["drop_reason"] == dict(recount)
    assert "clip_score<0.0" in recount and any(r.startswith("duplicate:") for r in recount)

    # Link rot: the world's failed rows, all on 127.0.0.1.
    (domain,) = report["failures_by_domain"]
    assert domain["domain"] == "127.0.0.1" and domain["failed"] == counts["rows"] - counts["ok"] > 0
    assert sum(domain["statuses"].values()) == domain["failed"] and domain["rows"] == counts["rows"]

    # The histogram of clip_score counts every ok row once, split by fate, with the run's threshold.
    clip = report["scores"]["clip_score"]
    ok = side.filter(pc.equal(side["status"], "ok"))
    assert clip["rows"] == ok.num_rows and clip["kept"] == counts["kept"]
    assert sum(clip["histogram"]["kept"]) + sum(clip["histogram"]["dropped"]) == ok.num_rows
    assert clip["thresholds"] == [{"rule": "clip_score >= 0.0", "value": 0.0}]
    assert "dup_similarity" not in report["scores"]

    # Samples: kept ones come from the shard tars, dropped ones per reason, duplicates next to a kept original.
    samples = report["samples"]
    kept_uids = set(side.filter(pc.is_null(side["drop_reason"]))["uid"].to_pylist()) - set(
        side.filter(pc.not_equal(side["status"], "ok"))["uid"].to_pylist()
    )
    assert samples["kept"] and {s["uid"] for s in samples["kept"]} <= kept_uids
    assert set(samples["dropped"]) <= set(report["drop_reasons"]) and "clip_score<0.0" in samples["dropped"]
    assert samples["duplicate_pairs"]
    for pair in samples["duplicate_pairs"]:
        assert pair["dup_of"] in kept_uids and pair["dup_of_shard"] is not None
    assert samples["captions"] == []  # no recaption stage here: the section says so

    page = (scored_run / "report/report.html").read_text()
    for sid, heading in SECTIONS:
        assert f"<section id='{sid}'><h2>{heading}</h2>" in page
    assert "this run has no recaption or caption fusion stage" in page
    # Self-contained: every image is inline, nothing is fetched from anywhere.
    srcs = re.findall(r"""src=['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"""href=|url\(|<script|<link|@import""", page)
    # One thumbnail per shown sample (both halves of each duplicate pair), plus the plots.
    shown = (
        len(samples["kept"])
        + sum(map(len, samples["dropped"].values()))
        + 2 * len(samples["duplicate_pairs"])
    )
    assert page.count("src='data:image/jpeg") >= shown - 1  # at most one sample without an image
    assert page.count("<svg class=") >= 3  # funnel, stages, clip_score (one domain: a table only)


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) for a real browser"
)
def test_report_opens_in_headless_chromium(scored_run, tmp_path):
    page = scored_run / "report/report.html"
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for _, heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom
    assert dom.count("<img") >= 10 and "127.0.0.1" in dom


def test_download_only_run_and_the_report_command(tmp_path, world_server, cli):
    """With output.report off the run writes no report; `curate report` writes one whose sections without
    data say why."""
    input_path, server = _world_input(tmp_path, world_server)
    p = write_pipeline(
        tmp_path / "dl.yaml",
        input_path,
        tmp_path / "dl",
        [_download(server)],
        input={"url_col": "url", "caption_col": "caption"},
        output={"report": False},
        shard_size=200,
    )
    assert cli("run", p, "-q").code == 0
    assert not (tmp_path / "dl/report").exists()

    r = cli("report", tmp_path / "dl")
    assert r.code == 0, r
    assert "report/report.html" in r.out
    report = json.loads((tmp_path / "dl/report/report.json").read_text())
    info = json.loads((tmp_path / "dl/run.json").read_text())
    assert [s["rows"] for s in report["funnel"]] == [
        info["counts"]["rows"],
        info["counts"]["ok"],
        info["counts"]["kept"],
    ]
    assert (
        report["scores"] == {} and report["drop_reasons"] == {} and report["samples"]["duplicate_pairs"] == []
    )
    assert len(report["samples"]["kept"]) == 24 and report["failures_by_domain"]
    page = (tmp_path / "dl/report/report.html").read_text()
    for sid, _ in SECTIONS:
        assert f"<section id='{sid}'>" in page
    for note in (
        "this run has no score columns",
        "no row has a drop reason",
        "no dropped sample with an image",
        "this run has no dedup stage",
        "this run has no recaption or caption fusion stage",
    ):
        assert note in page

    assert cli("report", tmp_path / "nothing").code == 2  # not an output folder: a usage error


def test_a_report_that_fails_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    import curate.tools.report
    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    def broken(path):
        raise RuntimeError("no plots today")

    monkeypatch.setattr(curate.tools.report, "write_report", broken)
    make_input(tmp_path / "in.parquet", 40)
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [{"stage": "synthetic_image"}],
        output={"report": True},
    )
    with caplog.at_level(logging.WARNING, logger="curate.core.runner"):
        assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    assert "could not write the run report" in caplog.text and "no plots today" in caplog.text
    assert json.loads((tmp_path / "out/run.json").read_text())["status"] == "finished"


def test_kept_thumbnails_are_the_shard_images(scored_run):
    """The kept grid shows the shard tar's own images, shrunk: a sample's card is its image."""
    report = json.loads((scored_run / "report/report.json").read_text())
    first = report["samples"]["kept"][0]
    with tarfile.open(scored_run / f"shards/{first['shard']}.tar") as tar:
        names = tar.getnames()
    assert any(n.startswith(first["uid"] + ".") and not n.endswith((".json", ".txt")) for n in names)


def test_failures_are_counted_by_host():
    import pyarrow as pa

    from curate.tools.report import _count_domains

    t = pa.table(
        {
            "url": [
                "http://A.example.com/x",
                "https://u@a.example.com:8080/p?q",
                "http://b.org",
                "not a url",
                None,
            ],
            "status": ["http_404", "timeout", "ok", "invalid_url", "invalid_url"],
        }
    )
    rows, failed, statuses = Counter(), Counter(), {}
    _count_domains(t, rows, failed, statuses)
    assert rows == {"a.example.com": 2, "b.org": 1, "(no host)": 2}
    assert failed == {"a.example.com": 2, "(no host)": 2}
    assert statuses["a.example.com"] == {"http_404": 1, "timeout": 1}
