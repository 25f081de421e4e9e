"""The threshold step: drops rows by rules on score columns, and records the first rule each dropped row failed.

    - stage: filter
      rules: ["clip_score >= 0.28", "nsfw_score < 0.5"]
      missing: drop          # a kept row without a value is dropped as missing:<column>; keep lets it pass

Scores are computed by score stages; this stage only compares, so changing a threshold never recomputes a
score (and ``curate preview`` shows what a new threshold would do from the sidecars alone).
"""

from __future__ import annotations

from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, Field

from curate.base import StrictModel
from curate.core.schema import COLUMNS
from curate.core.stage import Stage, StageResources, drop
from curate.kit.rules import Rule, first_failure, parse_rule


def _valid_rule(text: str) -> str:
    rule = parse_rule(text)
    declared = COLUMNS.get(rule.column)
    if declared is not None:
        rule.check_type(declared.type)  # a declared column's type is known now: fail before any work
    return text


class ThresholdFilterConfig(StrictModel):
    rules: list[Annotated[str, AfterValidator(_valid_rule)]] = Field(
        min_length=1,
        description="'<column> <op> <value>' a row needs to be kept; the first it fails is its reason",
    )
    missing: Literal["drop", "keep"] = Field(
        "drop", description="a kept row whose column is null or NaN: drop it as missing:<column>, or keep it"
    )


class ThresholdFilter(Stage):
    """Drops still-kept rows that fail one of ``rules``, in order; records ``<negated rule>`` or
    ``missing:<column>`` as ``drop_reason``. Rows stay in the table; rows already dropped or not ok are left
    alone."""

    name = "filter"
    Config = ThresholdFilterConfig
    writes = ("drop_reason",)
    resources = StageResources(cpus=1)

    config: ThresholdFilterConfig

    @property
    def rules(self) -> list[Rule]:
        return [parse_rule(t) for t in self.config.rules]

    @property
    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.column for r in self.rules))

    def __call__(self, table: pa.Table) -> pa.Table:
        reasons = first_failure(table, self.rules, self.config.missing)
        return drop(table, pc.is_valid(reasons), reasons)
