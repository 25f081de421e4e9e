"""output.train_caption: what <uid>.txt holds in each mode, read back with webdataset; every caption stays in
<uid>.json and the sidecar; the config's fingerprint and checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import write_pipeline
from support.data import make_input

from curate.base import ConfigError
from curate.core.config import parse_config
from curate.core.pipeline import Pipeline
from curate.core.writer import ShardWriter
from curate.kit.captions import TrainCaption, mix_choice

UIDS = [f"{i:02d}" + "a" * 30 for i in range(6)]


def _table() -> pa.Table:
    """Rows 0-3 kept with different captions missing; 4 dropped; 5 failed."""
    return pa.table(
        {
            "uid": UIDS,
            "caption": ["alt0", "alt1", "alt2", "", "alt4", "alt5"],
            "status": ["ok"] * 5 + ["http_404"],
            "drop_reason": [None] * 4 + ["clip_score<0.3", None],
            "caption_vlm": ["vlm0", "vlm1", None, "vlm3", "vlm4", None],
            "caption_fused": ["fused0", None, None, "fused3", "fused4", None],
            "fusion_status": ["fused", "fallback_empty", None, "no_alt_text", "fused", None],
        }
    )


def _read(folder) -> dict[str, tuple[str, dict]]:
    samples = wds.WebDataset(str(folder / "shards/00000.tar"), shardshuffle=False, empty_check=False)
    return {s["__key__"]: (s["txt"].decode(), json.loads(s["json"])) for s in samples}


@pytest.mark.parametrize(
    ("choice", "want"),
    [
        (TrainCaption("fused"), ["fused0", "vlm1", "alt2", "fused3"]),
        (TrainCaption("vlm"), ["vlm0", "vlm1", "alt2", "vlm3"]),
        (TrainCaption("alt"), ["alt0", "alt1", "alt2", "fused3"]),
        (TrainCaption("column", "caption"), ["alt0", "alt1", "alt2", ""]),
        (TrainCaption("column", "fusion_status"), ["fused", "fallback_empty", "", "no_alt_text"]),
    ],
    ids=["fused", "vlm", "alt", "column-caption", "column-other"],
)
def test_txt_per_mode_and_every_caption_in_the_json(tmp_path, choice, want):
    ShardWriter(str(tmp_path), train_caption=choice).write("00000", _table(), {})
    got = _read(tmp_path)
    assert list(got) == UIDS[:4]  # kept rows only
    assert [got[u][0] for u in UIDS[:4]] == want
    meta = got[UIDS[0]][1]
    assert (meta["caption"], meta["caption_vlm"], meta["caption_fused"]) == ("alt0", "vlm0", "fused0")
    side = pq.read_table(tmp_path / "shards/00000.parquet")
    assert side["caption_fused"].to_pylist() == _table()["caption_fused"].to_pylist()


def test_mix_txt_is_the_drawn_caption_per_uid(tmp_path):
    shares = (("fused", 0.4), ("vlm", 0.3), ("alt", 0.3))
    n = 60
    uids = [f"{i:032x}" for i in range(n)]
    table = pa.table(
        {
            "uid": uids,
            "caption": [f"alt{i}" for i in range(n)],
            "status": ["ok"] * n,
            "drop_reason": pa.nulls(n, pa.string()),
            "caption_vlm": [f"vlm{i}" for i in range(n)],
            "caption_fused": [f"fused{i}" for i in range(n)],
        }
    )
    ShardWriter(str(tmp_path), train_caption=TrainCaption("mix", shares=shares, seed=3)).write(
        "00000", table, {}
    )
    got = _read(tmp_path)
    picks = {u: mix_choice(u, dict(shares), 3) for u in uids}
    assert {u: t for u, (t, _) in got.items()} == {u: f"{picks[u]}{i}" for i, u in enumerate(uids)}
    assert set(picks.values()) == {"fused", "vlm", "alt"}


def test_the_old_text_column_writer_is_unchanged(tmp_path):
    ShardWriter(str(tmp_path), text_column="caption_vlm").write("00000", _table(), {})
    assert [t for t, _ in _read(tmp_path).values()] == ["vlm0", "vlm1", "", "vlm3"]


# --- config ------------------------------------------------------------------------------------------


def _config(**output):
    return parse_config({"name": "t", "input": {"path": "x.parquet"}, "output": {"path": "o", **output}})


def test_alt_keeps_the_fingerprint_of_text_column_caption():
    """Outputs written before train_caption existed resume under the default."""
    base = _config()
    assert base.output.train_caption == "alt" and base.output.caption_source() == ("alt", None)
    assert base.output_relevant()["output"] == {"text_column": "caption"}
    assert _config(text_column="caption").fingerprint() == base.fingerprint()
    assert _config(train_caption="alt").fingerprint() == base.fingerprint()
    assert _config(text_column="caption_fused").fingerprint() == _config(train_caption="fused").fingerprint()
    fused, vlm = _config(train_caption="fused"), _config(train_caption="vlm")
    assert len({base.fingerprint(), fused.fingerprint(), vlm.fingerprint()}) == 3
    mix = _config(train_caption="mix")
    assert mix.output_relevant()["output"] == {
        "train_caption": "mix",
        "caption_mix": {"fused": 0.7, "vlm": 0.2, "alt": 0.1, "seed": 0},
    }
    assert _config(train_caption="mix", caption_mix={"seed": 1}).fingerprint() != mix.fingerprint()
    # The shares count only for mix.
    assert _config(train_caption="fused", caption_mix={"seed": 1}).fingerprint() == fused.fingerprint()
    assert _config(text_column="caption_en").output.caption_source() == ("column", "caption_en")


def test_bad_caption_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"output: .*give train_caption or text_column, not both"):
        _config(train_caption="fused", text_column="caption")
    assert _config(train_caption="fused", text_column="caption_fused").output.caption_source() == (
        "fused",
        None,
    )
    with pytest.raises(ConfigError, match=r"output.train_caption: .*'alt', 'vlm', 'fused' or 'mix'"):
        _config(train_caption="best")
    with pytest.raises(ConfigError, match=r"output.caption_mix: .*at least one share"):
        _config(train_caption="mix", caption_mix={"fused": 0, "vlm": 0, "alt": 0})
    with pytest.raises(ConfigError, match=r"output.caption_mix.fused: .*greater than or equal to 0"):
        _config(caption_mix={"fused": -1})


def test_pipeline_check_needs_the_columns_of_the_choice(tmp_path):
    input_path = make_input(tmp_path / "in.parquet", 3)
    mix = {"train_caption": "mix", "caption_mix": {"fused": 0, "vlm": 1, "alt": 1}}
    cfg = parse_config(
        {
            "name": "t",
            "input": {"path": str(input_path), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": str(tmp_path / "o"), **mix},
        }
    )
    with pytest.raises(
        ConfigError, match=r"output.train_caption: column 'caption_vlm' .*add the 'recaption' stage"
    ):
        Pipeline(cfg).check()
    cfg.output.caption_mix.vlm = 0
    Pipeline(cfg).check()  # alt alone: the input's caption is enough
    cfg.output = cfg.output.model_validate({"path": str(tmp_path / "o"), "text_column": "no_such_column"})
    with pytest.raises(
        ConfigError, match=r"output.text_column: column 'no_such_column' is written by no stage"
    ):
        Pipeline(cfg).check()


def test_describe_says_what_the_txt_holds(tmp_path, cli):
    pipe = write_pipeline(
        tmp_path / "p.yaml",
        make_input(tmp_path / "in.parquet", 3),
        tmp_path / "out",
        [],
        output={"train_caption": "alt"},
    )
    r = cli("describe", pipe)
    assert r.code == 0 and "training text: train_caption: alt" in r.out, r
