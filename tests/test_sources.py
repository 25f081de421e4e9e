"""Inputs that carry their images: WebDataset tars, image folders, parquet image columns (curate.core.sources).

Each goes through a real `curate run` with the download stage, which takes the carried bytes instead of
fetching; every input sample must come out as exactly one row, with the download stage's own statuses."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import write_pipeline
from PIL import Image

from curate.core.output import OutputFolder, collect_output

DOWNLOAD = {"stage": "download", "image_size": 32, "resize_mode": "keep_ratio"}


def _jpeg(colour, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(colour, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pipeline(tmp_path: Path, input_path, stages=None, name="p", **input_options) -> Path:
    return write_pipeline(
        tmp_path / f"{name}.yaml",
        input_path,
        tmp_path / f"out-{name}",
        stages if stages is not None else [DOWNLOAD],
        input={"url_col": "url", "caption_col": "caption", **input_options},
        shard_size=4,
    )


def _rows(out: Path) -> dict[str, dict]:
    folder = OutputFolder(str(out))
    rows = {}
    for shard in folder.finished_shards():
        with folder.fs.open(folder.shard_files(shard)["parquet"], "rb") as f:
            for row in pq.read_table(f).to_pylist():
                assert row["uid"] not in rows
                rows[row["uid"]] = row
    return rows


RED, GREEN = _jpeg((200, 30, 30)), _jpeg((30, 200, 30))


def _img2dataset_like(folder: Path) -> list[tuple[str, bytes]]:
    """Two tars in img2dataset's layout, with every kind of broken sample."""
    folder.mkdir()
    first = [
        ("000000000.jpg", RED),
        ("000000000.txt", b"a red square"),
        (
            "000000000.json",
            json.dumps(
                {"url": "http://ex.com/r.jpg", "key": "000000000", "status": "success", "similarity": 0.31}
            ).encode(),
        ),
        # A truncated image member: the tar is fine, the JPEG is cut.
        ("000000001.jpg", GREEN[: len(GREEN) // 3]),
        ("000000001.txt", b"a green square, cut"),
        # No caption member: a row with a null caption, not an error.
        ("000000002.png", _png((10, 10, 240))),
        # No image member.
        ("000000003.txt", b"a caption without its image"),
        ("000000003.json", b'{"key": "000000003"}'),
        # A member of a kind that is no image, alone.
        ("000000004.cls", b"7"),
        # A json that is not an object (the image is still there).
        ("000000005.jpg", GREEN),
        ("000000005.json", b"[1, 2]"),
        # The first key again, after others: a repeat.
        ("000000000.webp", RED),
    ]
    second = [
        ("sub/000010000.jpg", GREEN),
        ("sub/000010000.txt", "un carré vert".encode()),
        ("sub/000010000.json", json.dumps({"url": "http://ex.com/g.jpg", "similarity": 0.2}).encode()),
    ]
    _tar(folder / "00000.tar", first)
    _tar(folder / "00001.tar", second)
    # What img2dataset writes beside its tars, which must not be read as input.
    pq.write_table(
        pa.table({"key": ["000000000"], "status": ["success"], "extra": ["from parquet"]}),
        folder / "00000.parquet",
    )
    (folder / "00000_stats.json").write_text(json.dumps({"count": 7, "successes": 6}))
    return first + second


def test_webdataset_samples_become_rows_with_the_download_stages_statuses(tmp_path, cli):
    _img2dataset_like(tmp_path / "shards")
    r = cli("run", _pipeline(tmp_path, tmp_path / "shards"), "-q")
    assert r.code == 0, r
    rows = _rows(tmp_path / "out-p")
    by_source = {row["source"]: row for row in rows.values() if row["status"] != "duplicate_row"}
    # Eight samples in the two tars (the repeated key is a sample of its own), each exactly once.
    assert len(rows) == 8
    statuses = sorted((row["source"], row["status"]) for row in rows.values())
    assert statuses == [
        ("00000.tar#000000000", "duplicate_row"),
        ("00000.tar#000000000", "ok"),
        ("00000.tar#000000001", "decode_error"),
        ("00000.tar#000000002", "ok"),
        ("00000.tar#000000003", "no_image"),
        ("00000.tar#000000004", "no_image"),
        ("00000.tar#000000005", "bad_metadata"),
        ("00001.tar#sub/000010000", "ok"),
    ]
    first = next(r for r in rows.values() if r["source"] == "00000.tar#000000000" and r["status"] == "ok")
    # The alt-text from .txt, the URL from the json, metadata carried (colliding names get input_), the
    # sibling parquet's columns for the keys it lists, and sha256 of the bytes as they were in the tar.
    assert (first["caption"], first["url"], first["similarity"]) == (
        "a red square",
        "http://ex.com/r.jpg",
        0.31,
    )
    assert (first["input_status"], first["extra"], first["key"]) == ("success", "from parquet", "000000000")
    assert first["sha256"] == hashlib.sha256(RED).hexdigest() and first["orig_width"] == 64
    assert (first["width"], first["height"]) == (43, 32)  # keep_ratio: the smaller side to 32
    no_caption = by_source["00000.tar#000000002"]
    assert no_caption["caption"] is None and no_caption["status"] == "ok"
    assert by_source["00001.tar#sub/000010000"]["caption"] == "un carré vert"
    assert by_source["00000.tar#000000004"]["error"] == "sample 000000004 has .cls and no image member"
    repeat = next(r for r in rows.values() if r["status"] == "duplicate_row")
    assert repeat["error"] == "key 000000000 repeats sample 0 of this tar"
    # Counts reconcile: every input row once.
    summary = collect_output(OutputFolder(str(tmp_path / "out-p")))
    assert (summary.counts["rows"], summary.counts["kept"], sum(summary.counts["status"].values())) == (
        8,
        3,
        8,
    )
    # The output is WebDataset that webdataset itself reads.
    tars = sorted(str(p) for p in (tmp_path / "out-p" / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == 3 and all(min(s["jpg"].size) == 32 for s in samples)


def test_uid_col_keeps_the_sources_ids_and_refuses_a_repeat(tmp_path, cli):
    folder = tmp_path / "datacomp"
    folder.mkdir()
    uids = [f"{i:032x}" for i in (7, 8, 9)]
    _tar(
        folder / "0.tar",
        [
            (f"{i:09d}.{ext}", data)
            for i, u in enumerate(uids[:2])
            for ext, data in (("jpg", RED), ("txt", b"red"), ("json", json.dumps({"uid": u}).encode()))
        ],
    )
    _tar(
        folder / "1.tar",
        [
            ("000000009.jpg", GREEN),
            ("000000009.txt", b"red"),
            ("000000009.json", json.dumps({"uid": uids[2]}).encode()),
        ],
    )
    r = cli("run", _pipeline(tmp_path, folder, uid_col="uid"), "-q")
    assert r.code == 0, r
    rows = _rows(tmp_path / "out-p")
    assert sorted(rows) == uids  # same caption, different images: three rows, named as DataComp named them
    with tarfile.open(next((tmp_path / "out-p" / "shards").glob("*.tar"))) as tar:
        members = tar.getnames()
    assert sorted(m for m in members if m.endswith(".json")) == [f"{u}.json" for u in uids]

    _tar(folder / "2.tar", [("x.jpg", GREEN), ("x.json", json.dumps({"uid": uids[0]}).encode())])
    r = cli("run", _pipeline(tmp_path, folder, uid_col="uid", name="again"), "-q")
    assert r.code == 2 and "2.tar" in r.err and uids[0] in r.err and "0.tar" in r.err
    assert not (tmp_path / "out-again").exists()


def test_a_gzipped_tar_reads_as_the_plain_one(tmp_path, cli):
    members = _img2dataset_like(tmp_path / "plain")[-3:]
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "00001.tar.gz", "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = cli("run", _pipeline(tmp_path, tmp_path / "gz", name="gz"), "-q")
    assert r.code == 0, r
    (row,) = _rows(tmp_path / "out-gz").values()
    assert (row["status"], row["caption"], row["source"]) == (
        "ok",
        "un carré vert",
        "00001.tar.gz#sub/000010000",
    )


@pytest.mark.parametrize("damage", ["truncated", "not_a_tar"])
def test_a_broken_tar_is_refused_before_any_work_naming_the_file(tmp_path, cli, damage):
    folder = tmp_path / "in"
    _img2dataset_like(folder)
    data = (folder / "00001.tar").read_bytes()
    # Cut inside the image member's data, or 4 KiB of no tar at all.
    (folder / "00001.tar").write_bytes(data[:1000] if damage == "truncated" else os.urandom(4096))
    r = cli("run", _pipeline(tmp_path, folder), "-q")
    assert r.code == 2 and "00001.tar" in r.err and "not a readable tar file" in r.err, r
    assert not (tmp_path / "out-p").exists()


def test_a_folder_of_images_with_captions_beside_them_or_in_a_file(tmp_path, cli):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    (folder / "cats" / "a.jpg").write_bytes(RED)
    (folder / "cats" / "a.txt").write_text("a red cat")
    (folder / "b.PNG").write_bytes(_png((0, 0, 200)))  # no caption beside it
    (folder / "c.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "c.txt").write_text("an html page")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # listed, unreadable
    (folder / ".hidden.jpg").write_bytes(RED)  # skipped, as are notes and captions
    (folder / "notes.md").write_text("not an image")
    r = cli("run", _pipeline(tmp_path, folder, format="folder"), "-q")
    assert r.code == 0, r
    rows = {row["source"]: row for row in _rows(tmp_path / "out-p").values()}
    assert {k: (v["status"], v["caption"]) for k, v in rows.items()} == {
        "b.PNG": ("ok", None),
        "c.jpg": ("not_an_image", "an html page"),
        "cats/a.jpg": ("ok", "a red cat"),
        "gone.jpg": ("read_error", None),
    }
    assert rows["cats/a.jpg"]["sha256"] == hashlib.sha256(RED).hexdigest()
    assert "gone.jpg" in rows["gone.jpg"]["error"]

    # The same folder with a captions file: paths relative to the folder; the .txt files are not read.
    (folder / "captions.csv").write_text('path,caption\ncats/a.jpg,"a cat, from the file"\nb.PNG,blue\n')
    r = cli("run", _pipeline(tmp_path, folder, name="file", format="folder", captions="captions.csv"), "-q")
    assert r.code == 0, r
    rows = {row["source"]: row["caption"] for row in _rows(tmp_path / "out-file").values()}
    assert rows == {"b.PNG": "blue", "c.jpg": None, "cats/a.jpg": "a cat, from the file", "gone.jpg": None}


def test_parquet_with_image_structs_as_huggingface_datasets_writes_them(tmp_path, cli):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "g.jpg").write_bytes(GREEN)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": RED, "path": "r.jpg"},
                    {"bytes": None, "path": "images/g.jpg"},  # relative to the parquet file
                    {"bytes": None, "path": "images/missing.jpg"},
                    None,
                    {"bytes": b"\x00" * 10, "path": None},
                ],
                struct,
            ),
            "text": ["red", "green", "lost", "none", "zeros"],
            "label": [1, 2, 3, 4, 5],
        }
    )
    pq.write_table(table, tmp_path / "train-00000.parquet")
    r = cli(
        "run",
        _pipeline(tmp_path, tmp_path / "train-00000.parquet", image_col="image", caption_col="text"),
        "-q",
    )
    assert r.code == 0, r
    rows = sorted(_rows(tmp_path / "out-p").values(), key=lambda row: row["input_index"])
    assert [(row["caption"], row["status"], row["label"]) for row in rows] == [
        ("red", "ok", 1),
        ("green", "ok", 2),
        ("lost", "read_error", 3),
        ("none", "no_image", 4),
        ("zeros", "not_an_image", 5),
    ]
    assert [row["source"] for row in rows] == [f"train-00000.parquet#{i}" for i in range(5)]
    assert rows[1]["sha256"] == hashlib.sha256(GREEN).hexdigest()
    assert "image" not in rows[0] or rows[0].get("image") is None  # the input's bytes are not carried

    # Raw bytes work the same way.
    pq.write_table(pa.table({"jpg": [RED, GREEN], "caption": ["r", "g"]}), tmp_path / "raw.parquet")
    r = cli("run", _pipeline(tmp_path, tmp_path / "raw.parquet", name="raw", image_col="jpg"), "-q")
    assert r.code == 0, r
    assert sorted(row["status"] for row in _rows(tmp_path / "out-raw").values()) == ["ok", "ok"]


def test_images_that_come_with_the_input_need_the_download_stage(tmp_path, cli):
    _img2dataset_like(tmp_path / "shards")
    r = cli(
        "run", _pipeline(tmp_path, tmp_path / "shards", stages=[{"stage": "basic_filter", "min_words": 1}])
    )
    assert r.code == 2 and "add a `download` stage" in r.err, r
    r = cli(
        "validate", _pipeline(tmp_path, tmp_path / "shards", name="bad", caption_field="x", format="folder")
    )
    assert r.code == 2 and "caption_field is for input.format webdataset" in r.err, r


def test_local_and_ray_read_the_same_shards(tmp_path, cli, ray_cluster):
    _img2dataset_like(tmp_path / "shards")
    for executor in ("local", "ray"):
        p = _pipeline(tmp_path, tmp_path / "shards", name=executor)
        r = cli("run", p, "--executor", executor, "-q")
        assert r.code == 0, r
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert (tmp_path / "out-local" / "shards" / name).read_bytes() == (
            tmp_path / "out-ray" / "shards" / name
        ).read_bytes()
