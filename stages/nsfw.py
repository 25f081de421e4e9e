"""NSFW score (being written)."""

from __future__ import annotations

from curate.stage import Stage


class Nsfw(Stage):
    name = "nsfw"
