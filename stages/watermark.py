"""watermark, text overlay and AI-watermark scores (being written)."""

from __future__ import annotations

from curate.stage import Stage


class Watermark(Stage):
    name = "watermark"
