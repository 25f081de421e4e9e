import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from curate.core.output import read_sidecar
from curate.core.writer import ShardWriter, image_extension


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def table():
    return pa.table(
        {
            "uid": ["c" * 32, "a" * 32, "b" * 32, "d" * 32],
            "input_index": pa.array([0, 1, 2, 3], pa.int64()),
            "url": ["http://x/0", "http://x/1", "http://x/2", "http://x/3"],
            "caption": ["zero", "one", "two", "three"],
            "status": ["ok", "ok", "http_404", "ok"],
            "error": [None, None, "404 Not Found", None],
            "drop_reason": [None, None, None, "caption_length<9"],
            "image": pa.array([png("red"), None, None, png("blue")], pa.binary()),
            "score": [0.5, float("nan"), None, 0.1],
        }
    )


def test_tar_holds_kept_rows_in_uid_order_with_their_metadata(tmp_path):
    stats = ShardWriter(str(tmp_path)).write("00003", table(), {"stages": {}})
    assert stats["rows"] == 4 and stats["ok"] == 3 and stats["kept"] == 2 and stats["written"]["samples"] == 2
    assert stats["status"] == {"http_404": 1, "ok": 3} and stats["drop_reason"] == {"caption_length<9": 1}

    with tarfile.open(tmp_path / "shards/00003.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "a" * 32 + ".json",
        "a" * 32 + ".txt",
        "c" * 32 + ".json",
        "c" * 32 + ".png",
        "c" * 32 + ".txt",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}

    samples = list(wds.WebDataset(str(tmp_path / "shards/00003.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["a" * 32, "c" * 32]
    meta = json.loads(samples[1]["json"])
    assert meta["caption"] == "zero" and meta["score"] == 0.5 and "image" not in meta
    assert json.loads(samples[0]["json"])["score"] is None  # NaN is written as null
    assert samples[1]["txt"] == b"zero"
    assert Image.open(io.BytesIO(samples[1]["png"])).size == (4, 3)


def test_sidecar_has_every_row_and_no_image_bytes(tmp_path):
    ShardWriter(str(tmp_path)).write("00000", table(), {})
    side = pq.read_table(tmp_path / "shards/00000.parquet")
    assert side.num_rows == 4 and "image" not in side.column_names
    assert side["input_index"].to_pylist() == [0, 1, 2, 3]
    assert side["status"].to_pylist() == ["ok", "ok", "http_404", "ok"]


def test_writes_are_byte_identical_and_leave_no_temp_files(tmp_path):
    w = ShardWriter(str(tmp_path))
    w.write("00000", table(), {})
    first = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir() if p.suffix != ".json"}
    w.write("00000", table(), {})  # written twice, as a retried task would
    second = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir() if p.suffix != ".json"}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]


def test_text_column_chooses_the_training_caption(tmp_path):
    t = table().append_column("caption_fused", pa.array(["f0", "f1", "f2", "f3"]))
    ShardWriter(str(tmp_path), text_column="caption_fused").write("00000", t, {})
    samples = list(wds.WebDataset(str(tmp_path / "shards/00000.tar"), shardshuffle=False, empty_check=False))
    assert [s["txt"] for s in samples] == [b"f1", b"f0"]


def test_a_shard_with_nothing_kept_is_an_empty_valid_tar(tmp_path):
    t = table().filter(pa.array([False, False, True, False]))
    stats = ShardWriter(str(tmp_path)).write("00000", t, {})
    assert stats["kept"] == 0
    with tarfile.open(tmp_path / "shards/00000.tar") as tar:
        assert tar.getmembers() == []


def test_image_extension_from_magic_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="JPEG")
    assert image_extension(buf.getvalue()) == "jpg"
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="WEBP")
    assert image_extension(buf.getvalue()) == "webp"
    assert image_extension(png("red")) == "png"
    assert image_extension(b"nonsense") == "bin"


def test_dropped_thumbnails_are_the_dropped_rows_and_can_be_switched_off(tmp_path):
    stats = ShardWriter(str(tmp_path / "on")).write("00000", table(), {})
    with tarfile.open(tmp_path / "on" / "dropped" / "00000.tar") as tar:
        assert tar.getnames() == ["d" * 32 + ".jpg", "d" * 32 + ".json"]
        assert json.loads(tar.extractfile("d" * 32 + ".json").read())["drop_reason"] == "caption_length<9"
    assert stats["written"]["dropped_thumbnails"] == 1

    stats = ShardWriter(str(tmp_path / "off"), dropped_thumbnails=False).write("00000", table(), {})
    assert not (tmp_path / "off" / "dropped").exists()
    assert stats["written"]["dropped_thumbnails"] == 0
    on, off = (tmp_path / d / "shards" / "00000.tar" for d in ("on", "off"))
    assert on.read_bytes() == off.read_bytes()


def test_img2dataset_names_are_added_and_made_again_on_rewrite(tmp_path):
    from curate.core.writer import img2dataset_status

    t = table().append_column("orig_width", pa.array([8, None, None, 9], pa.int32()))
    t = t.append_column("orig_height", pa.array([6, None, None, 7], pa.int32()))
    stats = ShardWriter(str(tmp_path), naming="img2dataset").write(
        "00000", t, {"stages": {"read": {"seconds": 0.25}}}
    )
    side = pq.read_table(tmp_path / "shards/00000.parquet")
    assert side.column_names[-7:] == [
        "score",
        "key",
        "error_message",
        "original_width",
        "original_height",
        "exif",
        "curate_status",
    ]
    assert side["key"].to_pylist() == side["uid"].to_pylist()
    assert side["error_message"].to_pylist() == [None, None, "404 Not Found", None]
    assert side["original_width"].to_pylist() == [8, None, None, 9]
    assert side["exif"].null_count == 4
    # status is img2dataset's outcome; curate's own code is in curate_status, and curate's readers get it back.
    assert side["status"].to_pylist() == ["success", "success", "failed_to_download", "success"]
    assert side["curate_status"].to_pylist() == ["ok", "ok", "http_404", "ok"]
    ours = read_sidecar(tmp_path / "shards/00000.parquet")
    assert (
        ours["status"].to_pylist() == ["ok", "ok", "http_404", "ok"]
        and "curate_status" not in ours.column_names
    )
    assert read_sidecar(tmp_path / "shards/00000.parquet", ["uid", "status"]).column_names == [
        "uid",
        "status",
    ]
    assert {
        k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration")
    } == {
        "count": 4,
        "successes": 3,
        "failed_to_download": 1,
        "failed_to_resize": 0,
        "duration": 0.25,
    }
    assert stats["end_time"] - stats["start_time"] == 0.25 and stats["status_dict"] == {
        "success": 3,
        "404 Not Found": 1,
    }
    assert json.loads((tmp_path / "shards/00000_stats.json").read_text()) == stats
    with tarfile.open(tmp_path / "shards/00000.tar") as tar:
        meta = json.load(tar.extractfile(f"{'c' * 32}.json"))
    assert (meta["key"], meta["original_width"], meta["error_message"]) == ("c" * 32, 8, None)
    assert (meta["status"], meta["curate_status"]) == ("success", "ok")
    # A retried or grown shard comes back from its sidecar: the same columns, made again, not doubled.
    again = ShardWriter(str(tmp_path / "again"), naming="img2dataset")
    again.write("00000", ours.append_column("image", t["image"]), {})
    assert (tmp_path / "again/shards/00000.parquet").read_bytes() == (
        tmp_path / "shards/00000.parquet"
    ).read_bytes()
    # An input's own key that is not the uid stays, as input_key.
    ShardWriter(str(tmp_path / "k"), naming="img2dataset").write(
        "00000", t.append_column("key", pa.array(["k0", "k1", "k2", "k3"])), {}
    )
    side = pq.read_table(tmp_path / "k/shards/00000.parquet")
    assert (
        side["input_key"].to_pylist() == ["k0", "k1", "k2", "k3"]
        and side["key"].to_pylist() == side["uid"].to_pylist()
    )
    assert [img2dataset_status(s) for s in ("ok", "http_404", "timeout", "invalid_url", "duplicate_row")] == [
        "success",
        *["failed_to_download"] * 4,
    ]
    assert {
        img2dataset_status(s)
        for s in (
            "decode_error",
            "not_an_image",
            "too_small",
            "bad_aspect_ratio",
            "too_many_pixels",
            "unsupported_format",
        )
    } == {"failed_to_resize"}
