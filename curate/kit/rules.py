"""Filter rules on columns: ``"<column> <op> <value>"``, parsed once and evaluated vectorised on Arrow tables.

    clip_score >= 0.28        nsfw_score < 0.5        has_text == false        lang == "en"

A rule says what a row needs to be KEPT; a row that fails it is dropped with the rule's ``drop_reason``,
the negated rule written compactly (``clip_score >= 0.28`` -> ``clip_score<0.28``, with the number spelled
as the user wrote it, a string without its quotes). A null (or NaN) value fails no rule: it is *missing*, and the caller decides what a
missing value means (:func:`first_failure` drops it as ``missing:<column>`` or lets it pass).

The threshold stage (``curate.stages.filter``) and ``curate preview`` both go through :func:`first_failure`,
so a preview counts exactly what a rerun with the same rules writes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["OPS", "Rule", "first_failure", "parse_rule"]

# op -> (the comparison that KEEPS a row, its negation as written in drop reasons)
OPS: dict[str, tuple[str, str]] = {
    ">=": ("greater_equal", "<"),
    ">": ("greater", "<="),
    "<=": ("less_equal", ">"),
    "<": ("less", ">="),
    "==": ("equal", "!="),
    "!=": ("not_equal", "=="),
}

Kind = Literal["number", "bool", "string"]

_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*([<>=!]+)\s*(.*?)\s*$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_INT = re.compile(r"^[+-]?\d+$")
_SYNTAX = (
    "a rule is '<column> <op> <value>': column a name of letters, digits and '_'; op one of "
    ">= > <= < == !=; value a number (0.28, 5, 1e-3), true or false, or a quoted string ('en' or \"en\"), "
    "e.g. 'clip_score >= 0.28'"
)


@dataclass(frozen=True)
class Rule:
    """``column op value``: the condition a row needs to be kept."""

    column: str
    op: str
    value: float | int | bool | str
    text: str  # as the user gave it, trimmed
    value_text: str  # the value as spelled in drop reasons: the number as written, strings unquoted

    @property
    def kind(self) -> Kind:
        if isinstance(self.value, bool):
            return "bool"
        return "string" if isinstance(self.value, str) else "number"

    @property
    def drop_reason(self) -> str:
        """The negated rule, compactly: ``clip_score >= 0.28`` -> ``clip_score<0.28``."""
        return f"{self.column}{OPS[self.op][1]}{self.value_text}"

    @property
    def missing_reason(self) -> str:
        return f"missing:{self.column}"

    def check_type(self, type_: pa.DataType) -> None:
        """Raise ValueError when the value cannot be compared with a column of this Arrow type."""
        if self.kind == "number":
            ok = pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)
        elif self.kind == "bool":
            ok = pa.types.is_boolean(type_)
        else:
            ok = pa.types.is_string(type_) or pa.types.is_large_string(type_)
        if not ok and not pa.types.is_null(type_):  # an all-null column compares with anything
            raise ValueError(
                f"rule {self.text!r}: column {self.column!r} holds {type_}, which cannot be compared "
                f"with a {self.kind}"
            )

    def missing(self, table: pa.Table) -> pa.ChunkedArray:
        """Rows whose value is null or NaN."""
        return pc.is_null(table[self.column], nan_is_null=True)

    def failing(self, table: pa.Table) -> pa.ChunkedArray:
        """Rows whose value fails the rule. Missing values (null, NaN) do not fail: see :meth:`missing`."""
        column = table[self.column]
        self.check_type(column.type)
        keep = getattr(pc, OPS[self.op][0])(column, pa.scalar(self.value))
        return pc.and_(pc.invert(pc.fill_null(keep, True)), pc.invert(self.missing(table)))

    def __str__(self) -> str:
        return self.text


def parse_rule(text: str) -> Rule:
    """Parse ``"<column> <op> <value>"``; a ValueError says what is wrong and what is allowed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a rule as a string, got {text!r}; {_SYNTAX}")
    m = _RULE.match(text)
    if m is None:
        raise ValueError(f"cannot parse {text!r}; {_SYNTAX}")
    column, op, raw = m.groups()
    if op not in OPS:
        raise ValueError(f"unknown operator {op!r} in {text!r}; {_SYNTAX}")
    value: float | int | bool | str
    if not raw:
        raise ValueError(f"{text!r} has no value after {op!r}; {_SYNTAX}")
    if _NUMBER.match(raw):
        value = int(raw) if _INT.match(raw) else float(raw)
        spelled = raw
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
        spelled = raw.lower()
        if op not in ("==", "!="):
            raise ValueError(f"{text!r}: true and false compare only with == or !=")
    elif len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        value = spelled = raw[1:-1]
        if raw[0] in value:
            raise ValueError(f"{text!r}: the string holds its own quote character; use the other quote")
    else:
        raise ValueError(f"cannot read the value {raw!r} in {text!r}; {_SYNTAX}")
    return Rule(column=column, op=op, value=value, text=text.strip(), value_text=spelled)


def first_failure(
    table: pa.Table, rules: Sequence[Rule], missing: Literal["drop", "keep"]
) -> pa.ChunkedArray:
    """Per row, the reason of the first rule it fails, in order; null where it passes them all.

    With ``missing="drop"`` a null or NaN value fails its rule as ``missing:<column>``; with ``"keep"`` it
    passes that rule. Looks at every row: callers pick which rows the result applies to.
    """
    reasons: pa.Array | pa.ChunkedArray = pa.nulls(table.num_rows, pa.string())
    for rule in rules:
        open_ = pc.is_null(reasons)
        if missing == "drop":
            hit = pc.and_(open_, rule.missing(table))
            reasons = pc.if_else(hit, pa.scalar(rule.missing_reason), reasons)
            open_ = pc.is_null(reasons)
        hit = pc.and_(open_, rule.failing(table))
        reasons = pc.if_else(hit, pa.scalar(rule.drop_reason), reasons)
    if isinstance(reasons, pa.Array):
        reasons = pa.chunked_array([reasons], pa.string())
    return reasons
