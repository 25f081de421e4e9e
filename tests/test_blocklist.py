"""The blocklist stage drops exactly the listed images (and their byte copies), and ``curate takedown``
removes samples from a finished run, its dropped/ thumbnails and its index, atomically, audited, idempotent,
and completed by a rerun after a crash."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import urllib.request
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import sidecars, write_pipeline
from PIL import Image, ImageOps
from support.data import make_tiny_clip

import curate.tools.takedown
from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.index import Retriever, build_index
from curate.kit.hashing import pdq_hash


@pytest.fixture(scope="module")
def base(tmp_path_factory, world_server):
    """A run of the world with download and a tiny CLIP (embeddings), and a Flat index over it."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("blocklist")
    pq.write_table(world.input_table(server.url), tmp / "in.parquet")
    clip = make_tiny_clip(tmp / "clip")
    stages = [
        {**_download(server), "pdq": True},
        {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 1, "decode_threads": 1},
        {"stage": "filter", "rules": ["width >= 64"]},  # drops nothing: dropped/ gets thumbnails from dedup
        {"stage": "dedup", "exact": True, "perceptual": False, "semantic": False, "keep": []},
    ]
    out = tmp / "run"
    _run(tmp, "run", out, stages)
    build_index([str(out)], out / "index")
    return tmp, out, world, server


def _download(server) -> dict:
    return {
        "stage": "download",
        "allow_private": [server.host_port],
        "image_size": 64,
        "resize_mode": "center_crop",
    }


def _run(tmp, name, out, stages):
    p = write_pipeline(
        tmp / f"{name}.yaml",
        tmp / "in.parquet",
        out,
        stages,
        input={"url_col": "url", "caption_col": "caption"},
    )
    run_pipeline(load_config(p, []), overwrite=True, show_progress=False)


def _reconciles(out) -> dict:
    side = sidecars(out)
    rows = side.to_pylist()
    total = {"rows": 0, "ok": 0, "kept": 0, "status": Counter(), "drop_reason": Counter()}
    for f in sorted((out / "shards").glob("*_stats.json")):
        s = json.loads(f.read_text())
        for k in ("rows", "ok", "kept"):
            total[k] += s[k]
        total["status"].update(s["status"])
        total["drop_reason"].update(s["drop_reason"])
    kept = [r for r in rows if r["status"] == "ok" and r["drop_reason"] is None]
    assert total["rows"] == len(rows) == 200 == sum(total["status"].values())
    assert total["ok"] == sum(r["status"] == "ok" for r in rows)
    assert total["kept"] == len(kept)
    reasons = Counter(
        r["drop_reason"].split(":")[0] if r["drop_reason"].startswith("dup") else r["drop_reason"]
        for r in rows
        if r["drop_reason"]
    )
    assert sum(total["drop_reason"].values()) == sum(reasons.values())
    return total


# --- the blocklist stage ----------------------------------------------------------------------------------


def test_blocklist_drops_exactly_the_listed_images_and_their_copies(base):
    tmp, out, world, server = base
    rows = [r for r in sidecars(out).to_pylist() if r["status"] == "ok"]
    truth = {r["uid"]: r["kind"] for r in world.truth_table(server.url).to_pylist()}
    by_sha = Counter(r["sha256"] for r in rows)
    copied = [r for r in rows if truth[r["uid"]] == "clean" and by_sha[r["sha256"]] == 2]
    single = [r for r in rows if truth[r["uid"]] == "clean" and by_sha[r["sha256"]] == 1]
    assert len(copied) >= 1 and len(single) >= 4
    sha_rows = [copied[0], single[0], single[1]]
    ph_rows = single[2:4]
    (tmp / "sha.txt").write_text(
        "# known images\n\n" + "".join(f"{r['sha256'].upper()}  # x\n" for r in sha_rows)
    )
    (tmp / "ph.txt").write_text("".join(f"{r['phash']}\n" for r in ph_rows))
    listed = _run_blocklist(tmp, server, {"sha256": [str(tmp / "sha.txt")], "phash": [str(tmp / "ph.txt")]})
    got = {r["uid"]: r for r in sidecars(listed).to_pylist()}
    sha = {r["sha256"] for r in sha_rows}
    ph = {r["phash"] for r in ph_rows}
    want_sha = {r["uid"] for r in rows if r["sha256"] in sha}
    want_ph = {r["uid"] for r in rows if r["uid"] not in want_sha and ({r["phash"], r["phash_mirror"]} & ph)}
    assert len(want_sha) == 4 and want_sha >= {r["uid"] for r in sha_rows}  # the copy shares the digest
    assert want_ph >= {r["uid"] for r in ph_rows}
    blocked = {u for u, r in got.items() if r["drop_reason"] == "blocklisted"}
    assert blocked == want_sha | want_ph
    for u in want_sha:
        assert got[u]["blocklist_match"] == f"sha256:{tmp / 'sha.txt'}" and got[u]["blocklist_distance"] == 0
    for u in want_ph:
        assert got[u]["blocklist_match"].endswith(f":{tmp / 'ph.txt'}")
    assert all(r["blocklist_match"] is None for u, r in got.items() if u not in blocked)
    # nothing of a blocked image is left: no tar member, no thumbnail
    for folder in ("shards", "dropped"):
        for f in (listed / folder).glob("*.tar"):
            with tarfile.open(f) as t:
                assert not {n.split(".")[0] for n in t.getnames()} & blocked
    total = _reconciles(listed)
    assert total["drop_reason"]["blocklisted"] == len(blocked)
    assert total["kept"] == sum(r["status"] == "ok" for r in got.values()) - sum(
        v for k, v in total["drop_reason"].items() if k not in total["status"]
    )


def _run_blocklist(tmp, server, config):
    out = tmp / "listed"
    _run(tmp, "listed", out, [_download(server), {"stage": "blocklist", **config}])
    return out


def test_md5_and_pdq_lists_block_the_images_and_their_flipped_copies(base):
    tmp, out, world, server = base
    rows = [r for r in sidecars(out).to_pylist() if r["status"] == "ok"]
    truth = {r["uid"]: r["kind"] for r in world.truth_table(server.url).to_pylist()}
    by_sha = Counter(r["sha256"] for r in rows)
    single = [r for r in rows if truth[r["uid"]] == "clean" and by_sha[r["sha256"]] == 1]
    md5_row, pdq_row, flipped_row = single[4], single[5], single[6]
    # The lists as a child-safety hotline or Meta's tools would make them: md5 of the bytes, PDQ of the image.
    body = {r["uid"]: urllib.request.urlopen(r["url"]).read() for r in (md5_row, pdq_row, flipped_row)}
    (tmp / "md5.txt").write_text(hashlib.md5(body[md5_row["uid"]]).hexdigest() + "\n")
    original = Image.open(io.BytesIO(body[pdq_row["uid"]]))
    mirrored = ImageOps.mirror(Image.open(io.BytesIO(body[flipped_row["uid"]])))
    (tmp / "pdq.txt").write_text(f"pdq:{pdq_hash(original)[0]}\n{pdq_hash(mirrored)[0]}\n")
    out2 = tmp / "listed-pdq"
    stages = [
        {**_download(server), "pdq": True},
        {"stage": "blocklist", "md5": [str(tmp / "md5.txt")], "pdq": [str(tmp / "pdq.txt")]},
    ]
    _run(tmp, "listed-pdq", out2, stages)
    got = {r["uid"]: r for r in sidecars(out2).to_pylist()}
    blocked = {u: got[u]["blocklist_match"] for u in got if got[u]["drop_reason"] == "blocklisted"}
    same_md5 = {r["uid"] for r in rows if r["sha256"] == md5_row["sha256"]}
    assert {u for u, m in blocked.items() if m.startswith("md5:")} == same_md5
    assert (
        blocked[pdq_row["uid"]] == f"pdq:{tmp / 'pdq.txt'}" and got[pdq_row["uid"]]["blocklist_distance"] == 0
    )
    # Listed as its mirror image: found through its dihedral hashes.
    assert blocked[flipped_row["uid"]] == f"pdq_dihedral:{tmp / 'pdq.txt'}"
    assert got[flipped_row["uid"]]["blocklist_distance"] <= 31
    assert len(got[pdq_row["uid"]]["pdq"]) == 64 and 0 <= got[pdq_row["uid"]]["pdq_quality"] <= 100
    # No false positives among the other clean, distinct images.
    others = {r["uid"] for r in single[7:]}
    assert not others & set(blocked) - same_md5
    _reconciles(out2)


def test_blocklist_config_errors_name_the_file_and_line(tmp_path):
    from pydantic import ValidationError

    from curate.stages.blocklist import BlocklistConfig

    bad = tmp_path / "bad.txt"
    bad.write_text("# ok\n" + "a" * 64 + "\nnot-a-digest\n")
    with pytest.raises(ValidationError, match=rf"{bad}:3: 'not-a-digest' is not a sha256"):
        BlocklistConfig(sha256=[str(bad)])
    with pytest.raises(ValidationError, match="no such file"):
        BlocklistConfig(phash=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValidationError, match="at least one list"):
        BlocklistConfig()


def test_hash_index_is_the_brute_force_nearest():
    from curate.kit.hashing import HashIndex, hamming

    rng = np.random.default_rng(0)
    listed = rng.integers(0, 2**63, 500, dtype=np.uint64)
    flips = np.array([1 << b for b in rng.integers(0, 64, 300)], np.uint64)
    queries = np.concatenate([listed[:300] ^ flips, rng.integers(0, 2**63, 300, dtype=np.uint64)])
    for d in (0, 1, 3):
        found, dist = HashIndex(listed, d).nearest(queries)
        full = hamming(queries[:, None], listed[None, :])
        best = full.min(1)
        want = np.where(best <= d, full.argmin(1), -1)
        assert (found == want).all() and (dist == np.where(best <= d, best, -1)).all()


# --- takedown -------------------------------------------------------------------------------------------


def _copy(base, name):
    tmp, out, _, _ = base
    dst = tmp / name
    shutil.copytree(out, dst)
    info = json.loads((dst / "index" / "index.json").read_text())  # the index points at its run
    return dst, info


def _victims(out) -> list[str]:
    rows = sidecars(out).to_pylist()
    kept = sorted(r["uid"] for r in rows if r["status"] == "ok" and r["drop_reason"] is None)
    dropped = sorted(r["uid"] for r in rows if r["status"] == "ok" and r["drop_reason"] is not None)
    return kept[:3] + dropped[:1]


def _snapshot(out) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.parts[-2] != "takedown" and p.name != "run.json"
    }


def test_takedown_removes_samples_everywhere_and_is_audited(base, cli, tmp_path):
    out, _ = _copy(base, "td")
    victims = _victims(out)
    before = Retriever(out / "index")
    vectors = {u: before.embedding(before._row_of_uid[u]) for u in victims[:3]}
    count = len(before)
    (tmp_path / "uids.txt").write_text("\n".join([*victims, "f" * 32]) + "\n")
    r = cli("takedown", out, "--uids", tmp_path / "uids.txt", "--reason", "test request")
    assert r.code == 0, r
    assert "not found:" in r.out and "f" * 32 in r.out
    gone = set(victims)
    for f in (out / "shards").glob("*.tar"):
        with tarfile.open(f) as t:
            assert not {n.split(".")[0] for n in t.getnames()} & gone
    keys = {
        s["__key__"] for s in wds.WebDataset(str(out / "shards" / "{00000..00001}.tar"), shardshuffle=False)
    }
    assert keys and not keys & gone
    for f in (out / "dropped").glob("*.tar"):
        with tarfile.open(f) as t:
            assert not {n.split(".")[0] for n in t.getnames()} & gone
    after = Retriever(out / "index")
    assert len(after) == count - 3  # the dropped victim was never indexed
    for u, v in vectors.items():
        assert u not in {n.uid for n in after.search_embedding(v, k=len(after))}
    rows = {r["uid"]: r for r in sidecars(out).to_pylist()}
    for u in victims:
        assert rows[u]["drop_reason"] == "takedown" and rows[u]["url"] is None and rows[u]["caption"] is None
        assert rows[u]["image_embedding"] is None and rows[u]["sha256"] is not None
    total = _reconciles(out)
    assert total["drop_reason"]["takedown"] == 4
    assert json.loads((out / "run.json").read_text())["counts"]["kept"] == total["kept"]
    lines = (out / "takedown" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1
    audit = json.loads(lines[0])
    assert (
        audit["reason"] == "test request" and audit["not_found"] == ["f" * 32] and audit["removed_anything"]
    )
    assert sorted(audit["found"]) == sorted(victims) and audit["user"] and audit["host"]
    for f in audit["files"]:
        path = out / f["path"] if not f["path"].startswith("/") else f["path"]
        with open(path, "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == f["sha256_after"]
        changed = f.get("removed") or f.get("marked") or f.get("rewritten")
        assert (f["sha256_after"] != f["sha256_before"]) == bool(changed), f
    assert not (out / "takedown" / "pending.json").exists()

    # again: nothing more goes, and the log says so
    files = _snapshot(out)
    r = cli("takedown", out, "--uids", tmp_path / "uids.txt")
    assert r.code == 0 and "nothing left to remove" in r.out, r
    assert _snapshot(out) == files
    lines = (out / "takedown" / "audit.jsonl").read_text().splitlines()
    second = json.loads(lines[-1])
    assert (
        len(lines) == 2
        and not second["removed_anything"]
        and sorted(second["already_taken_down"]) == sorted(victims)
    )


def test_takedown_by_md5_and_by_pdq_within_metas_threshold(base, tmp_path):
    run, _ = _copy(base, "takedown-hashes")
    rows = [r for r in sidecars(run).to_pylist() if r["status"] == "ok" and r["drop_reason"] is None]
    by_md5, by_pdq = rows[0], rows[1]
    # A PDQ hash 20 bits off the row's (a re-encoded copy as someone else hashed it) still matches.
    near = bytearray(bytes.fromhex(by_pdq["pdq"]))
    for bit in range(0, 160, 8):
        near[bit // 8] ^= 1
    far = bytes(b ^ 0xFF for b in bytes.fromhex(rows[2]["pdq"])).hex()
    (tmp_path / "hashes.txt").write_text(f"md5:{by_md5['md5']}\npdq:{bytes(near).hex()}\npdq:{far}\n")
    _, hashes = curate.tools.takedown.read_request(None, str(tmp_path / "hashes.txt"))
    record = curate.tools.takedown.takedown(str(run), hashes=hashes, source="test")
    assert record["found"] == sorted(
        {r["uid"] for r in sidecars(run).to_pylist() if r["md5"] == by_md5["md5"]} | {by_pdq["uid"]}
    )
    assert record["hashes_not_found"] == [far]
    after = {r["uid"]: r for r in sidecars(run).to_pylist()}
    assert after[by_pdq["uid"]]["drop_reason"] == "takedown" and after[by_pdq["uid"]]["pdq"] == by_pdq["pdq"]


def test_a_takedown_killed_midway_is_completed_by_a_rerun(base, monkeypatch, tmp_path):
    clean, _ = _copy(base, "clean")
    crashed, _ = _copy(base, "crashed")
    victims = _victims(clean)
    curate.tools.takedown.takedown(str(clean), uids=victims, source="x")
    real, calls = curate.tools.takedown.write_atomic, []

    def failing(fs, path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(fs, path, data)

    monkeypatch.setattr(curate.tools.takedown, "write_atomic", failing)
    with pytest.raises(OSError, match="disk on fire"):
        curate.tools.takedown.takedown(str(crashed), uids=victims, source="x")
    monkeypatch.setattr(curate.tools.takedown, "write_atomic", real)
    assert (crashed / "takedown" / "pending.json").exists() and not (
        crashed / "takedown" / "audit.jsonl"
    ).exists()
    record = curate.tools.takedown.takedown(str(crashed), uids=victims, source="x")
    assert record["resumed"] and record["removed_anything"]
    want = {k.replace("clean", "crashed"): v for k, v in _snapshot(clean).items()}
    got = _snapshot(crashed)
    assert got.keys() == want.keys()
    for k in got:
        if k != "index/index.json":
            assert got[k] == want[k], k
    a = json.loads((clean / "takedown" / "audit.jsonl").read_text())
    b = json.loads((crashed / "takedown" / "audit.jsonl").read_text())
    # the same files, removals and hashes (the index files carry their folder's path)
    assert [f for f in a["files"] if "index" not in f["path"]] == [
        f for f in b["files"] if "index" not in f["path"]
    ]


def test_cli_usage_errors_exit_2(base, cli, tmp_path):
    _, out, _, _ = base
    assert cli("takedown", out).code == 2
    (tmp_path / "u.txt").write_text("x\n")
    assert cli("takedown", out, "--uids", tmp_path / "u.txt", "--hashes", tmp_path / "u.txt").code == 2
    assert cli("takedown", out, "--uids", tmp_path / "missing.txt").code == 2
    (tmp_path / "h.txt").write_text("zz\n")
    r = cli("takedown", out, "--hashes", tmp_path / "h.txt")
    assert r.code == 2 and "h.txt:1" in r.err
