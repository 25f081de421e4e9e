import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.stages.basic_filter import BasicFilter, BasicFilterConfig


def table(captions, widths=None, heights=None, status=None, drop_reason=None):
    n = len(captions)
    cols = {
        "caption": pa.array(captions, pa.string()),
        "status": pa.array(status or ["ok"] * n, pa.string()),
        "drop_reason": pa.array(drop_reason or [None] * n, pa.string()),
    }
    if widths is not None:
        cols["width"] = pa.array(widths, pa.int32())
        cols["height"] = pa.array(heights, pa.int32())
    return pa.table(cols)


def run(t, **cfg):
    return BasicFilter(BasicFilterConfig(**cfg))(t)["drop_reason"].to_pylist()


def test_caption_length_and_words():
    t = table(["a dog", "  ab  ", None, "one", "a very long caption indeed"])
    assert run(t, min_caption_length=3) == [None, "caption_length<3", "caption_length<3", None, None]
    assert run(t, max_caption_length=10) == [None, None, "caption_length<1", None, "caption_length>10"]
    assert run(t, min_words=2) == [None, "words<2", "caption_length<1", "words<2", None]


def test_required_columns():
    t = table(["x", "y"]).append_column("lang", pa.array(["en", None]))
    stage = BasicFilter(BasicFilterConfig(required_columns=["lang"]))
    assert stage.reads == ("caption", "lang")
    assert stage(t)["drop_reason"].to_pylist() == [None, "missing:lang"]


def test_size_and_aspect_ratio_apply_where_there_is_an_image():
    t = table(["x"] * 4, widths=[100, 30, 300, None], heights=[100, 100, 50, None])
    assert run(t, min_width=64) == [None, "width<64", None, None]
    assert run(t, min_height=64) == [None, None, "height<64", None]
    assert run(t, max_aspect_ratio=3) == [None, "aspect_ratio>3", "aspect_ratio>3", None]
    assert BasicFilter(BasicFilterConfig(min_width=1)).reads == ("caption", "width")


def test_first_reason_wins_and_failed_rows_are_left_alone():
    t = table(["", "", "fine"], status=["ok", "http_404", "ok"], drop_reason=["nsfw", None, None])
    assert run(t, min_caption_length=2) == ["nsfw", None, None]


def test_config_checks():
    with pytest.raises(ValidationError, match="max_caption_length must be >= min_caption_length"):
        BasicFilterConfig(min_caption_length=10, max_caption_length=5)
    with pytest.raises(ValidationError):
        BasicFilterConfig(max_aspect_ratio=0.5)
