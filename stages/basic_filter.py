"""Cheap filters that need no model: caption length and word count, required fields, image size and shape."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.base import StrictModel
from curate.core.stage import Stage, StageResources, drop


class BasicFilterConfig(StrictModel):
    min_caption_length: int = Field(1, ge=0, description="characters, after trimming white space")
    max_caption_length: int | None = Field(None, gt=0)
    min_words: int | None = Field(None, ge=0)
    required_columns: list[str] = Field(
        default_factory=list, description="rows with a null value are dropped"
    )
    min_width: int | None = Field(None, gt=0, description="on the `width` column; rows without one pass")
    min_height: int | None = Field(None, gt=0, description="on the `height` column; rows without one pass")
    max_aspect_ratio: float | None = Field(None, ge=1, description="max(w,h)/min(w,h)")

    @model_validator(mode="after")
    def _bounds(self) -> BasicFilterConfig:
        if self.max_caption_length is not None and self.max_caption_length < self.min_caption_length:
            raise ValueError("max_caption_length must be >= min_caption_length")
        return self


class BasicFilter(Stage):
    """Drops rows whose caption is too short or long, whose required fields are null, or whose image is
    too small or too elongated. Each check records its own reason: ``missing:<col>``,
    ``caption_length<N``, ``caption_length>N``, ``words<N``, ``width<N``, ``height<N``, ``aspect_ratio>R``.
    """

    name = "basic_filter"
    Config = BasicFilterConfig
    writes = ("drop_reason",)
    resources = StageResources(cpus=1)

    config: BasicFilterConfig

    @property
    def reads(self) -> tuple[str, ...]:
        cols = ["caption", *self.config.required_columns]
        if self.config.min_width is not None or self.config.max_aspect_ratio is not None:
            cols.append("width")
        if self.config.min_height is not None or self.config.max_aspect_ratio is not None:
            cols.append("height")
        return tuple(dict.fromkeys(cols))

    def __call__(self, table: pa.Table) -> pa.Table:
        c = self.config
        for col in c.required_columns:
            table = drop(table, pc.is_null(table[col]), f"missing:{col}")
        text = pc.utf8_trim_whitespace(pc.fill_null(table["caption"], ""))
        length = pc.utf8_length(text)
        if c.min_caption_length > 0:
            table = drop(
                table, pc.less(length, c.min_caption_length), f"caption_length<{c.min_caption_length}"
            )
        if c.max_caption_length is not None:
            table = drop(
                table, pc.greater(length, c.max_caption_length), f"caption_length>{c.max_caption_length}"
            )
        if c.min_words is not None:
            words = pc.list_value_length(pc.utf8_split_whitespace(text))
            # An empty string splits into [""]: count it as no words.
            words = pc.if_else(pc.equal(length, 0), 0, words)
            table = drop(table, pc.less(words, c.min_words), f"words<{c.min_words}")
        if c.min_width is not None:
            table = drop(table, pc.less(table["width"], c.min_width), f"width<{c.min_width}")
        if c.min_height is not None:
            table = drop(table, pc.less(table["height"], c.min_height), f"height<{c.min_height}")
        if c.max_aspect_ratio is not None:
            w = pc.cast(table["width"], pa.float64())
            h = pc.cast(table["height"], pa.float64())
            ratio = pc.divide(pc.max_element_wise(w, h), pc.max_element_wise(pc.min_element_wise(w, h), 1.0))
            table = drop(table, pc.greater(ratio, c.max_aspect_ratio), f"aspect_ratio>{c.max_aspect_ratio:g}")
        return table
