"""Growing a run: new input becomes new shards, the old ones are never read from the input again nor scored
again, and dedup decides the new rows against the run: a grown run keeps what one run over all the input
keeps, with the same drop reasons, rewriting an old shard where a new row beats one of its kept rows."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sidecars, write_pipeline

from curate.core.output import collect_output
from curate.core.schema import is_kept

# Row name -> (sha256 group, phash, clip_score). Names are the captions, so uids follow from them.
_FAR = [f"{(0x9E3779B97F4A7C15 * (k + 1)) % 2**64:016x}" for k in range(40)]  # hashes far from each other
A_ROWS = [
    ("a0", "s-a0", _FAR[0], 0.5),
    ("a1", "s-a1", _FAR[1], 0.5),
    ("a2", "s-a2", _FAR[2], 0.5),
    ("a3", "s-a3", _FAR[3], 0.5),
    ("a4", "s-a4", _FAR[4], 0.5),
    # shard 00001: an exact group (x) that a new row wins, and a perceptual pair (p) that a new row wins
    ("a_x", "s-x", _FAR[5], 0.5),
    ("a_x2", "s-x", _FAR[5], 0.4),  # dropped for a_x in run A; for b_x once it grows
    ("a5", "s-a5", _FAR[6], 0.5),
    ("a_p", "s-ap", _FAR[7], 0.5),
    ("a6", "s-a6", _FAR[8], 0.5),
    # shard 00002: an exact group (y) that the old row keeps
    ("a_y", "s-y", _FAR[9], 0.9),
    ("a7", "s-a7", _FAR[10], 0.5),
    ("a8", "s-a8", _FAR[11], 0.5),
    ("a9", "s-a9", _FAR[12], 0.5),
]
B_ROWS = [
    ("b_x", "s-x", _FAR[13], 0.9),  # beats a_x (0.5): a_x and a_x2 become its duplicates
    ("b_y", "s-y", _FAR[14], 0.3),  # loses to a_y
    ("b_p", "s-bp", f"{int(_FAR[7], 16) ^ 0b101:016x}", 0.8),  # 2 bits from a_p, a better score
    ("b0", "s-b0", _FAR[15], 0.5),
    ("b1", "s-b1", _FAR[16], 0.5),
    ("b2", "s-b2", _FAR[17], 0.5),
]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://example.com/{name}.jpg" for name, *_ in rows],
                "TEXT": [name for name, *_ in rows],
                "sha256": [sha for _, sha, _, _ in rows],
                "phash": [ph for _, _, ph, _ in rows],
                "clip_score": [score for *_, score in rows],
            }
        ),
        path,
    )


def _stages(state_dir):
    return [
        {"stage": "synthetic_image", "size": 24},
        {"stage": "planted", "columns": ["sha256", "phash", "clip_score"]},
        # Counts each time a shard holding input row 0, 5 or 10 (one per old shard) is scored: never fails.
        {"stage": "fail", "rows": [0, 5, 10], "times": 0, "state_dir": str(state_dir)},
        {
            "stage": "dedup",
            "exact": True,
            "perceptual": {"max_distance": 4, "verify_cosine": None, "flips": False},
            "semantic": False,
        },
    ]


def _decisions(output) -> dict[str, str | None]:
    """caption -> drop reason, with uids in reasons spelled as captions (uids of the two runs agree)."""
    side = sidecars(output)
    name = dict(zip(side["uid"].to_pylist(), side["caption"].to_pylist(), strict=True))
    out = {}
    for row in side.to_pylist():
        reason = row["drop_reason"]
        if reason and reason.startswith("duplicate:"):
            kind, uid = reason.split(":")[1:]
            reason = f"duplicate:{kind}:{name[uid]}"
        out[row["caption"]] = reason
    return out


def _one_run(tmp_path, cli):
    _write(tmp_path / "all/a.parquet", B_ROWS)
    _write(tmp_path / "all/m.parquet", A_ROWS)
    p = write_pipeline(
        tmp_path / "all.yaml", tmp_path / "all", tmp_path / "one", _stages(tmp_path / "c1"), shard_size=5
    )
    (tmp_path / "c1").mkdir()
    assert cli("run", p, "-q").code == 0
    return tmp_path / "one"


def _shard_bytes(output, shard):
    return {
        name: (output / "shards" / name).read_bytes() for name in (f"{shard}.tar", f"{shard}.parquet")
    } | {f"dropped/{shard}.tar": (output / "dropped" / f"{shard}.tar").read_bytes()}


@pytest.mark.parametrize("how", ["new_file", "add"])
def test_a_grown_run_keeps_what_one_run_over_all_input_keeps(tmp_path, cli, how):
    (tmp_path / "counts").mkdir()
    _write(tmp_path / "in/m.parquet", A_ROWS)
    source = tmp_path / "in" if how == "new_file" else tmp_path / "in/m.parquet"
    p = write_pipeline(
        tmp_path / "p.yaml", source, tmp_path / "out", _stages(tmp_path / "counts"), shard_size=5
    )
    assert cli("run", p, "-q").code == 0
    out = tmp_path / "out"
    first = _decisions(out)
    assert first["a_x2"] == "duplicate:exact:a_x" and first["a_x"] is None and first["a_p"] is None
    before = {s: _shard_bytes(out, s) for s in ("00000", "00001", "00002")}
    counted = {f.name: f.read_text() for f in (tmp_path / "counts").iterdir()}
    assert counted == {"attempts-0": "1", "attempts-5": "1", "attempts-10": "1"}

    # New rows arrive in a file that sorts before the old one: it must not move the old shards.
    if how == "new_file":
        _write(tmp_path / "in/a.parquet", B_ROWS)
        r = cli("run", p, "-q")
    else:
        _write(tmp_path / "more/a.parquet", B_ROWS)
        r = cli("run", p, "-q", "--add", tmp_path / "more/a.parquet")
    assert r.code == 0, r

    # The old shards were not scored again, and those whose decisions did not change were not touched.
    assert {f.name: f.read_text() for f in (tmp_path / "counts").iterdir()} == counted
    assert _shard_bytes(out, "00000") == before["00000"] and _shard_bytes(out, "00002") == before["00002"]
    assert _shard_bytes(out, "00001") != before["00001"]
    stats = json.loads((out / "shards/00001_stats.json").read_text())
    assert stats["redecided"][-1]["rows"] == 3  # a_x and a_p displaced, a_x2 pointed to b_x
    side = sidecars(out)
    old = side.filter(pa.compute.less(side["input_index"], len(A_ROWS)))
    by_shard = {r["caption"]: r["input_index"] for r in old.to_pylist()}
    assert by_shard == {name: i for i, (name, *_) in enumerate(A_ROWS)}  # old rows kept their place
    assert sorted(side["input_index"].to_pylist()) == list(range(len(A_ROWS) + len(B_ROWS)))

    # The same decisions as one run over all the input.
    grown = _decisions(out)
    one = _one_run(tmp_path, cli)
    assert grown == _decisions(one)
    assert grown["a_x"] == "duplicate:exact:b_x" and grown["a_x2"] == "duplicate:exact:b_x"
    assert grown["b_y"] == "duplicate:exact:a_y" and grown["a_y"] is None
    assert grown["a_p"] == "duplicate:perceptual:b_p" and grown["b_p"] is None
    kept = side.filter(is_kept(side))
    assert set(kept["caption"].to_pylist()) == {n for n, r in grown.items() if r is None}

    # Counts reconcile: every input row once, and the displaced rows' images left the training tar.
    summary = collect_output(str(out))
    assert summary.exit_code == 0 and summary.counts == collect_output(str(one)).counts
    c = summary.counts
    assert c["rows"] == len(A_ROWS) + len(B_ROWS) and c["kept"] == c["ok"] - sum(c["drop_reason"].values())
    assert c["drop_reason"] == {"duplicate:exact": 3, "duplicate:perceptual": 1}
    import tarfile

    with tarfile.open(out / "shards/00001.tar") as tar:
        names = tar.getnames()
    uid = {r["caption"]: r["uid"] for r in side.to_pylist()}
    assert f"{uid['a5']}.png" in names and not any(n.startswith(uid["a_x"]) for n in names)
    with tarfile.open(out / "dropped/00001.tar") as tar:
        assert f"{uid['a_x']}.jpg" in tar.getnames()

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["shards_total"] == 5 and info["counts"] == c
    assert [g["shards"] for g in info["inputs"]] == [3, 2] and info["grown_from"]["shards"] == 3
    assert info["added_inputs"] == ([] if how == "new_file" else [str(tmp_path / "more/a.parquet")])
    assert not (out / "global/dedup/previous").exists() and not (out / "work").exists()

    # Running again resumes a finished run: nothing to do, nothing changes.
    after = {s: _shard_bytes(out, s) for s in ("00000", "00001", "00002", "00003", "00004")}
    r = cli("run", p, "-q")
    assert r.code == 0, r
    assert {s: _shard_bytes(out, s) for s in after} == after


def test_a_changed_old_file_is_still_refused(tmp_path, cli):
    (tmp_path / "counts").mkdir()
    _write(tmp_path / "in/m.parquet", A_ROWS)
    p = write_pipeline(
        tmp_path / "p.yaml", tmp_path / "in", tmp_path / "out", _stages(tmp_path / "counts"), shard_size=5
    )
    assert cli("run", p, "-q").code == 0
    _write(tmp_path / "in/m.parquet", A_ROWS[:-1])
    r = cli("run", p, "-q")
    assert r.code == 2 and "another config or input" in r.err
    shutil.move(tmp_path / "in/m.parquet", tmp_path / "m.parquet")
    _write(tmp_path / "in/z.parquet", B_ROWS)
    r = cli("run", p, "-q")
    assert r.code == 2 and "m.parquet is an input file of the run" in r.err


def test_a_row_dropped_before_is_not_brought_back(tmp_path, cli):
    """A chain of near duplicates: d pairs with k (3 bits), the new row n with k (3 bits) but not with d
    (6 bits). One run over all keeps n and d; the grown run keeps n, and d, dropped for k before, stays
    dropped (its image is gone): the one case where a grown run keeps less. Nothing points to d."""
    k = int(_FAR[20], 16)
    old = [
        ("k", "s-k", f"{k:016x}", 0.5),
        ("d", "s-d", f"{k ^ 0b111:016x}", 0.4),
        ("a0", "s-a0", _FAR[0], 0.5),
    ]
    new = [("n", "s-n", f"{k ^ 0b111000:016x}", 0.9), ("e", "s-e", f"{k ^ 0b111 ^ 0b1:016x}", 0.3)]
    (tmp_path / "counts").mkdir()
    _write(tmp_path / "in/m.parquet", old)
    p = write_pipeline(
        tmp_path / "p.yaml", tmp_path / "in", tmp_path / "out", _stages(tmp_path / "counts"), shard_size=5
    )
    assert cli("run", p, "-q").code == 0
    assert _decisions(tmp_path / "out")["d"] == "duplicate:perceptual:k"
    _write(tmp_path / "in/z.parquet", new)
    assert cli("run", p, "-q").code == 0
    grown = _decisions(tmp_path / "out")
    # e is 1 bit from d, 2 from k, 5 from n: one run drops it for d; here d is left out and e pairs with k
    # only, which is dropped, so e is kept. Every dropped row but d points to a kept row.
    assert grown == {
        "k": "duplicate:perceptual:n",
        "d": "duplicate:perceptual:k",
        "a0": None,
        "n": None,
        "e": None,
    }
    one = write_pipeline(
        tmp_path / "one.yaml", tmp_path / "in", tmp_path / "one", _stages(tmp_path / "counts"), shard_size=5
    )
    assert cli("run", one, "-q").code == 0
    assert _decisions(tmp_path / "one") == {**grown, "d": None, "e": "duplicate:perceptual:d"}
    done = json.loads((tmp_path / "out/global/dedup/_done").read_text())
    assert done["grown"]["left_dropped"] == 1 and done["grown"]["rewritten"] == ["00000"]
    summary = collect_output(str(tmp_path / "out"))
    assert summary.counts["rows"] == 5 and summary.counts["kept"] == 3
