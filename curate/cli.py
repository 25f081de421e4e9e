"""The ``curate`` command. Exit codes: 0 success, 1 the run finished with failed shards, 2 bad config or usage."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from curate.config import ConfigError, PipelineConfig, load_config
from curate.reader import InputError

app = typer.Typer(
    name="curate",
    help="Curate image-text corpora for training generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # long paths and messages stay on one line, whole
out = Console(soft_wrap=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: a.b=value (stages by name: stages.NAME.key=v)."),
]
PipelineArg = Annotated[str, typer.Argument(help="The pipeline YAML file.")]


def _load(pipeline: str, sets: list[str] | None, executor: str | None = None, address: str | None = None):
    overrides = list(sets or [])
    if executor:
        overrides.append(f"executor.kind={executor}")
    if address:
        overrides.append(f"executor.address={address}")
        if not executor:
            overrides.append("executor.kind=ray")
    return load_config(pipeline, overrides)


@app.command()
def run(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    executor: Annotated[str | None, typer.Option(help="local or ray (overrides executor.kind).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address to join (implies --executor ray).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete curate's files in the output folder and start over.")
    ] = False,
    resume_anyway: Annotated[
        bool, typer.Option(help="Keep finished shards of a run with another config and go on.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")] = False,
) -> None:
    """Run a pipeline. Running it again resumes: finished shards are skipped."""
    from curate.runner import run_pipeline

    config = _load(pipeline, sets, executor, address)
    summary = run_pipeline(config, overwrite=overwrite, resume_anyway=resume_anyway, show_progress=not quiet)
    if summary.shards_failed:
        err.print(
            f"[red]{len(summary.shards_failed)} shard(s) failed: {', '.join(sorted(summary.shards_failed))}"
        )
        err.print(
            f"details: {config.output.path}/shards/<id>_failed.json; run the same command again to retry them"
        )
    raise typer.Exit(summary.exit_code)


@app.command()
def validate(pipeline: PipelineArg, sets: SetOpt = None) -> None:
    """Check a pipeline without running it: config, stage parameters, column flow, input files."""
    from curate.pipeline import Pipeline

    config = _load(pipeline, sets)
    p = Pipeline(config)
    p.check()
    specs = p.reader.plan(config.shard_size)
    out.print(
        f"[green]ok[/green]: {config.name}: {len(config.stages)} stage(s), {len(p.reader.files)} input file(s), "
        f"{sum(s.rows for s in specs):,} rows in {len(specs)} shard(s)"
    )


@app.command()
def describe(
    pipeline: PipelineArg,
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show the plan: stages, the columns each reads and writes, resources, phases, shards."""
    from curate.pipeline import Pipeline

    config = _load(pipeline, sets)
    p = Pipeline(config)
    columns = p.check()
    stages = p.describe()
    if as_json:
        out.print_json(json.dumps({"name": config.name, "stages": stages, "columns": columns}))
        return
    out.print(
        f"[bold]{config.name}[/bold]: {config.executor.kind} executor, {config.shard_size:,} rows a shard, "
        f"{len(p.phases())} phase(s)"
    )
    out.print(f"input: {config.input.path}")
    out.print(f"input columns: {', '.join(p.reader.column_names())}")
    for i, s in enumerate(stages):
        res = f"cpus={s['cpus']:g} gpus={s['gpus']:g}"
        res += f" concurrency={s['concurrency']}" if s["concurrency"] else ""
        out.print(
            f"{i:>3} [bold]{s['name']}[/bold] ({s['stage']}, {s['kind']}): runs as {s['runs_as']}, {res}"
        )
        out.print(f"      reads:  {', '.join(s['reads']) or '-'}")
        out.print(f"      writes: {', '.join(s['writes']) or '-'}")
    out.print(f"output: {config.output.path} (training text from {config.output.text_column!r})")


@app.command()
def retry(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    statuses: Annotated[
        str,
        typer.Option("--status", help="Comma-separated statuses to retry; http_5xx matches every 5xx."),
    ] = "timeout,connection_error,http_429,http_5xx",
) -> None:
    """Fetch again only the rows that failed for a transient reason; rewrite only their shards."""
    from curate.retry import retry_output

    wanted = [s.strip() for s in statuses.split(",") if s.strip()]
    summary = retry_output(output, wanted, console=err)
    still = ", ".join(f"{k}: {v}" for k, v in sorted(summary.still.items())) or "none"
    out.print(
        f"retried {summary.rows:,} row(s) in {len(summary.shards)} shard(s): {summary.recovered:,} recovered; "
        f"still failing: {still}"
    )


@app.command()
def demo(
    output: Annotated[str, typer.Option(help="Where the world and the run go.")] = "demo-output",
    size: Annotated[int, typer.Option(help="Rows in the generated world.")] = 2000,
    executor: Annotated[str | None, typer.Option(help="local or ray (default: the demo pipeline's).")] = None,
) -> None:
    """Build the offline sample world, serve it on 127.0.0.1 and run pipelines/demo.yaml against it."""
    from curate.demo.run import run_demo

    summary, truth = run_demo(output, size, executor, err)
    out.print(f"shards: {output}/run/shards  (WebDataset tars, parquet sidecars, stats)")
    out.print(f"summary: curate status {output}/run   ground truth: {output}/world/truth.parquet")
    out.print(
        f"download statuses match the planted ground truth for {truth['agree']:,}/{truth['checked']:,} fetched rows"
    )
    for what, n in sorted(truth["differ"].items()):
        out.print(f"  [yellow]{n:,} x {what}")
    raise typer.Exit(summary.exit_code)


@app.command()
def status(
    output: Annotated[str, typer.Argument(help="The output folder of a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Shards done, pending and failed, and the counts so far."""
    from curate.progress import summary_table
    from curate.runner import OutputDir, collect_output

    info = OutputDir(output).run_json()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    s = collect_output(output)
    pending = s.shards_total - len(s.shards_done) - len(s.shards_failed)
    report = {
        "name": info.get("name"),
        "status": info.get("status"),
        "fingerprint": info.get("fingerprint"),
        "shards": {
            "total": s.shards_total,
            "done": len(s.shards_done),
            "failed": len(s.shards_failed),
            "pending": pending,
        },
        "failed": sorted(s.shards_failed),
        "counts": s.counts,
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(
        f"{report['name']} ({report['status']}): {len(s.shards_done)}/{s.shards_total} shards done, "
        f"{len(s.shards_failed)} failed, {pending} pending"
    )
    for shard in sorted(s.shards_failed):
        last = s.shards_failed[shard].strip().splitlines()[-1:] or [""]
        out.print(f"  [red]failed[/red] {shard}: {last[0]}")
    out.print(summary_table(s.counts))


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # click returns an Exit's code instead of raising it here
    except (ConfigError, InputError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors, as typer vendors them
        if hasattr(e, "show"):
            e.show()
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)


__all__ = ["PipelineConfig", "app", "main"]
