"""Captions are cleaned as they are read (curate.core.reader.clean_caption), and odd input never crashes."""

import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.base import InputError
from curate.core.config import InputConfig
from curate.core.reader import InputReader, clean_caption, repair_caption
from curate.core.schema import uid_for


def read_all(cfg: InputConfig) -> pa.Table:
    reader = InputReader(cfg)
    return pa.concat_tables([reader.load(s) for s in reader.plan(1000)])


def test_nfd_becomes_nfc():
    nfd = unicodedata.normalize("NFD", "café Ångström")
    assert nfd != "café Ångström"
    assert clean_caption(nfd, 2000) == ("café Ångström", False)


def test_nul_and_control_characters_are_removed_whitespace_kept():
    raw = "a\x00b\x07c\x1b[31md\x7fe\x85f\tg\nh\r\ni  j\u200dk"
    # NUL, BEL, ESC, DEL, NEL (C1) go; tab, newline, CR, runs of spaces and ZWJ (not a control) stay.
    assert clean_caption(raw, 2000) == ("abc[31mdef\tg\nh\r\ni  j\u200dk", False)


def test_lone_surrogate_becomes_replacement_character():
    assert clean_caption("x\ud800y", None) == ("x\ufffdy", False)


def test_empty_and_null_captions_stay_as_they_are():
    assert clean_caption(None, 10) == (None, False)
    assert clean_caption("", 10) == ("", False)
    assert clean_caption("\x00\x01", 10) == ("", False)


def test_ten_megabyte_caption_is_capped_and_flagged(tmp_path):
    big = "ab" * (5 << 20)  # 10 MiB of ASCII
    pq.write_table(
        pa.table({"url": ["http://a.org/1", "http://a.org/2"], "caption": [big, "short"]}),
        tmp_path / "i.parquet",
    )
    t = read_all(InputConfig(path=str(tmp_path / "i.parquet")))
    assert t["caption"].to_pylist() == ["ab" * 1000, "short"]
    assert t["caption_truncated"].to_pylist() == [True, False]
    # The uid hashes the caption as read: the cut does not make two long captions share one.
    assert t["uid"][0].as_py() == uid_for("http://a.org/1", big)

    t = read_all(InputConfig(path=str(tmp_path / "i.parquet"), max_caption_chars=3))
    assert t["caption"].to_pylist() == ["aba", "sho"]
    t = read_all(InputConfig(path=str(tmp_path / "i.parquet"), max_caption_chars=None))
    assert len(t["caption"][0].as_py()) == 10 << 20 and t["caption_truncated"].to_pylist() == [False, False]


def test_uid_uses_the_caption_as_read(tmp_path):
    (tmp_path / "i.jsonl").write_text(json.dumps({"url": "http://a.org/1", "caption": "a\u0000b"}) + "\n")
    t = read_all(InputConfig(path=str(tmp_path / "i.jsonl")))
    assert t["caption"].to_pylist() == ["ab"]
    assert t["uid"].to_pylist() == [uid_for("http://a.org/1", "a\x00b")]


def test_default_cap_keeps_the_fingerprint_of_older_configs(tmp_path):
    from curate.core.config import PipelineConfig

    base = {"name": "n", "input": {"path": "x"}, "output": {"path": "o"}, "stages": []}
    default = PipelineConfig.model_validate(base)
    assert "max_caption_chars" not in default.output_relevant()["input"]
    other = PipelineConfig.model_validate(base | {"input": {"path": "x", "max_caption_chars": 10}})
    assert other.fingerprint() != default.fingerprint()


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "txt"])
def test_invalid_utf8_is_replaced_not_an_error(tmp_path, fmt):
    sep = "\t" if fmt == "tsv" else ","
    if fmt == "jsonl":
        data = b'{"url": "http://a.org/1", "caption": "caf\xe9 \xff"}\n{"url": "http://a.org/2", "caption": "ok"}\n'
    elif fmt == "txt":
        data = b"http://a.org/\xff1\nhttp://a.org/2\n"
    else:
        data = (
            f"url{sep}caption\nhttp://a.org/1{sep}".encode()
            + b"caf\xe9 \xff\nhttp://a.org/2"
            + f"{sep}ok\n".encode()
        )
    (tmp_path / f"i.{fmt}").write_bytes(data)
    t = read_all(
        InputConfig(path=str(tmp_path / f"i.{fmt}"), caption_col=None if fmt == "txt" else "caption")
    )
    if fmt == "txt":
        assert t["url"].to_pylist() == ["http://a.org/\ufffd1", "http://a.org/2"]
    else:
        assert t["caption"].to_pylist() == ["caf\ufffd \ufffd", "ok"]
        assert t["status"].to_pylist() == ["ok", "ok"]


def test_invalid_utf8_in_parquet_binary_and_string_columns(tmp_path):
    bad = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(b"\x00\x00\x00\x00\x04\x00\x00\x00"), pa.py_buffer(b"caf\xe9")]
    )
    pq.write_table(pa.table({"url": ["http://a.org/1"], "caption": bad}), tmp_path / "s.parquet")
    pq.write_table(
        pa.table({"url": ["http://a.org/1"], "caption": pa.array([b"caf\xe9"], pa.binary())}),
        tmp_path / "b.parquet",
    )
    for name in ("s.parquet", "b.parquet"):
        t = read_all(InputConfig(path=str(tmp_path / name)))
        assert t["caption"].to_pylist() == ["caf\ufffd"], name


def test_csv_with_a_quote_that_never_closes_names_the_line(tmp_path):
    # Arrow alone would read this as ONE row whose caption swallows the two lines after it.
    (tmp_path / "q.csv").write_bytes(
        b'url,caption\nhttp://a.org/1,"unclosed\nhttp://a.org/2,ok\nhttp://a.org/3,x\n'
    )
    with pytest.raises(
        InputError, match=r"q\.csv: not readable as csv: line 2: a quoted value is never closed"
    ):
        InputReader(InputConfig(path=str(tmp_path / "q.csv"))).plan(10)


def test_csv_with_too_many_fields_names_the_line(tmp_path):
    (tmp_path / "f.csv").write_bytes(b"url,caption\nhttp://a.org/1,fine\nhttp://a.org/2,a,b\n")
    with pytest.raises(InputError, match=r"f\.csv: not readable as csv: line 3: .*Expected 2 columns, got 3"):
        InputReader(InputConfig(path=str(tmp_path / "f.csv"))).plan(10)


def test_csv_quoting_that_is_well_formed_keeps_every_row(tmp_path):
    (tmp_path / "ok.csv").write_bytes(
        b'url,caption\nhttp://a.org/1,"two\nlines"\nhttp://a.org/2,"a ""quote"""\nhttp://a.org/3,5" screen\n'
        b'http://a.org/4,""\n'
    )
    t = read_all(InputConfig(path=str(tmp_path / "ok.csv")))
    assert t["caption"].to_pylist() == ["two\nlines", 'a "quote"', '5" screen', ""]


# Mojibake, curly quotes and full-width letters are what these cases are about (RUF001: ambiguous characters).
@pytest.mark.parametrize(
    "raw, repaired",
    [
        ("CafÃ© au lait", "Café au lait"),  # UTF-8 read as Windows-1252
        ("â€œquotedâ€\x9d and â€˜singleâ€™", "“quoted” and ‘single’"),  # noqa: RUF001 - curly quotes stay curly
        ("ÐŸÑ€Ð¸Ð²ÐµÑ‚ Ð¼Ð¸Ñ€", "Привет мир"),  # noqa: RUF001
        (
            "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
            "The Mona Lisa doesn’t have eyebrows.",  # noqa: RUF001
        ),  # twice
        ("Tom &amp; Jerry &#8211; l&#39;&eacute;t&eacute; &lt;3", "Tom & Jerry – l'été <3"),  # noqa: RUF001
        ("CafÃ© &amp; cr&egrave;me", "Café & crème"),
    ],
)
def test_mojibake_and_html_entities_are_repaired(raw, repaired):
    assert repair_caption(raw, 2000) == (repaired, True)


@pytest.mark.parametrize(
    "text",
    [
        "a plain caption",
        "AT&T and R&D",  # an ampersand that starts no entity
        "naïve café “curly” ﬁne ＡＢ — 🌅",  # noqa: RUF001 - as the author wrote them
        "<b>bold &amp; markup</b>",  # a '<': may be markup, entities stay
        "line one\nline two\r\n",
    ],
)
def test_clean_text_is_left_as_it_is(text):
    assert repair_caption(text, 2000) == (text, False)


def test_lone_c1_controls_are_not_taken_for_mojibake():
    # A C1 control after ASCII cannot be a UTF-8 continuation byte: it is removed, as clean_caption removes it,
    # not read as Windows-1252 (\x85 would become "…"); inside mojibake it is part of what is repaired.
    assert repair_caption("and\x85 C1", 2000) == ("and C1", False)
    assert repair_caption("â€\x9d", 2000) == ("”", True)


def test_a_long_caption_is_repaired_only_where_it_is_kept():
    # 4 x 20 characters are repaired (60 of "CafÃ© " and 10 "Ã©"), the rest is appended as it was.
    text, changed = repair_caption("CafÃ© " * 10 + "Ã©" * 100, 20)
    assert changed and text == "Café " * 10 + "é" * 10 + "Ã©" * 90
    assert clean_caption(text, 20) == ("Café Café Café Café ", True)


def test_the_reader_repairs_records_and_keeps_uids(tmp_path):
    rows = [
        {"url": "http://a.org/1", "caption": "CafÃ© &amp; cr&egrave;me"},
        {"url": "http://a.org/2", "caption": "a clean caption & more"},
        {"url": "http://a.org/3", "caption": "caf\u00e9 \u201cquoted\u201d"},
        {"url": "http://a.org/4", "caption": None},
    ]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = read_all(InputConfig(path=str(tmp_path / "i.jsonl")))
    assert t["caption"].to_pylist() == ["Café & crème", "a clean caption & more", "café “quoted”", None]
    assert t["caption_repaired"].to_pylist() == [True, False, False, False]
    # uids hash the caption as read: a repair changes none, and clean text is hashed as it always was.
    assert t["uid"].to_pylist() == [uid_for(r["url"], r["caption"]) for r in rows]
    assert t["uid"][1].as_py() == uid_for("http://a.org/2", t["caption"][1].as_py())
