"""The commands on a finished run: ``curate preview``, ``report`` and ``takedown`` (see :mod:`curate.tools`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from curate.base import ConfigError
from curate.cli.options import out

__all__ = ["preview", "report_", "takedown"]


def preview(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    rules: Annotated[
        list[str],
        typer.Option(
            "--rule", "-r", help="A rule such as 'clip_score >= 0.3'; replaces the run's rules on its column."
        ),
    ],
    html: Annotated[
        str | None, typer.Option(help="Where to write the HTML page (default OUTPUT/report/preview.html).")
    ] = None,
    per_side: Annotated[int, typer.Option(help="Images shown on each side of each threshold.")] = 24,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """What other thresholds would keep and drop, from the sidecars alone (no recompute), with an HTML page
    of the images nearest each threshold."""
    from curate.tools.preview import preview_output, preview_table

    report = preview_output(output, rules, html, per_side)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    out.print(preview_table(report))
    for note in report.caveats:
        out.print(f"[yellow]note:[/yellow] {note}")
    if report.html:
        out.print(f"images near the thresholds: {report.html}")


def report_(output: Annotated[str, typer.Argument(help="The output folder of a run.")]) -> None:
    """Write OUTPUT/report/report.html (funnel, drop reasons, link rot, stage times, score histograms with
    thresholds, sample grids, captions; one self-contained file) and report.json with the same numbers."""
    from curate.tools.report import write_report

    written = write_report(output)
    out.print(f"report: {written.html_path}\nnumbers: {written.json_path}")


def takedown(
    output: Annotated[str, typer.Argument(help="The output folder of a finished run.")],
    uids: Annotated[
        str | None, typer.Option(help="A file of uids to remove, one per line (# comments), or a .parquet.")
    ] = None,
    hashes: Annotated[
        str | None,
        typer.Option(
            help="A file of sha256 (64 hex) and/or pHash (16 hex) lines; sha256:/phash: prefixes allowed."
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="A retrieval index to remove them from too (default OUTPUT/index if any)."),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why: recorded in OUTPUT/takedown/audit.jsonl.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the audit record as JSON.")] = False,
) -> None:
    """Remove samples from a finished run: tar members, dropped/ thumbnails and index vectors go; sidecar rows
    stay, marked drop_reason=takedown with their URL, captions and embeddings nulled; stats are recounted.
    Every file is replaced atomically, an audit line is appended last, and a rerun completes a killed one."""
    from curate.tools.takedown import read_request
    from curate.tools.takedown import takedown as take_down

    if (uids is None) == (hashes is None):
        raise ConfigError(
            [("--uids/--hashes", "give exactly one of --uids FILE and --hashes FILE")], what="takedown"
        )
    wanted, listed = read_request(uids, hashes)
    record = take_down(
        output,
        uids=wanted,
        hashes=listed,
        reason=reason,
        index=index,
        source=uids or hashes,
        progress=out.print,
    )
    if as_json:
        out.print_json(json.dumps(record))
        return
    changed = [f["path"] for f in record["files"] if f.get("sha256_before") != f.get("sha256_after")]
    out.print(
        f"takedown: {len(record['found'])} row(s) matched, {len(changed)} file(s) rewritten"
        + ("" if record["removed_anything"] else "; nothing left to remove (already taken down)")
    )
    for uid in record["not_found"]:
        out.print(f"[yellow]not found:[/yellow] {uid}")
    for h in record["hashes_not_found"]:
        out.print(f"[yellow]no row has:[/yellow] {h}")
