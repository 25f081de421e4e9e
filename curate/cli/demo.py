"""``curate demo``: the offline sample world, the demo pipeline run against it, and how its results compare
with the planted ground truth (see :mod:`curate.demo`)."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.cli.options import err, out

__all__ = ["demo"]


def demo(
    output: Annotated[str, typer.Option(help="Where the world and the run go.")] = "demo-output",
    size: Annotated[int, typer.Option(help="Rows in the generated world.")] = 2000,
    executor: Annotated[str | None, typer.Option(help="local or ray (default: the demo pipeline's).")] = None,
    clip: Annotated[
        str | None,
        typer.Option(
            help="A CLIP folder (open_clip hub layout + curate_calibration.json) to use instead of training one."
        ),
    ] = None,
    train_steps: Annotated[
        int | None,
        typer.Option(
            help="Steps of the curated-vs-raw training comparison (0 skips it; default: the config's)."
        ),
    ] = None,
    rag: Annotated[
        bool,
        typer.Option(
            "--rag",
            help="Also train with and without retrieval on a world with a rare concept and compare them "
            "(benchmarks/RESULTS.md's settings: several minutes more).",
        ),
    ] = False,
) -> None:
    """Build the offline sample world, serve it on 127.0.0.1 and run pipelines/demo.yaml against it."""
    from curate.demo.run import run_demo

    summary, truth = run_demo(output, size, executor, err, clip=clip, train_steps=train_steps, rag=rag)
    out.print(f"shards: {output}/run/shards  (WebDataset tars, parquet sidecars, stats)")
    out.print(f"summary: curate status {output}/run   ground truth: {output}/world/truth.parquet")
    out.print(
        f"download statuses match the planted ground truth for {truth['agree']:,}/{truth['checked']:,} fetched rows"
    )
    for what, n in sorted(truth["differ"].items()):
        out.print(f"  [yellow]{n:,} x {what}")
    scores = truth.get("scores", {})
    out.print(
        f"scored rows: {scores.get('scored', 0):,} (clip_score by the demo CLIP: small, trained on this world only)"
    )
    for key, label in (
        ("mismatched_caption", "mismatched captions removed by clip_score"),
        ("text_overlay", "text overlays found by text_area"),
    ):
        if key in scores:
            s = scores[key]
            out.print(
                f"{label} (threshold {s['threshold']:g}): precision {s['precision']:.3f}, recall {s['recall']:.3f} "
                f"({s['correct']} of {s['flagged']} flagged, {s['actual']} planted)"
            )
    if "nsfw" in scores:
        n = scores["nsfw"]
        out.print(
            f"nsfw_score >= {n['threshold']:g}: {n['flagged']} of {n['scored']} rows (the world has no NSFW images)"
        )
    d = truth.get("dedup")
    if d:
        kinds = ", ".join(f"{n} {k}" for k, n in d["by_kind"].items()) or "none"
        out.print(
            f"duplicates removed by dedup: precision {d['precision']:.3f}, recall {d['recall']:.3f} "
            f"({d['correct']} of {d['flagged']} flagged, {d['actual']} planted; by kind: {kinds})"
        )
        planted = ", ".join(f"{k} {f}/{n}" for k, (f, n) in d["planted_found"].items())
        out.print(f"  planted copies found, by how they were made: {planted}")
    out.print(_look_at(output, truth), soft_wrap=True, markup=False, highlight=False)
    raise typer.Exit(summary.exit_code)


def _look_at(output: str, report: dict) -> str:
    """The table the demo ends with: what to open, what to run, and the comparison with its interval. Plain
    aligned lines, so that paths and the command copy whole from any terminal."""
    rows = [("run report", f"{output}/run/report/report.html")]
    index = report.get("index")
    if index:
        query = index["prompt"].replace('"', "'")
        rows.append(("retrieval index", f'curate index query {index["path"]} --text "{query}"'))
    training = report.get("training")
    ci = (training or {}).get("adherence_interval")
    if ci:
        rows.append(
            (
                "curated vs raw",
                f"prompt adherence {ci['diff'] * 100:+.1f} points, {ci['level']:.0%} interval "
                f"{ci['low'] * 100:+.1f} to {ci['high'] * 100:+.1f} ({ci['n']} held-out prompts, paired "
                f"bootstrap; samples in {output}/train/curated/samples and {output}/train/raw/samples)",
            )
        )
    elif training is None:
        rows.append(("curated vs raw", "not trained (--train-steps 0)"))
    rag = report.get("rag")
    if rag:
        arms = rag["settings"]["arms"]
        diffs = []
        for kind in ("rare", "common"):
            iv = rag["results"][arms[-1]][kind].get(f"vs_{arms[0]}")
            if iv:
                diffs.append(
                    f"{kind} prompts {iv['diff']:+.3f} ({iv['level']:.0%} interval "
                    f"{iv['low']:+.3f} to {iv['high']:+.3f}, {iv['n']} prompts)"
                )
        rows.append(
            (
                f"{arms[-1]} vs {arms[0]}",
                f"adherence {'; '.join(diffs)}; table above, all numbers in {output}/rag/rag_compare.json",
            )
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(["what to look at:", *(f"  {name:<{width}}  {value}" for name, value in rows)])
