"""`curate retry` in a pipeline with a global stage (dedup): retried rows that recover are decided against
the whole run with the rule of one run (the keep order), so a retried run ends as one run in which nothing
had failed; counts reconcile. (Retry without a global stage is tested with the download stage.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sidecars, write_pipeline
from PIL import Image
from support.hostile import encode

from curate.core.output import collect_output
from curate.core.schema import is_kept
from curate.demo.server import WorldServer, sample_jpeg


@pytest.fixture(scope="module")
def server():
    with WorldServer() as s:
        for k in range(6):
            rng = np.random.default_rng(k)
            photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
            s.add(f"/photo{k}.jpg", encode(photo, "JPEG"), "image/jpeg")
        s.add("/sample.jpg", sample_jpeg(), "image/jpeg")  # the bytes /flaky/ answers with once it works
        yield s


DEDUP = {"stage": "dedup", "exact": True, "perceptual": False, "semantic": False, "keep": ["priority desc"]}


def _pipeline(tmp_path, server, rows, output, after=()):
    """A run over ``rows`` of (path, priority), 4 rows a shard: download (no retries), dedup by sha256
    keeping the highest priority, then a per-shard stage after dedup."""
    table = pa.table(
        {
            "url": [server.url + p for p, _ in rows],
            "caption": [f"picture {i}" for i in range(len(rows))],
            "priority": [float(x) for _, x in rows],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    download = {"stage": "download", "allow_private": [server.host_port], "image_size": 32, "retries": 0}
    return write_pipeline(
        tmp_path / f"{output}.yaml",
        tmp_path / "in.parquet",
        tmp_path / output,
        [download, DEDUP, {"stage": "caption_chars"}, *after],
        shard_size=4,
        input={"url_col": "url", "caption_col": "caption"},
    )


def _reasons(output) -> dict[str, str | None]:
    return {r["caption"]: r["drop_reason"] for r in sidecars(output).to_pylist()}


def test_retried_rows_are_deduplicated_against_the_whole_run(tmp_path, server, cli):
    rows = [
        ("/photo0.jpg", 0.5),
        ("/sample.jpg", 0.5),  # kept at first; a retried copy with a higher priority displaces it
        ("/photo1.jpg", 0.5),
        ("/photo2.jpg", 0.5),
        ("/flaky/retry-win/1", 0.9),  # http_500, then the sample's bytes: wins over picture 1
        ("/flaky/retry-lose/1", 0.1),  # http_500, then the sample's bytes: loses
        ("/status/404", 0.5),  # not transient: not retried
        ("/photo3.jpg", 0.5),
        ("/photo4.jpg", 0.5),
    ]
    p = _pipeline(tmp_path, server, rows, "out")
    assert cli("run", p, "-q").code == 0
    out = tmp_path / "out"
    first = _reasons(out)
    assert all(r is None for r in first.values())  # nothing to deduplicate among the rows that came
    side = sidecars(out)
    status = dict(zip(side["caption"].to_pylist(), side["status"].to_pylist(), strict=True))
    assert status["picture 4"] == status["picture 5"] == "http_500" and status["picture 6"] == "http_404"
    untouched = (out / "shards/00002.tar").read_bytes()

    r = cli("retry", out)
    assert r.code == 0, r
    assert "retried 2 row(s) in 1 shard(s): 2 recovered; still failing: none" in r.out, r

    side = sidecars(out)
    uid = dict(zip(side["caption"].to_pylist(), side["uid"].to_pylist(), strict=True))
    reasons = _reasons(out)
    assert reasons["picture 4"] is None
    assert reasons["picture 1"] == reasons["picture 5"] == f"duplicate:exact:{uid['picture 4']}"
    assert {k for k, v in reasons.items() if v is not None} == {"picture 1", "picture 5"}
    rows_after = {r["caption"]: r for r in side.to_pylist()}
    # The retried rows went through the stage after dedup; the displaced row kept its columns.
    assert rows_after["picture 4"]["caption_chars"] == len("picture 4")
    assert rows_after["picture 1"]["sha256"] == rows_after["picture 4"]["sha256"]
    assert (out / "shards/00002.tar").read_bytes() == untouched  # no decision changed there
    stats0 = json.loads((out / "shards/00000_stats.json").read_text())
    stats1 = json.loads((out / "shards/00001_stats.json").read_text())
    assert stats0["redecided"][-1]["rows"] == 1 and stats1["retries"][-1]["recovered"] == 2
    assert not (out / "global/dedup/previous").exists() and not (out / "work").exists()

    # Counts reconcile, and are those of one run in which nothing failed (the flaky URLs work now).
    summary = collect_output(str(out))
    c = summary.counts
    assert c["rows"] == len(rows) and c["status"] == {"http_404": 1, "ok": len(rows) - 1}
    assert c["kept"] == c["ok"] - sum(c["drop_reason"].values()) == len(rows) - 3
    assert c["drop_reason"] == {"duplicate:exact": 2}
    info = json.loads((out / "run.json").read_text())
    assert info["counts"] == c and info["retries"][-1]["recovered"] == 2
    kept = side.filter(is_kept(side))
    assert len({u for u in kept["uid"].to_pylist()}) == kept.num_rows == c["kept"]
    one = _pipeline(tmp_path, server, rows, "one")
    assert cli("run", one, "-q").code == 0
    assert _reasons(tmp_path / "one") == reasons
    assert collect_output(str(tmp_path / "one")).counts == c

    # Nothing left to retry: a second retry changes nothing.
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    r = cli("retry", out)
    assert r.code == 0 and "retried 0 row(s)" in r.out
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before


def test_retry_refuses_a_stage_that_drops_rows_after_the_global_stage(tmp_path, server, cli):
    rows = [("/photo0.jpg", 0.5), ("/flaky/retry-refused/1", 0.5)]
    p = _pipeline(tmp_path, server, rows, "out", after=[{"stage": "filter", "rules": ["priority >= 0"]}])
    assert cli("run", p, "-q").code == 0
    r = cli("retry", tmp_path / "out")
    assert r.code == 2 and "'filter' comes after the global stage 'dedup'" in r.err, r
