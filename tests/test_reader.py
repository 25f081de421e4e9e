import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.base import InputError
from curate.core.config import InputConfig
from curate.core.reader import InputReader


def read_all(cfg: InputConfig, shard_size: int = 1000) -> tuple[list, pa.Table]:
    reader = InputReader(cfg)
    specs = reader.plan(shard_size)
    return specs, pa.concat_tables([reader.load(s) for s in specs], promote_options="permissive")


ROWS = [
    ("http://a.org/1.jpg", "one", 1),
    ("http://a.org/2.jpg", "two", 2),
    ("https://b.org/3.png", "three, with a comma", 3),
]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "csv.gz"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(
            pa.table({"u": [r[0] for r in ROWS], "c": [r[1] for r in ROWS], "n": [r[2] for r in ROWS]}), path
        )
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"u": u, "c": c, "n": n}) + "\n" for u, c, n in ROWS))
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = f"u{sep}c{sep}n\n" + "".join(
            f"{u}{sep}{json.dumps(c) if sep == ',' else c}{sep}{n}\n" for u, c, n in ROWS
        )
        path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    specs, t = read_all(InputConfig(path=str(path), url_col="u", caption_col="c"))
    assert [s.id for s in specs] == ["00000"]
    assert t["url"].to_pylist() == [r[0] for r in ROWS]
    assert t["caption"].to_pylist() == [r[1] for r in ROWS]
    assert t["n"].to_pylist() == [1, 2, 3]  # other input columns are carried along
    assert t["status"].to_pylist() == ["ok"] * 3
    assert t.column_names[:7] == ["uid", "input_index", "url", "caption", "status", "error", "drop_reason"]


def test_txt_is_one_url_a_line_without_captions(tmp_path):
    (tmp_path / "urls.txt").write_text("http://a.org/1.jpg\n\n  http://a.org/2.jpg  \n")
    _, t = read_all(InputConfig(path=str(tmp_path / "urls.txt"), caption_col=None))
    assert t["url"].to_pylist() == ["http://a.org/1.jpg", "http://a.org/2.jpg"]
    assert t["caption"].to_pylist() == [None, None]


def test_shards_cut_across_files_in_sorted_order(tmp_path):
    for name, start in (("b.parquet", 70), ("a.parquet", 0), ("c.parquet", 140)):
        pq.write_table(
            pa.table({"url": [f"http://x.org/{i}" for i in range(start, start + 70)], "caption": ["c"] * 70}),
            tmp_path / name,
            row_group_size=16,
        )
    (tmp_path / "_SUCCESS").write_text("")  # markers and hidden files are not input
    specs, t = read_all(InputConfig(path=str(tmp_path)), shard_size=50)
    assert [s.id for s in specs] == ["00000", "00001", "00002", "00003", "00004"]
    assert [s.rows for s in specs] == [50, 50, 50, 50, 10]
    assert len(specs[1].segments) == 2  # rows 50..99 span a.parquet and b.parquet
    assert t["input_index"].to_pylist() == list(range(210))
    assert t["url"].to_pylist() == [f"http://x.org/{i}" for i in range(210)]
    # the same plan every time
    assert InputReader(InputConfig(path=str(tmp_path))).plan(50) == specs
    # a glob selects the same files
    assert read_all(InputConfig(path=str(tmp_path / "*.parquet")), 50)[0] == specs


def test_bad_rows_are_kept_with_a_reason(tmp_path):
    urls = [
        None,
        "",
        "ftp://a.org/x",
        "not a url",
        "http://[::1/",
        "http://a.org/ok",
        "http://a.org/ok",
        "http://a.org/ok",
    ]
    caps = ["a", "b", "c", "d", "e", "f", "f", "g"]
    pq.write_table(pa.table({"url": urls, "caption": caps}), tmp_path / "in.parquet")
    _, t = read_all(InputConfig(path=str(tmp_path / "in.parquet")))
    assert t.num_rows == 8
    assert t["status"].to_pylist() == ["invalid_url"] * 5 + ["ok", "duplicate_row", "ok"]
    errors = t["error"].to_pylist()
    assert errors[0] == "url is null" and errors[1] == "url is empty"
    assert "unsupported scheme 'ftp'" in errors[2] and "unsupported scheme ''" in errors[3]
    assert "cannot parse url" in errors[4]
    assert errors[6] == "same url and caption as input row 5"
    assert len(set(t["uid"].to_pylist())) == 7


def test_input_columns_named_like_curate_columns_are_renamed(tmp_path):
    pq.write_table(
        pa.table({"url": ["http://a.org/1"], "caption": ["x"], "status": ["from input"]}),
        tmp_path / "i.parquet",
    )
    _, t = read_all(InputConfig(path=str(tmp_path / "i.parquet")))
    assert t["status"].to_pylist() == ["ok"] and t["input_status"].to_pylist() == ["from input"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.parquet", b"PAR1 this is not parquet", "bad.parquet: not a readable parquet file"),
        ("bad.csv", b'url,caption\n"http://a.org/1,"unclosed\nx,y,z\n', "bad.csv: not readable as csv"),
        ("bad.jsonl", b'{"url": "http://a.org/1"}\n{not json}\n', "bad.jsonl: not readable as jsonl"),
        ("data.xlsx", b"whatever", "cannot tell the format"),
    ],
)
def test_malformed_input_names_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match):
        InputReader(InputConfig(path=str(tmp_path / name))).plan(10)


def test_missing_columns_and_paths(tmp_path):
    pq.write_table(pa.table({"link": ["http://a.org/1"], "caption": ["x"]}), tmp_path / "i.parquet")
    with pytest.raises(
        InputError, match=re.escape("no column 'url' (input.url_col); columns: link, caption")
    ):
        read_all(InputConfig(path=str(tmp_path / "i.parquet")))
    with pytest.raises(InputError, match="does not exist"):
        InputReader(InputConfig(path=str(tmp_path / "nope.parquet"))).plan(10)
    with pytest.raises(InputError, match="no input files match"):
        InputReader(InputConfig(path=str(tmp_path / "*.csv"))).plan(10)


def test_malformed_input_through_the_cli_exits_2(tmp_path, cli):
    from conftest import write_pipeline

    (tmp_path / "bad.csv").write_bytes(b'URL,TEXT\n"http://a.org/1,"oops\nx,y,z\n')
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "bad.csv", tmp_path / "out", [])
    r = cli("run", p)
    assert r.code == 2 and "bad.csv: not readable as csv" in r.err, r
