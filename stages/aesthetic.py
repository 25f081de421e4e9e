"""LAION aesthetic score (being written)."""

from __future__ import annotations

from curate.stage import Stage


class Aesthetic(Stage):
    name = "aesthetic"
