"""threshold filter on score columns (being written)."""

from __future__ import annotations

from curate.stage import Stage


class ThresholdFilter(Stage):
    name = "filter"
