"""What a person watches while a run goes: shards done, rows per second, time spent in each stage; and the
funnel at the end."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from curate.base import fmt_bytes
from curate.core.pipeline import ShardResult


class RunProgress:
    """A live display: one bar per phase (shards), one line per stage (seconds, rows/s, rows kept)."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._phase: TaskID | None = None
        self._stages: dict[str, TaskID] = {}
        self._stage_totals: dict[str, list[float]] = {}
        self._rows = 0
        self._start = time.perf_counter()

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, label: str, shards: int, done: int) -> None:
        self._rows = 0
        self._start = time.perf_counter()
        self._phase = self.progress.add_task(label, total=shards + done, completed=done, info="")
        self._total = shards + done
        self._done = done

    def update(self, result: ShardResult) -> None:
        if self._phase is None:
            return
        self.progress.advance(self._phase)
        if not result.ok:
            self.progress.console.print(
                f"[red]shard {result.shard} failed after {result.attempts} attempt(s)"
            )
            return
        stats = result.stats or {}
        self._rows += stats.get("rows", 0)
        rate = self._rows / max(time.perf_counter() - self._start, 1e-9)
        self.progress.update(self._phase, info=f"{self._rows:,} rows  {rate:,.0f} rows/s")
        rows = stats.get("rows", 0)
        for name, t in (stats.get("stages") or {}).items():
            total = self._stage_totals.setdefault(name, [0.0, 0, 0])
            total[0] += t["seconds"]
            total[1] += rows
            total[2] += t["kept"]
            if name not in self._stages:
                self._stages[name] = self.progress.add_task(
                    f"  {name}", total=self._total, completed=self._done, info=""
                )
            self.progress.advance(self._stages[name])
            per_s = total[1] / total[0] if total[0] > 0 else float("inf")
            self.progress.update(
                self._stages[name],
                info=f"{total[0]:.1f}s  {per_s:,.0f} rows/s  kept {total[2]:,}/{total[1]:,}",
            )


def summary_table(counts: dict[str, Any]) -> Table:
    """The funnel (input rows → ok → kept) and the count of every status and drop reason."""
    table = Table(title="curate run", show_lines=False)
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    rows = counts.get("rows", 0) or 0

    def add(label: str, n: int, style: str = "") -> None:
        table.add_row(label, f"{n:,}", f"{100 * n / rows:.1f}%" if rows else "-", style=style)

    add("input rows", rows, "bold")
    add("status ok", counts.get("ok", 0))
    add("kept", counts.get("kept", 0), "bold green")
    for status, n in sorted(counts.get("status", {}).items()):
        if status != "ok":
            add(f"  status {status}", n, "yellow")
    for reason, n in sorted(counts.get("drop_reason", {}).items()):
        add(f"  dropped {reason}", n, "yellow")
    return table


def stage_table(stages: dict[str, dict[str, float]]) -> Table:
    """Time, rate and rows kept per stage, and the peak memory of the worker that ran it (the process's
    peak so far: under the local executor it grows from stage to stage)."""
    table = Table(title="stages")
    for col in ("stage", "seconds", "rows/s", "kept after", "worker peak"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in stages.items():
        rate = s["rows"] / s["seconds"] if s["seconds"] > 0 else float("inf")
        peak = fmt_bytes(s["peak_rss"]) if s.get("peak_rss") else "-"
        table.add_row(name, f"{s['seconds']:.2f}", f"{rate:,.1f}", f"{int(s['kept']):,}", peak)
    return table
