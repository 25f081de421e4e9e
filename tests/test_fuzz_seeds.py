"""The fuzz harnesses (fuzz/fuzz_*.py) over their seed corpus and a few hostile inputs, without atheris.

Every seed (including the ``finding-*`` inputs that once crashed a harness) must pass the harness's invariant;
the seeds must reach the success path; the harness must catch an invariant violation. The findings' fixes
are checked directly as well.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import sys
import tarfile
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from curate.base import InputError, TrainDataError
from curate.core.reader import clean_caption
from curate.kit.imaging import ImageOptions, Processed, process
from curate.train.data import iter_samples, to_pixels

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = ("image", "tar", "caption", "input")


def _load(name: str):
    """Import fuzz/fuzz_<name>.py with atheris unimportable: the harness must not need it to be imported."""
    blocked = sys.modules.get("atheris", None)
    sys.modules["atheris"] = None  # type: ignore[assignment]  # `import atheris` raises ImportError
    try:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"fuzz_{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if blocked is None:
            del sys.modules["atheris"]
        else:
            sys.modules["atheris"] = blocked
    return module


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    modules = {name: _load(name) for name in HARNESSES}
    for name in ("tar", "input"):
        folder = str(tmp_path_factory.mktemp(f"fuzz_{name}"))
        modules[name].workdir = lambda folder=folder: folder
    return modules


def _seeds(name: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / name).iterdir())


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


# --- every seed passes every invariant, and the seeds reach the success path ---------------------------------


@pytest.mark.parametrize("name", HARNESSES)
def test_seed_corpus_is_small_and_present(name):
    seeds = _seeds(name)
    assert len(seeds) >= 4
    assert sum(p.stat().st_size for p in FUZZ.joinpath("corpus").rglob("*") if p.is_file()) < 200_000


@pytest.mark.parametrize("name", HARNESSES)
def test_every_seed_passes_the_harness(harness, name):
    results = [harness[name].test_one_input(p.read_bytes()) for p in _seeds(name)]
    if name == "image":
        statuses = [r.status for r in results if r is not None]
        assert statuses.count("ok") >= 6, statuses
        assert {"not_an_image", "too_many_pixels", "bad_aspect_ratio"} <= set(statuses)
    elif name == "tar":
        assert sum(len(r) for r in results if r) >= 5  # samples read and decoded
    elif name == "input":
        assert sum(r for r in results if r) >= 20  # rows loaded
        assert None in results  # and a file that is an InputError
    else:
        assert sum(1 for r in results if r and r[0]) >= 5


# --- the harnesses catch what they are for -----------------------------------------------------------------


def test_image_harness_catches_a_bad_result(harness, monkeypatch):
    h = harness["image"]
    seed = (FUZZ / "corpus" / "image" / "seed-jpeg_rgb").read_bytes()
    monkeypatch.setattr(h, "process", lambda data, opt: Processed("weird", "?"))
    with pytest.raises(AssertionError):
        h.test_one_input(seed)

    def too_big(data, opt):
        p = process(data, opt)
        p.width += 5  # the stored image is not what was reported
        return p

    monkeypatch.setattr(h, "process", too_big)
    with pytest.raises(AssertionError):
        h.test_one_input(seed)


def test_tar_harness_lets_only_train_data_errors_through(harness, monkeypatch):
    h = harness["tar"]
    assert h.test_one_input(b"not a tar at all" * 40) is None  # a TrainDataError: allowed

    def broken(path):
        raise KeyError("json")
        yield

    monkeypatch.setattr(h, "iter_samples", broken)
    with pytest.raises(KeyError):
        h.test_one_input(b"")


def test_caption_harness_catches_the_old_order(harness, monkeypatch):
    """The clean_caption of before finding 1 (controls removed after NFC) fails the harness."""
    h = harness["caption"]
    from curate.core import reader

    def old(caption, max_chars):
        caption = unicodedata.normalize("NFC", caption)
        caption = reader._CONTROL.sub("", caption)
        return (caption[:max_chars], True) if max_chars and len(caption) > max_chars else (caption, False)

    finding = (FUZZ / "corpus" / "caption" / "finding-control-between-mark").read_bytes()
    h.test_one_input(finding)
    monkeypatch.setattr(h, "clean_caption", old)
    with pytest.raises(AssertionError, match="not NFC"):
        h.test_one_input(finding)


def test_input_harness_lets_only_input_errors_through(harness, monkeypatch):
    h = harness["input"]
    assert h.test_one_input(bytes([0, 0]) + b'url,caption\n"http://a.org/x,never closed\n') is None

    def broken(cfg, shard_size):
        raise IndexError("row")

    monkeypatch.setattr(h, "read", broken)
    with pytest.raises(IndexError):
        h.test_one_input(bytes([0, 0]) + b"url\nhttp://a.org/1\n")


# --- hostile inputs, through the harnesses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        bytes([4, 6]) + b"\xff\xd8\xff" + b"\x00" * 64,  # a JPEG magic, then nothing
        bytes([4, 6]) + b"GIF89a\xff\xff\xff\xff" + b"\x00" * 16,  # 65535 x 65535 in 26 bytes
        bytes([4, 6]) + b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        bytes([4, 6]) + b"II*\x00" + b"\xff" * 40,
        bytes([4, 6]) + b"BM" + b"\x00" * 60,
    ],
)
def test_hostile_images(harness, data):
    harness["image"].test_one_input(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x1f\x8b\x08\x04\x00",  # a gzip header cut in its extra field
        _tar([("a.json", b"[1, 2]")]),  # a json member that is no object
        _tar([("a.json", b"{bad json")]),
        _tar([("a.json", b"\xff\xfe")]),
        _tar([("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)]),
        _tar([("a.jpg", b"x"), ("a.jpg", b"y")]),  # a duplicate member
        _tar([("a.png", _png((1, 1))), ("a.json", b'{"uid": ["x"], "caption": "c"}')]),
    ],
)
def test_hostile_shards(harness, data):
    harness["tar"].test_one_input(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([0]) + "\x00\u0301".encode(),
        bytes([1]) + "\ud800\udfff\udc00".encode("utf-16-le", "surrogatepass"),
        bytes([2]) + bytes(range(256)),
        bytes([0]) + "\u1100\x00\u1161".encode(),  # Hangul jamo with a NUL between them
    ],
)
def test_hostile_captions(harness, data):
    harness["caption"].test_one_input(data)


@pytest.mark.parametrize(
    "data",
    [
        bytes([0, 0]),
        bytes([0, 0]) + b"url,url\nhttp://a.org/1,http://a.org/2\n",
        bytes([2, 0]) + b'{"url": {"a": 1}, "caption": "x"}\n',
        bytes([2, 0]) + b'{"url": "http://a.org/1", "caption": [1, 2]}\n',
        bytes([3, 0]) + b"PAR1" + b"\x00" * 32 + b"PAR1",
        bytes([4, 0]) + gzip.compress(b"url,caption\nhttp://a.org/1,x\n", mtime=0)[:-12],  # a truncated gzip
        bytes([5, 0]) + b"\x1f\x8b\x08\x00" + b"\x00" * 20,
    ],
)
def test_hostile_inputs(harness, data):
    harness["input"].test_one_input(data)


# --- the findings' fixes, directly -------------------------------------------------------------------------


def test_finding_1_control_between_letter_and_mark_is_nfc_and_stable():
    out, cut = clean_caption("e\x00\u0301 a\u0306\x00\u0300", None)
    assert (out, cut) == ("\u00e9 \u1eb1", False)
    assert clean_caption(out, None) == (out, False)


@pytest.mark.parametrize(
    ("size", "mode", "encode"),
    [((1, 20000), "keep_ratio", "webp"), ((20000, 2), "no", "webp"), ((1, 3000), "keep_ratio", "png")],
)
def test_finding_2_an_image_the_encoder_cannot_store_is_refused_unread(size, mode, encode):
    opt = ImageOptions(image_size=64, resize_mode=mode, encode_format=encode, max_pixels=4_000_000)
    p = process(_png(size), opt)
    assert p.status == "too_many_pixels" and p.image is None
    assert "would be stored as" in p.error


def test_finding_3_a_corrupt_image_in_a_shard_is_a_train_data_error():
    shard = FUZZ / "corpus" / "tar" / "finding-broken-png"  # Pillow raised SyntaxError("broken PNG file")
    [s] = [s for s in iter_samples(str(shard)) if s.ext == "png"]
    with pytest.raises(TrainDataError, match=r"abc\.png: not a decodable image: SyntaxError: broken PNG"):
        to_pixels(s.image, 8, "center", False, None, name="abc.png")
    with pytest.raises(TrainDataError, match=r"abc\.png: not a decodable image: UnidentifiedImageError"):
        to_pixels(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 8, "center", False, None, name="abc.png")


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([("a.json", b"[1]")], r"a\.json is a JSON list, not an object"),
        ([("a.json", b"{")], r"a\.json is not valid JSON"),
        ([("a.jpg", b"x"), ("a.jpg", b"y")], "not a readable shard: ValueError"),
    ],
)
def test_finding_4_a_corrupt_shard_is_a_train_data_error(tmp_path, members, match):
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar(members))
    with pytest.raises(TrainDataError, match=match):
        list(iter_samples(str(shard)))
    shard.write_bytes(b"\x1f\x8b\x08\x04\x00")  # CPython gh-107398: a TypeError from tarfile
    with pytest.raises(TrainDataError, match="not a readable shard: TypeError"):
        list(iter_samples(str(shard)))


@pytest.mark.parametrize("cut", [b"", b"\x00" * 8])
def test_finding_5_a_corrupt_or_truncated_gzip_input_is_an_input_error(tmp_path, cut):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    data = gzip.compress(b"url,caption\n" + b"http://a.org/1,x\n" * 200, mtime=0)
    bad = data[: len(data) // 2] + cut  # truncated (EOFError), or corrupt in the middle (zlib.error)
    path = tmp_path / "in.csv.gz"
    path.write_bytes(bad)
    with pytest.raises(InputError, match=r"in\.csv\.gz: not readable as csv"):
        InputReader(InputConfig(path=str(path))).plan(10)


def test_a_valid_shard_still_reads(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar([("a.png", _png((3, 2), "RGB")), ("a.json", json.dumps({"uid": "u1"}).encode())]))
    [s] = list(iter_samples(str(shard)))
    assert (s.uid, s.ext, s.meta) == ("u1", "png", {"uid": "u1"})


def test_finding_8_a_json_caption_that_is_no_string_is_missing(tmp_path):
    from curate.train.data import caption_of

    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar([("a.json", b'{"caption": 5, "caption_vlm": [1], "caption_fused": "f"}')]))
    [s] = list(iter_samples(str(shard)))
    assert [caption_of(s, c) for c in ("alt", "vlm", "fused")] == ["", "", "f"]
    s.txt = "t"
    assert [caption_of(s, c) for c in ("alt", "vlm", "fused")] == ["t", "t", "f"]


def test_finding_9_a_parquet_column_name_that_is_not_utf8_is_an_input_error(tmp_path):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    path = tmp_path / "in.parquet"  # pyarrow raised UnicodeDecodeError from ParquetFile()
    path.write_bytes((FUZZ / "corpus" / "input" / "finding-parquet-name-not-utf8").read_bytes()[2:])
    with pytest.raises(InputError, match=r"in\.parquet: not a readable parquet file"):
        InputReader(InputConfig(path=str(path))).plan(10)


@pytest.mark.parametrize("data", [b"null\n", b'\xef\xbb\xbf\n  null, "caption": "x"}\n{"url": "u"}\n'])
def test_finding_10_a_jsonl_that_starts_with_null_is_an_input_error_not_a_segfault(tmp_path, data):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    path = tmp_path / "in.jsonl"  # pyarrow.json.read_json dies of SIGSEGV on it (apache/arrow#47409)
    path.write_bytes(data)
    with pytest.raises(InputError, match="the first line is null"):
        InputReader(InputConfig(path=str(path))).plan(10)
    path.write_bytes(b'{"url": "http://a.org/1", "caption": "x"}\nnull\n')  # a null later is a row, as before
    reader = InputReader(InputConfig(path=str(path)))
    assert reader.load(reader.plan(10)[0])["url"].to_pylist() == ["http://a.org/1", None]


def test_finding_11_parquet_row_groups_that_disagree_with_the_footer_are_an_input_error(tmp_path):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    path = tmp_path / "in.parquet"  # the footer said 5 rows, the row groups 3: two rows were silently lost
    path.write_bytes((FUZZ / "corpus" / "input" / "finding-parquet-row-groups-short").read_bytes()[2:])
    with pytest.raises(InputError, match="its footer says 5 rows, its row groups 3"):
        InputReader(InputConfig(path=str(path))).plan(10)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("url,caption,url\nhttp://a.org/1,x,http://a.org/2\n", "repeat.*: url"),  # was KeyError
        ("url,caption,uid,input_uid\nhttp://a.org/1,x,1,2\n", "repeat.*: input_uid"),  # was a lost column
    ],
)
def test_finding_6_repeated_or_colliding_column_names_are_an_input_error(tmp_path, text, match):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    path = tmp_path / "in.csv"
    path.write_text(text)
    reader = InputReader(InputConfig(path=str(path)))
    with pytest.raises(InputError, match=match):
        reader.load(reader.plan(10)[0])


@pytest.mark.parametrize(
    "line", ['{"url": {"a": 1}, "caption": "x"}', '{"url": "http://a.org/1", "caption": [1]}']
)
def test_finding_7_a_url_or_caption_that_is_no_text_is_an_input_error(tmp_path, line):
    from curate.core.config import InputConfig
    from curate.core.reader import InputReader

    path = tmp_path / "in.jsonl"  # was pyarrow's ArrowNotImplementedError (cast struct/list to utf8)
    path.write_text(line + "\n")
    reader = InputReader(InputConfig(path=str(path)))
    with pytest.raises(
        InputError, match=r"in\.jsonl: column '(url|caption)' \(input\.(url|caption)_col\) holds"
    ):
        reader.load(reader.plan(10)[0])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's warnings about the odd TIFF tags
@pytest.mark.parametrize("name", ["finding-tiff-strip-offset-float", "finding-tiff-strip-offset-bytes"])
def test_finding_12_a_tiff_strip_offset_of_the_wrong_type_is_a_decode_error(harness, tmp_path, name):
    tiff = (FUZZ / "corpus" / "image" / name).read_bytes()[2:]  # Pillow 13 raised TypeError from load()
    p = process(tiff, ImageOptions(formats=("tiff",), encode_format="png"))
    assert p.status == "decode_error" and "corrupt image data" in p.error
    with pytest.raises(TrainDataError, match=r"x\.png: not a decodable image: TypeError"):
        to_pixels(tiff, 8, "center", False, None, name="x.png")
    assert harness["tar"].test_one_input(_tar([("x.png", tiff), ("x.json", b"{}")])) is None
