"""Shards that others wrote as input: the real img2dataset's output folder, and DataComp-layout tars.

img2dataset (the release the benchmarks use, in a venv of its own: tests/support/peers.py) downloads a
small set of images from a local server, some of whose URLs are 404, into WebDataset tars with its parquet
and stats beside them; `curate run` then reads that folder (the tars only), processes the carried bytes
without fetching anything, and must account for every sample exactly once, keep img2dataset's keys as uids,
carry its metadata as input columns, and hash and store the very bytes that were in the tars. A missing
registry fails these tests: CI has it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import sidecars, write_pipeline
from PIL import Image
from support import peers

from curate.core.output import collect_output
from curate.core.schema import is_kept
from curate.demo.server import WorldServer

IMAGES = 20
MISSING = 3  # URLs that answer 404: img2dataset lists them in its parquet, not in its tars
PER_SHARD = 8  # img2dataset's number_sample_per_shard: 23 URLs -> 3 tars
THRESHOLD = 0.05  # filter: similarity >= THRESHOLD, on img2dataset's extra column
# The first test to use img2dataset makes its venv (seconds from a warm uv cache and a fast registry; up to
# minutes on a slow one) and runs it (10-20 s, mostly its start-up): more than the default 300 s may be needed.
REAL_IMG2DATASET_TIMEOUT = 600


def _image(rng: np.random.Generator, i: int) -> tuple[bytes, str]:
    w, h = int(rng.integers(40, 130)), int(rng.integers(40, 130))
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    fmt = "PNG" if i % 5 == 0 else "JPEG"
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue(), fmt.lower()


def _caption(i: int) -> str:
    # One non-ASCII caption (NFC, so curate's cleaning leaves it as it is) to check the bytes of .txt.
    return unicodedata.normalize("NFC", f"café au lait n° {i} 🌅") if i == 7 else f"a photo number {i}"


def _tar_samples(folder: Path) -> dict[str, dict]:
    """Every sample of the WebDataset tars in ``folder`` by key: {tar, ext: bytes} in member order."""
    samples: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                assert f is not None
                sample = samples.setdefault(key, {"tar": path.name})
                assert sample["tar"] == path.name, f"key {key} in two tars"
                sample[ext] = f.read()
    return samples


@pytest.fixture(scope="module")
def img2dataset_made(tmp_path_factory):
    """img2dataset's output folder for 20 served images and 3 missing ones, and what was served; or why
    img2dataset could not be installed (each test then fails with it, as a test failure, never a skip)."""
    try:
        exe = peers.img2dataset()
    except peers.PeerInstallError as e:
        return e
    tmp = tmp_path_factory.mktemp("img2dataset")
    rng = np.random.default_rng(11)
    served: dict[str, bytes] = {}
    rows: list[dict] = []
    with WorldServer() as server:
        for i in range(IMAGES):
            data, ext = _image(rng, i)
            url = server.add(f"/img/{i}.{'jpg' if ext == 'jpeg' else ext}", data, f"image/{ext}")
            served[url] = data
            rows.append({"url": url, "caption": _caption(i), "similarity": round(i / 100, 2)})
        for j in range(MISSING):  # spread over the shards
            rows.insert(
                7 * j + 2, {"url": f"{server.url}/gone/{j}.jpg", "caption": f"gone {j}", "similarity": 0.5}
            )
        url_list = tmp / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), url_list)
        out = tmp / "out"
        cmd = [
            str(exe),
            f"--url_list={url_list}",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=caption",
            '--save_additional_columns=["similarity"]',
            "--output_format=webdataset",
            f"--output_folder={out}",
            "--image_size=64",
            "--resize_mode=keep_ratio",
            "--encode_format=jpg",
            f"--number_sample_per_shard={PER_SHARD}",
            "--processes_count=1",
            "--thread_count=4",
            "--distributor=multiprocessing",
            "--enable_wandb=False",
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **peers.PEER_ENV}, timeout=240
        )
    assert done.returncode == 0, f"img2dataset failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return out, served, rows


def _made(made):
    """What img2dataset made, or a test failure saying why it could not be installed."""
    if isinstance(made, peers.PeerInstallError):
        pytest.fail(f"img2dataset could not be installed in its own venv: {made}", pytrace=False)
    return made


@pytest.mark.slow
@pytest.mark.timeout(REAL_IMG2DATASET_TIMEOUT)
def test_img2dataset_wrote_what_the_test_relies_on(img2dataset_made):
    """The peer's output itself: three tars with a parquet and stats beside each, and the 404s only in
    the parquets; otherwise the tests below would prove less than they claim."""
    out, _, rows = _made(img2dataset_made)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"0000{i}{s}" for i in range(3) for s in (".parquet", ".tar", "_stats.json")]
    meta = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()
    assert len(meta) == len(rows) == IMAGES + MISSING
    statuses = {r["key"]: r["status"] for r in meta}
    assert sorted(statuses.values()).count("failed_to_download") == MISSING
    samples = _tar_samples(out)
    assert sorted(samples) == sorted(k for k, s in statuses.items() if s == "success")
    assert all(set(s) == {"tar", "jpg", "txt", "json"} for s in samples.values())


@pytest.mark.slow
@pytest.mark.timeout(REAL_IMG2DATASET_TIMEOUT)
@pytest.mark.parametrize("fmt", [None, "webdataset"], ids=["format-inferred", "format-webdataset"])
def test_curate_reads_img2dataset_output(img2dataset_made, tmp_path, cli, fmt):
    out, served, _ = _made(img2dataset_made)
    samples = _tar_samples(out)
    parquet_rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()
    i2d_stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    metas = {key: json.loads(s["json"]) for key, s in samples.items()}

    result = tmp_path / "curated"
    pipeline = write_pipeline(
        tmp_path / "p.yaml",
        out,  # the folder: 00000.tar beside 00000.parquet and 00000_stats.json
        result,
        [
            # Carried bytes: nothing is fetched (no allow_private for the server, which is gone anyway).
            {"stage": "download", "resize_mode": "no", "encode_format": "original"},
            {"stage": "filter", "rules": [f"similarity >= {THRESHOLD}"]},
        ],
        input={"url_col": "url", "caption_col": None, "uid_col": "key", **({"format": fmt} if fmt else {})},
        shard_size=5,  # curate's shards cut across img2dataset's tars
    )
    done = cli("run", pipeline)
    assert done.code == 0, done

    # Every sample of the tars exactly once, and nothing else: the 404 rows of img2dataset's parquets are
    # not samples (they have no image), its stats count the same successes.
    summary = collect_output(result)
    expected_kept = sorted(k for k, m in metas.items() if m["similarity"] >= THRESHOLD)
    assert summary.counts["rows"] == len(samples) == sum(s["successes"] for s in i2d_stats) == IMAGES
    assert sum(s["count"] for s in i2d_stats) == len(parquet_rows) == IMAGES + MISSING
    assert summary.counts["status"] == {"ok": IMAGES}
    assert summary.counts["kept"] == len(expected_kept) < IMAGES
    side = sidecars(result)
    uids = side["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == IMAGES
    assert set(uids) == set(samples)  # input.uid_col: key keeps img2dataset's keys
    assert not set(uids) & {r["key"] for r in parquet_rows if r["status"] != "success"}

    # img2dataset's json as input columns; the ones named like curate's are carried as input_<name>.
    carried = {
        "similarity",
        "key",
        "input_caption",
        "input_status",
        "error_message",
        "input_width",
        "input_height",
        "original_width",
        "original_height",
        "exif",
        "input_sha256",
    }
    assert carried <= set(side.column_names), sorted(carried - set(side.column_names))
    for row in side.to_pylist():
        key = row["uid"]
        s, meta = samples[key], metas[key]
        assert row["key"] == meta["key"] == key
        assert row["source"] == f"{s['tar']}#{key}"
        assert row["url"] == meta["url"] and row["url"] in served
        assert row["caption"] == s["txt"].decode() == meta["caption"] == row["input_caption"]
        assert row["similarity"] == meta["similarity"]
        assert row["input_status"] == meta["status"] == "success"
        assert (row["input_width"], row["input_height"]) == (meta["width"], meta["height"])
        assert (row["original_width"], row["original_height"]) == (
            meta["original_width"],
            meta["original_height"],
        )
        # curate hashes the bytes it was given (img2dataset's stored JPEG); img2dataset hashed what it
        # downloaded, which is what the server sent.
        assert row["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
        assert row["input_sha256"] == meta["sha256"] == hashlib.sha256(served[row["url"]]).hexdigest()
        assert (row["width"], row["height"]) == (meta["width"], meta["height"])  # resize_mode: no
        assert row["status"] == "ok" and row["mime"] == "image/jpeg"
        assert (row["drop_reason"] is None) == (meta["similarity"] >= THRESHOLD)
    kept = side.filter(is_kept(side))
    assert sorted(kept["uid"].to_pylist()) == expected_kept

    # The output opens with the webdataset library: the kept samples, with img2dataset's very bytes
    # (encode_format: original), its caption, and the carried metadata in the json.
    tars = sorted(str(p) for p in (result / "shards").glob("*.tar"))
    got = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert sorted(g["__key__"] for g in got) == expected_kept
    for g in got:
        key = g["__key__"]
        meta = json.loads(g["json"])
        assert g["jpg"] == samples[key]["jpg"]
        assert g["txt"] == samples[key]["txt"]
        assert meta["uid"] == meta["key"] == key
        assert meta["similarity"] == metas[key]["similarity"]
        assert meta["url"] == metas[key]["url"]
        assert meta["sha256"] == hashlib.sha256(g["jpg"]).hexdigest()


# --- DataComp's layout: a uid in the json, no url ---------------------------------------------------


def _datacomp_uid(i: int) -> str:
    return hashlib.md5(f"datacomp-{i}".encode()).hexdigest()  # 32 hex digits, like DataComp's


def _uid_array(uids) -> np.ndarray:
    """DataComp's subset file format: each uid as two uint64 (high, low), sorted."""
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    return arr


def _write_datacomp_tars(folder: Path, n: int, per_tar: int, *, repeat_uid: bool = False) -> dict[str, dict]:
    """DataComp-style tars: <key>.jpg, <key>.txt and <key>.json with a uid and a score, no url."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict] = {}
    for t in range(0, n, per_tar):
        with tarfile.open(folder / f"{t // per_tar:08d}.tar", "w") as tar:
            for i in range(t, min(t + per_tar, n)):
                uid = _datacomp_uid(0 if repeat_uid and i == n - 1 else i)
                img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                meta = {"uid": uid, "clip_l14_similarity_score": round(float(rng.uniform(0.1, 0.4)), 4)}
                caption = f"datacomp sample {i}"
                members = {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:012d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                expected.setdefault(uid, {"meta": meta, "caption": caption, "jpg": buf.getvalue()})
    return expected


def test_datacomp_tars_keep_their_uids_and_select_by_uid(tmp_path, cli):
    expected = _write_datacomp_tars(tmp_path / "datacomp", 30, 12)
    result = tmp_path / "curated"
    pipeline = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "datacomp",
        result,
        [
            {"stage": "download", "image_size": 32, "resize_mode": "keep_ratio"},
            {"stage": "filter", "rules": ["clip_l14_similarity_score >= 0.25"]},
        ],
        input={"format": "webdataset", "uid_col": "uid", "url_col": "url", "caption_col": None},
        shard_size=8,
    )
    done = cli("run", pipeline)
    assert done.code == 0, done

    side = sidecars(result)
    assert side.num_rows == len(expected) == 30
    assert sorted(side["uid"].to_pylist()) == sorted(expected)
    assert side["input_uid"].to_pylist() == side["uid"].to_pylist()  # the json's uid, carried beside
    assert side["url"].null_count == side.num_rows  # no url: nothing to fetch, nothing made up
    for row in side.to_pylist():
        e = expected[row["uid"]]
        assert row["status"] == "ok"
        assert row["caption"] == e["caption"]
        assert row["sha256"] == hashlib.sha256(e["jpg"]).hexdigest()
        assert row["clip_l14_similarity_score"] == e["meta"]["clip_l14_similarity_score"]

    # DataComp-style selection: the kept uids, read from the sidecars, as DataComp's subset array.
    want = {u for u, e in expected.items() if e["meta"]["clip_l14_similarity_score"] >= 0.25}
    assert 0 < len(want) < len(expected)
    kept = side.filter(is_kept(side))
    subset = tmp_path / "subset.npy"
    np.save(subset, _uid_array(kept["uid"].to_pylist()))
    loaded = np.load(subset)
    assert loaded.dtype == np.dtype("u8,u8")
    assert np.array_equal(loaded, _uid_array(want))

    # Each kept sample's json in the output tars carries its DataComp uid as `uid`, and is named by it.
    tars = sorted(str(p) for p in (result / "shards").glob("*.tar"))
    got = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert sorted(g["__key__"] for g in got) == sorted(want)
    for g in got:
        meta = json.loads(g["json"])
        assert meta["uid"] == meta["input_uid"] == g["__key__"]
        assert (
            meta["clip_l14_similarity_score"] == expected[g["__key__"]]["meta"]["clip_l14_similarity_score"]
        )
        assert g["txt"].decode() == expected[g["__key__"]]["caption"]
        assert Image.open(io.BytesIO(g["jpg"])).size == (43, 32)  # 64x48, keep_ratio to 32 on the short side


def test_a_repeated_datacomp_uid_stops_the_run_before_any_work(tmp_path, cli):
    _write_datacomp_tars(tmp_path / "datacomp", 10, 4, repeat_uid=True)
    result = tmp_path / "curated"
    pipeline = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "datacomp",
        result,
        [{"stage": "download"}],
        input={"format": "webdataset", "uid_col": "uid", "url_col": "url", "caption_col": None},
    )
    done = cli("run", pipeline)
    assert done.code == 2, done
    assert _datacomp_uid(0) in done.err and "input.uid_col" in done.err
    assert not (result / "shards").exists() or not any((result / "shards").iterdir())
