"""`curate preview` counts what a rerun with new rules writes, from the sidecars alone, and shows the images
nearest each threshold; the writer's dropped/ audit tars hold the thumbnails of dropped rows."""

import base64
import io
import json
import re
import tarfile
from collections import Counter

import pytest
from conftest import sidecars, write_pipeline
from PIL import Image
from support.data import make_input

from curate.core.schema import is_kept
from curate.kit.rules import parse_rule
from curate.tools.preview import FilterStep, replace_rules

OLD_RULES = ["similarity >= 0.2", "width >= 146"]
NEW_RULES = ["similarity > 0.1", "width >= 150"]  # what the preview is asked about, in the run's order


def stages(rules):
    return [
        {"stage": "synthetic_image", "size": 140},  # widths 140..155, from the uid: thumbnails must shrink
        {"stage": "basic_filter", "min_caption_length": 3},
        {"stage": "filter", "name": "scores", "rules": rules},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with the old rules, one with the new rules, and the old rules again (for determinism)."""
    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    tmp = tmp_path_factory.mktemp("preview")
    make_input(tmp / "in.parquet", 240, bad_every=13)
    for name, rules in (("old", OLD_RULES), ("new", NEW_RULES), ("again", OLD_RULES)):
        p = write_pipeline(tmp / f"{name}.yaml", tmp / "in.parquet", tmp / name, stages(rules), shard_size=80)
        assert run_pipeline(load_config(p), show_progress=False).exit_code == 0
    return tmp


def test_preview_counts_equal_a_rerun_with_the_new_rules(runs, cli):
    r = cli("preview", runs / "old", "--rule", "width >= 150", "--rule", "similarity > 0.1", "--json")
    assert r.code == 0, r
    got = json.loads(r.out)
    assert got["filters_new"] == [{"name": "scores", "rules": NEW_RULES, "missing": "drop"}]

    old, new = sidecars(runs / "old"), sidecars(runs / "new")
    reasons = {"similarity<=0.1", "width<150", "missing:similarity", "missing:width"}
    decided = [
        row for row in new.to_pylist() if row["status"] == "ok" and (row["drop_reason"] in reasons | {None})
    ]
    kept_old = set(old.filter(is_kept(old))["uid"].to_pylist())
    kept_new = set(new.filter(is_kept(new))["uid"].to_pylist())
    by_reason = Counter(row["drop_reason"] for row in decided if row["drop_reason"])

    assert got["considered"] == len(decided)
    assert got["kept_now"] == len(kept_old)
    assert got["would_keep"] == len(kept_new)
    assert got["would_drop"] == {
        "missing:similarity": 0,
        "similarity<=0.1": by_reason["similarity<=0.1"],
        "missing:width": 0,
        "width<150": by_reason["width<150"],
    }
    assert sum(got["would_drop"].values()) == len(decided) - len(kept_new)
    assert got["newly_dropped"] == len(kept_old - kept_new) > 0
    assert got["newly_kept"] == len(kept_new - kept_old) > 0
    assert got["caveats"] == [] and got["shards"] == 3


def test_preview_table_and_html_page(runs, cli, tmp_path):
    r = cli(
        "preview", runs / "old", "--rule", "width >= 150", "--rule", "similarity > 0.1", "--per-side", "6"
    )
    assert r.code == 0, r
    for label in ("rows considered", "kept now", "would keep", "width<150", "newly dropped", "newly kept"):
        assert label in r.out
    page = (runs / "old/report/preview.html").read_text()
    assert "id='rule-0'" in page and "id='rule-1'" in page and page.count("<svg class='histogram'") == 2
    assert page.count("class='threshold'") == 2 and "would drop: the 6 row(s)" in page
    assert "would keep: the 6 row(s)" in page
    uris = re.findall(r"data:image/(\w+);base64,([A-Za-z0-9+/=]+)", page)
    assert len(uris) == 24  # 2 rules x 2 sides x 6, every one found in a tar
    for _, data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            assert max(img.size) <= 128

    r = cli("preview", runs / "old", "-r", "width >= 150", "--html", tmp_path / "p.html", "--per-side", "2")
    assert r.code == 0 and (tmp_path / "p.html").exists(), r


def test_the_dropped_tar_holds_thumbnails_of_dropped_rows(runs):
    side = sidecars(runs / "old")
    dropped = {
        row["uid"]: row["drop_reason"]
        for row in side.to_pylist()
        if row["status"] == "ok" and row["drop_reason"] is not None
    }
    seen = {}
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(runs / f"old/dropped/{shard}.tar") as tar:
            names = [m.name for m in tar.getmembers()]
            assert names == sorted(names)
            for member in tar:
                data = tar.extractfile(member).read()
                uid, ext = member.name.split(".")
                if ext == "json":
                    meta = json.loads(data)
                    assert meta["uid"] == uid
                    seen[uid] = meta["drop_reason"]
                else:
                    assert ext == "jpg"
                    with Image.open(io.BytesIO(data)) as img:
                        assert img.format == "JPEG" and max(img.size) == 128
        stats = json.loads((runs / f"old/shards/{shard}_stats.json").read_text())
        assert stats["written"]["dropped_thumbnails"] == sum(n.endswith(".jpg") for n in names)
    assert seen == dropped and {"caption_length<3", "width<146", "similarity<0.2"} <= set(seen.values())


def test_preview_errors_exit_2(runs, cli, tmp_path):
    r = cli("preview", tmp_path, "--rule", "width >= 150")
    assert r.code == 2 and "holds no run.json: not a curate output folder" in r.err, r
    r = cli("preview", runs / "old", "--rule", "clip_score >= 0.3")
    assert r.code == 2 and "the sidecars have no column 'clip_score'" in r.err, r
    assert "they have: uid, input_index" in r.err and "similarity" in r.err
    r = cli("preview", runs / "old", "--rule", "width >> 3")
    assert r.code == 2 and "unknown operator '>>'" in r.err, r
    r = cli("preview", runs / "old", "--rule", "caption >= 3")
    assert r.code == 2 and "holds string, which cannot be compared with a number" in r.err, r


def test_replace_rules_keeps_other_columns_and_their_order():
    a, b, c = parse_rule("a >= 1"), parse_rule("b < 2"), parse_rule("a <= 9")
    steps = [FilterStep("one", (a, b, c)), FilterStep("two", (parse_rule("d == true"),), "keep")]
    new = replace_rules(steps, [parse_rule("a > 3"), parse_rule("e != 'x'")])
    assert [[r.text for r in s.rules] for s in new] == [["a > 3", "b < 2"], ["d == true", "e != 'x'"]]
    assert new[1].missing == "keep"
    assert [r.text for r in replace_rules([], [a])[0].rules] == ["a >= 1"]


def test_dropped_tars_are_byte_identical_on_a_rerun_and_written_when_empty(runs, tmp_path):
    from curate.core.writer import ShardWriter

    first = {p.name: p.read_bytes() for p in sorted((runs / "old/dropped").iterdir())}
    assert len(first) == 3 and first == {
        p.name: p.read_bytes() for p in sorted((runs / "again/dropped").iterdir())
    }

    side = sidecars(runs / "old")
    nothing_dropped = side.filter(is_kept(side)).slice(0, 5)
    stats = ShardWriter(str(tmp_path)).write("00000", nothing_dropped, {})
    with tarfile.open(tmp_path / "dropped/00000.tar") as tar:
        assert tar.getmembers() == []
    assert stats["written"]["dropped_thumbnails"] == 0 and stats["written"]["dropped_tar_bytes"] > 0
